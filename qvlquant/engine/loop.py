"""The layer-by-layer loop: capture what decoder layer 0 receives, then quantize and replay one layer at a time.

Layer 0's inputs are captured with a forward pre-hook on the real HF forward, so the hidden states (text embeddings
with the vision tower's features merged in) and the M-RoPE position embeddings are exactly what transformers
computed. Each layer is then quantized from those inputs and replayed; its quantized outputs become the next
layer's inputs. The vision tower, the embeddings and lm_head are never touched.

Where the layers come from is a ``LayerSource``: the model itself (``InMemoryLayers``), or the checkpoint on disk,
one layer at a time (``qvlquant.engine.streaming.StreamedLayers``). Where finished layers go is a ``LayerStore``
(``qvlquant.engine.resume``): packed tensors ready for the export, never int32 codes or float copies of the layer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from qvlquant.engine.resume import LayerRecord, MemoryStore
from qvlquant.families import ModelFamily
from qvlquant.parallel.devices import rss_high_water_bytes, trim_heap
from qvlquant.parallel.distributed import SINGLE, World, broadcast_tensors
from qvlquant.quant.apply import LAYER_METHODS, w8a8_layer
from qvlquant.quant.formats import Int8Format, PackFormat, QuantizedWeight
from qvlquant.quant.layer import (
    LayerContext,
    LayerInput,
    Phase,
    QuantizationError,
    check_finite,
    hooked,
    next_input,
    set_weight,
)
from qvlquant.quant.rules import ModulePlan
from qvlquant.quant.spec import QuantConfig, QuantSpec
from qvlquant.ui.progress import progress

_DROP_KWARGS = ("past_key_values", "use_cache", "past_key_value", "cache_position")


class _StopForward(Exception):
    """Raised by the capture hook so the rest of the model does not run (private: never escapes capture_inputs)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopPlan:
    """How the loop runs, derived from the job's settings and the model (not user settings themselves)."""

    family: ModelFamily
    qcfg: QuantConfig
    # the layout the records hold (``PackFormat.for_job`` for a job; ``Int8Format`` for calibrated INT8 W8A8, whose
    # layers go through ``w8a8_layer``)
    pack_format: PackFormat | Int8Format
    storage_dtype: torch.dtype = torch.bfloat16  # the checkpoint's dtype: what the export writes
    offload: str | None = None  # where activations wait between layers ("cpu"), None: where they were computed
    max_layers: int | None = None  # stop after this many layers
    world: World = SINGLE  # the ranks of a distributed run (each runs its own share of the batches)
    modules: ModulePlan | None = None  # per-module rules, resolved against the model (None: qcfg everywhere)
    smoothing: float | str | None = None  # INT8 W8A8: SmoothQuant's strength (alpha, or "auto"); None: none

    def pack(self, w: QuantizedWeight) -> dict[str, torch.Tensor]:
        """A linear's codes -> the tensors its record holds (INT8: scales in the storage dtype)."""
        if isinstance(self.pack_format, Int8Format):
            return self.pack_format.pack_quantized(w, self.storage_dtype)
        return self.pack_format.pack(w)

    def unpack(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, in_features: int) -> QuantizedWeight:
        if isinstance(self.pack_format, Int8Format):
            return self.pack_format.unpack_quantized(tensors, spec)
        return self.pack_format.unpack(tensors, spec, in_features)

    def quantize_layer_with(self, layer: torch.nn.Module, inputs: list, ctx) -> None:
        """Run the method of this plan on one decoder layer."""
        if isinstance(self.pack_format, Int8Format):
            w8a8_layer(layer, inputs, ctx, self.smoothing)
        else:
            LAYER_METHODS[self.qcfg.method](layer, inputs, ctx)

    def config_for(self, name: str) -> QuantConfig | None:
        """The settings of the linear at runtime path ``name`` (None: skipped by a rule)."""
        return self.qcfg if self.modules is None else self.modules.config_for(name)

    def quantized(self, prefix: str) -> tuple[str, ...]:
        """The family's linears of the layer at ``prefix`` that are quantized (not skipped by a rule)."""
        linears = self.family.at(self.family.index_of(prefix)).linears
        return tuple(n for n in linears if self.config_for(f"{prefix}.{n}") is not None)


class Phases:
    """Wall time per ``Phase`` of the loop, summed over all layers; and in which phase the process's resident
    memory reached a new high (its high-water mark read at every switch: the phase that just ended raised it)."""

    def __init__(self, high_water: Callable[[], int | None] = rss_high_water_bytes):
        self.seconds: dict[Phase, float] = {}
        self.current: Phase | None = None
        self.since = 0.0
        self.high_water, self.highs = high_water, {}
        self.mark = high_water()

    def switch(self, phase: Phase | None) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
            mark = self.high_water()
            if mark is not None and self.mark is not None and mark > self.mark:
                self.highs[self.current] = mark
            self.mark = mark
        self.current, self.since = phase, now

    def rounded(self) -> dict[str, float]:
        """phase name -> seconds (what the report records)."""
        return {phase.value: round(v, 2) for phase, v in self.seconds.items()}

    def highs_gib(self) -> dict[str, float]:
        """phase name -> the highest resident memory (GiB) the process first reached during that phase; the phase
        holding the largest value is where the run's peak happened. Phases that never raised it are absent."""
        return {phase.value: round(b / 2**30, 3) for phase, b in self.highs.items()}


class LayerSource(Protocol):
    """Where the loop gets decoder layer ``i`` (``load``) and gives it back once it is quantized and replayed."""

    def after_capture(self) -> None: ...  # the capture pass is done: what only it needed can go

    def load(self, i: int) -> torch.nn.Module: ...

    def release(self, i: int) -> None: ...


class LayerStore(Protocol):
    """Where finished layers go (``qvlquant.engine.resume``: MemoryStore, DiskStore, RankStore): the loop saves
    each layer's record and resumes after the last one saved; the export reads the records tensor by tensor."""

    def resume_point(self) -> tuple[int, list[torch.Tensor] | None]: ...  # (first layer to do, its inputs' hidden)

    def save(self, i: int, record: LayerRecord, hidden: list[torch.Tensor]) -> None: ...

    def finished(self) -> list[int]: ...

    def load(self, i: int) -> LayerRecord: ...

    def load_info(self, i: int) -> dict: ...

    def tensor_meta(self, i: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]: ...

    def get(self, i: int, key: str) -> torch.Tensor: ...

    def remove(self) -> None: ...


class InMemoryLayers:
    """The decoder layers of a model that is already in memory; they keep their quantized (dequantized) weights."""

    def __init__(self, model, family: ModelFamily):
        self.layers = model.get_submodule(family.decoder_layers)

    def after_capture(self) -> None:
        pass

    def load(self, i: int) -> torch.nn.Module:
        return self.layers[i]

    def release(self, i: int) -> None:
        pass


class QuantizedWeights(Mapping):
    """runtime linear name -> QuantizedWeight, unpacked from the store on access (one at a time)."""

    def __init__(self, store: LayerStore, plan: LoopPlan):
        self.store, self.plan = store, plan

    def _names(self) -> list[str]:
        head = self.plan.family.decoder_layers
        return [f"{head}.{i}.{n}" for i in self.store.finished() for n in self.plan.quantized(f"{head}.{i}")]

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, name: str) -> QuantizedWeight:
        family = self.plan.family
        head, linear = name[len(family.decoder_layers) + 1:].split(".", 1)
        record = self.store.load(int(head))
        disk = family.to_disk(name)
        k = record.in_features[linear]
        tensors = {key.rsplit(".", 1)[1]: t for key, t in record.tensors.items() if key.rsplit(".", 1)[0] == disk}
        w = self.plan.unpack(tensors, self.plan.config_for(name).spec, k)
        return dataclasses.replace(w, input_scale=record.aux.get(f"{linear}.input_scale"),
                                   output_scale=record.aux.get(f"{linear}.output_scale"))


@dataclasses.dataclass
class QuantResult:
    plan: LoopPlan
    store: LayerStore  # the finished layers' records
    num_layers: int
    seconds: float = 0.0
    layer_seconds: dict[int, float] = dataclasses.field(default_factory=dict)
    phases: Phases = dataclasses.field(default_factory=Phases)  # where the time went, over all layers

    @property
    def complete(self) -> bool:
        return self.store.finished() == list(range(self.num_layers))

    @property
    def weights(self) -> QuantizedWeights:
        return QuantizedWeights(self.store, self.plan)

    @property
    def layer_info(self) -> dict[str, dict]:
        """runtime linear name -> what the method recorded (damping, scales, tokens)."""
        prefix = self.plan.family.decoder_layers
        return {f"{prefix}.{i}.{name}": info for i in self.store.finished()
                for name, info in self.store.load_info(i).items()}


class _PassedThrough:
    """Decoder layers that hand their input hidden states on unchanged while the block runs (their forward hooks
    still see what they receive): the capture pass reaches the first layer of each type without running one."""

    def __init__(self, layers):
        self.layers = list(layers)

    def __enter__(self):
        for layer in self.layers:
            layer.forward = lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"]

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward


@torch.no_grad()
def capture_inputs(model, family: ModelFamily, batches: list[dict], offload: str | None = None) -> list[LayerInput]:
    """Run the real forward on each batch and keep what decoder layer 0 receives (moved to ``offload`` if set).
    Hybrid models: also the keyword arguments the first layer of every other type receives (``kwargs_of``), the
    layers before it passed through (its hidden states are not kept: they would be layer 0's)."""
    layers = model.get_submodule(family.decoder_layers)
    firsts = family.first_layers()  # {index: type}; {} when the layers are alike
    last = max(firsts, default=0)
    captured: list[LayerInput] = []
    pending: list[LayerInput] = []
    mask_of_batch: list[torch.Tensor] = []
    deepstack: dict = {}
    masks_kw, embeds_kw = family.deepstack_kwargs
    config = getattr(model, "config", None)
    vision_ids = [i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
                  if i is not None]  # Qwen-VL-Chat has none: its vision tokens are not told apart (weights stay 1)
    vision_of_batch: list = []

    def text_model_hook(module, args, kwargs):
        deepstack["masks"], deepstack["embeds"] = kwargs.get(masks_kw), kwargs.get(embeds_kw)

    def hook(module, args, kwargs, index=0):
        kept = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"}
        if index == 0:
            hidden = args[0] if args else kwargs["hidden_states"]
            x = LayerInput(hidden.detach(), kept, mask_of_batch[-1], vision_mask=vision_of_batch[-1])
            if family.deepstack and deepstack.get("embeds") is not None:
                x.visual_pos_masks, x.deepstack = deepstack["masks"], [e.detach() for e in deepstack["embeds"]]
            pending[:] = [x]
        if firsts:
            x = pending[0]
            x.kwargs_of = {**(x.kwargs_of or {}), firsts[index]: kept}
        if index == last:
            captured.append(pending[0] if offload is None else pending[0].to(offload))
            raise _StopForward

    pre_hooks = [(layers[i], lambda m, a, kw, i=i: hook(m, a, kw, i)) for i in sorted(set(firsts) | {0})]
    if family.deepstack:
        pre_hooks.append((model.get_submodule(family.language_model), text_model_hook))
    device = next(p.device for p in model.parameters() if not p.is_meta)  # where the capture parts live
    with hooked(pre_hooks, pre=True, with_kwargs=True), _PassedThrough(layers[:last]):
        for batch in progress(batches, desc="capture layer-0 inputs", unit="batch"):
            mask_of_batch.append(batch["attention_mask"].bool().to(device))
            ids = batch.get("input_ids")
            vision_of_batch.append(None if ids is None or not vision_ids else torch.isin(ids, torch.tensor(vision_ids)).to(device))
            try:
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            except _StopForward:
                pass
    if len(captured) != len(batches):
        raise QuantizationError(f"captured inputs for {len(captured)} of {len(batches)} batches")
    return captured


def decoder_linears(model, family: ModelFamily, padded_intermediate: int | None = None) -> list[tuple[str, int, int]]:
    """Every quantizable linear of the decoder layers as (runtime name, in_features, out_features), in layer and
    execution order; the MLP's sizes after --pad-intermediate-to. ``model`` may be a meta skeleton."""
    out = []
    for i, layer in enumerate(model.get_submodule(family.decoder_layers)):
        for name in family.at(i).linears:
            linear = layer.get_submodule(name)
            k, n = linear.in_features, linear.out_features
            if padded_intermediate and name == family.mlp_out:
                k = padded_intermediate
            if padded_intermediate and name in family.mlp_in:
                n = padded_intermediate
            out.append((f"{family.decoder_layers}.{i}.{name}", k, n))
    return out


def fused_groups(family: ModelFamily, num_layers: int) -> list[list[str]]:
    """Runtime names of the linears vLLM fuses into one layer (``family.fused``), per decoder layer."""
    return [[f"{family.decoder_layers}.{i}.{n}" for n in parts] for i in range(num_layers)
            for _, parts in family.at(i).fused]


def check_group_size(model, family: ModelFamily, spec: QuantSpec, padded_intermediate: int | None = None,
                     modules: ModulePlan | None = None) -> None:
    """Every targeted linear's in_features must divide into groups (of ``spec``, or of the group size its rule in
    ``modules`` gives; skipped linears have none); checked before any calibration work (on a meta skeleton it
    costs nothing). ``padded_intermediate``: the MLP's size after --pad-intermediate-to."""
    bad = []
    for i, layer in enumerate(model.get_submodule(family.decoder_layers)):
        for name in family.at(i).linears:
            path = f"{family.decoder_layers}.{i}.{name}"
            cfg = modules.config_for(path) if modules is not None else None
            if modules is not None and cfg is None:
                continue  # skipped: kept whole
            group = (spec if cfg is None else cfg.spec).group_size
            k = layer.get_submodule(name).in_features
            if name == family.mlp_out and padded_intermediate:
                k = padded_intermediate
            if group != -1 and k % group:
                bad.append((path, k, group))
    if bad:
        sizes = sorted({g for _, _, g in bad})
        shown = ", ".join(f"{p} (in_features {k}{'' if len(sizes) == 1 else f', group_size {g}'})" for p, k, g in bad[:8])
        raise ValueError(f"group_size {'/'.join(map(str, sizes))} does not divide in_features of: {shown}")


class _Recorder:
    """Where a layer's quantized linears go as they are finished: the layer gets each one's dequantized weight, the
    record its packed tensors, info and AWQ scales. In a distributed run ``settle`` then hands each linear from
    the rank that solved it to every rank, in the same order on all of them."""

    def __init__(self, layer: torch.nn.Module, plan: LoopPlan, prefix: str, phases: Phases,
                 step: Callable[[Phase, str], None]):
        self.layer, self.plan, self.prefix, self.phases, self.step = layer, plan, prefix, phases, step
        self.record = LayerRecord()

    def _disk(self, name: str) -> str:
        return self.plan.family.to_disk(f"{self.prefix}.{name}")

    def _keep(self, name: str, packed: dict[str, torch.Tensor], info: dict, aux: dict[str, torch.Tensor]) -> None:
        disk, record = self._disk(name), self.record
        record.tensors.update({f"{disk}.{key}": t for key, t in packed.items()})
        record.in_features[name] = self.layer.get_submodule(name).weight.shape[1]
        record.info[name] = info
        record.aux.update({f"{name}.{field}": t for field, t in aux.items()})

    def finish(self, name: str, w: QuantizedWeight, info: dict) -> None:
        resume = self.phases.current  # the method's phase: what it does next is timed there, not as packing
        self.phases.switch(Phase.PACK)
        set_weight(self.layer.get_submodule(name), w)
        w = QuantizedWeight(*(None if t is None else t.cpu() for t in (w.q, w.scale, w.zero, w.g_idx)), w.spec,
                            *(None if t is None else t.cpu() for t in (w.input_scale, w.output_scale)))
        aux = {f: getattr(w, f).clone() for f in ("input_scale", "output_scale") if getattr(w, f) is not None}
        self._keep(name, self.plan.pack(w), info, aux)
        self.step(resume, f"{name} done")

    def settle(self, owner: dict[str, int]) -> None:
        world, record = self.plan.world, self.record
        if not world.distributed:
            return
        resume = self.phases.current
        self.phases.switch(Phase.SHARE)
        for name, src in owner.items():
            mine, disk = src == world.rank, self._disk(name)
            sent = {k.rsplit(".", 1)[1]: t for k, t in record.tensors.items() if k.rsplit(".", 1)[0] == disk}
            sent |= {f"aux.{k.rsplit('.', 1)[1]}": t for k, t in record.aux.items() if k.rsplit(".", 1)[0] == name}
            got, info = broadcast_tensors(sent if mine else None, record.info.get(name), src, world)
            if not mine:
                packed = {k: t for k, t in got.items() if not k.startswith("aux.")}
                linear = self.layer.get_submodule(name)
                spec = self.plan.config_for(f"{self.prefix}.{name}").spec
                set_weight(linear, self.plan.unpack(packed, spec, linear.weight.shape[1]))
                self._keep(name, packed, info, {k[4:]: t for k, t in got.items() if k.startswith("aux.")})
        for name in owner:  # the order one process records them in, whichever rank solved what
            disk = self._disk(name)
            for key in [k for k in record.tensors if k.rsplit(".", 1)[0] == disk]:
                record.tensors[key] = record.tensors.pop(key)
            record.info[name] = record.info.pop(name)
        self.phases.switch(resume)


def quantize_layer(layer: torch.nn.Module, inputs: list[LayerInput], plan: LoopPlan, prefix: str, bar=None,
                   phases: Phases | None = None) -> LayerRecord:
    """Quantize one decoder layer in place (weights become their dequantized values). -> its record: the packed
    tensors and every other parameter of the layer in the storage dtype, under checkpoint names."""
    family = plan.family.at(plan.family.index_of(prefix))  # this layer's type's declaration
    phases = phases or Phases()

    def step(phase: Phase, what: str) -> None:
        phases.switch(phase)
        if bar is not None:
            bar.set_postfix_str(f"{prefix.rsplit('.', 1)[-1]}: {what}", refresh=True)

    recorder = _Recorder(layer, plan, prefix, phases, step)
    record = recorder.record
    phases.switch(Phase.QUANTIZE)
    ctx = LayerContext(family=family, qcfg=plan.qcfg, prefix=prefix, storage_dtype=plan.storage_dtype,
                       finish=recorder.finish, step=step, world=plan.world, settle=recorder.settle,
                       modules=plan.modules)
    plan.quantize_layer_with(layer, inputs, ctx)
    phases.switch(Phase.PACK)
    quantized = set(plan.quantized(prefix))
    missing = [n for n in family.linears if n in quantized and n not in record.info]
    if missing:
        raise QuantizationError(f"{prefix}: the {plan.qcfg.method} method left {missing} unquantized")
    for key, t in layer.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        if module in quantized and leaf == "weight":
            continue
        t = t.to(plan.storage_dtype) if t.is_floating_point() else t
        record.tensors[family.to_disk(f"{prefix}.{key}")] = t.detach().cpu().contiguous()
    return record


def quantize_model(model, batches: list[dict], plan: LoopPlan, source: LayerSource | None = None,
                   store: LayerStore | None = None) -> QuantResult:
    """Quantize every decoder layer (or the first ``plan.max_layers``): capture, then per layer load it from
    ``source``, quantize, replay, hand its record to ``store`` and release it. A store that already holds
    finished layers (a resumed run) is continued from the last one, with the inputs it saved."""
    family = plan.family
    source = source or InMemoryLayers(model, family)
    store = store if store is not None else MemoryStore()
    t0 = time.time()
    n = len(model.get_submodule(family.decoder_layers))
    result = QuantResult(plan, store, n)
    phases = result.phases
    phases.switch(Phase.CAPTURE)
    inputs = capture_inputs(model, family, batches, plan.offload)
    source.after_capture()
    trim_heap()  # the vision tower's freed weights
    start, hidden = store.resume_point()
    if hidden is not None:
        inputs = [dataclasses.replace(x, hidden=h.to(x.hidden.device)) for x, h in zip(inputs, hidden)]
    stop = n if plan.max_layers is None else min(n, plan.max_layers)
    bar = progress(range(n), desc=f"{plan.qcfg.method} W{plan.qcfg.spec.bits}", unit="layer", total=n)
    bar.update(start)
    for i in range(start, stop):
        t_layer = time.time()
        prefix = f"{family.decoder_layers}.{i}"
        for x in inputs:
            check_finite(x.hidden, f"the inputs of {prefix}")
        phases.switch(Phase.LOAD)
        layer = source.load(i)
        inputs = [x.of_type(family.layer_type(i)) for x in inputs]  # hybrid models: this layer type's mask
        record = quantize_layer(layer, inputs, plan, prefix, bar, phases)
        phases.switch(Phase.REPLAY)
        inputs = [next_input(i, layer, x) for x in inputs]
        if i == n - 1:
            for x in inputs:
                check_finite(x.hidden, f"the outputs of {prefix}")
        source.release(i)
        record.seconds = time.time() - t_layer
        phases.switch(Phase.SAVE)
        store.save(i, record, [x.hidden for x in inputs])
        result.layer_seconds[i] = round(record.seconds, 2)
        record = layer = None  # saved: the packed layer is not held while the next one is quantized
        trim_heap()
        bar.update(1)
    phases.switch(None)
    bar.close()
    result.seconds = time.time() - t0
    return result
