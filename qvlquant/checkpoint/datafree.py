"""Data-free exports (FP8, INT8 W8A8, NVFP4A16, and round-to-nearest in the integer layouts): each decoder-layer
linear weight of the language model read from the base checkpoint, quantized to e4m3 (``Fp8Format``), int8 per
channel (``Int8Format``, W8A8) or e2m1 in groups of 16 (``Nvfp4Format``) and written, one tensor at a time; no
calibration data, no forward pass, no model in memory. Everything else (vision tower, embeddings, norms, biases,
lm_head) is copied in the storage dtype.

The calibrated schemes (FP8 with static input scales, NVFP4 W4A4) are written the same way: their weights come from
the checkpoint alone; ``inputs`` (the calibration pass's largest |x| per linear, ``engine.calibration``) gives each
linear its activation scale, written beside its weight tensors.

Memory holds one tensor (in float32 while it is quantized). safetensors orders a file's tensors by dtype, so a
linear's float32 scale is written before its e4m3 weight: each quantized weight is read twice (once for its scale,
once for its codes) rather than holding a shard's codes until their turn.
"""

from __future__ import annotations

import copy
import pathlib
import shutil
from collections.abc import Mapping
from typing import Callable

import torch

from qvlquant.checkpoint.export import (
    CheckpointTensors,
    Entry,
    finish_export,
    fp8_quantization_config,
    nvfp4_quantization_config,
    plan_shards,
    quantization_config,
    w8a8_quantization_config,
    write_shards,
)
from qvlquant.config import ExportConfig
from qvlquant.families import ModelFamily
from qvlquant.quant import fp8, nvfp4
from qvlquant.quant.formats import SCHEME_NAMES, Fp8Format, Int8Format, Nvfp4Format, PackFormat, pack_rtn
from qvlquant.quant.rtn import default_g_idx
from qvlquant.quant.rules import ModulePlan
from qvlquant.quant.spec import QuantConfig
from qvlquant.storage.outputs import temp_dir
from qvlquant.storage.shards import file_order


def is_fp8_linear(family: ModelFamily, runtime_name: str) -> bool:
    """Whether ``runtime_name`` is the weight of one of the family's decoder-layer linears (``model.language_model
    .layers.3.mlp.up_proj.weight``): what an FP8 export quantizes."""
    if not (family.is_layer_key(runtime_name) and runtime_name.endswith(".weight")):
        return False
    inside = runtime_name[len(family.decoder_layers) + 1: -len(".weight")]  # "3.mlp.up_proj"
    index, _, linear = inside.partition(".")
    if not index.isdigit():
        return False
    layer = family.at(int(index)) if family.layouts and family.layer_types else family  # hybrid: its layer's type
    return linear in layer.linears


def quantized_linears(model, family: ModelFamily) -> list[str]:
    """Runtime paths of the linears a data-free or calibrated scheme quantizes (``is_fp8_linear``), in state-dict
    order: what the calibration pass observes. ``model`` may be a meta skeleton."""
    return [name[: -len(".weight")] for name in model.state_dict().keys() if is_fp8_linear(family, name)]


def check_nvfp4_groups(model, names: list[str]) -> None:
    """Every linear ``names`` (runtime paths of ``model``, a meta skeleton will do) has in_features in whole groups
    of 16, as NVFP4 needs: checked before the calibration pass reads any data."""
    bad = [(n, model.get_submodule(n).in_features) for n in names if model.get_submodule(n).in_features % nvfp4.GROUP]
    if bad:
        raise ValueError(f"{', '.join(f'{n} (in_features {k})' for n, k in bad[:4])}: NVFP4 needs in_features in "
                         f"whole groups of {nvfp4.GROUP}; use an FP8 scheme or the integer methods for this model")


class FusedAmax:
    """The largest |w| of the linears vLLM fuses with a decoder linear (``fused_siblings``), each sibling's weight
    read from the checkpoint once and kept as one number: what a shared per-tensor scale is made from."""

    def __init__(self, base: CheckpointTensors, family: ModelFamily):
        self.base, self.family, self.amax = base, family, {}

    def __call__(self, name: str) -> float:
        """``name``: the runtime name of a linear's weight."""
        for sibling in fused_siblings(self.family, name):
            if sibling not in self.amax:
                self.amax[sibling] = nvfp4.weight_amax(self.base.get(sibling).float())
        return max(self.amax[s] for s in fused_siblings(self.family, name))


def fused_input_amax(family: ModelFamily, inputs: Mapping[str, float] | None, name: str, scheme: str) -> float:
    """The largest calibration input among the linears vLLM fuses with the one whose weight is ``name`` (they read
    one input, so their ranges agree; vLLM keeps one scale for the fused layer): what its activation scale is made
    from. An error naming the linear when the calibration pass has no range for it."""
    linears = [s[: -len(".weight")] for s in fused_siblings(family, name)]
    missing = [s for s in linears if inputs is None or s not in inputs]
    if missing:
        raise ValueError(f"{missing[0]}: scheme {scheme} needs its calibrated input range (the calibration pass "
                         "records it); nothing was exported")
    return max(inputs[s] for s in linears)


def plan_fp8(model, family: ModelFamily, base: CheckpointTensors, fmt: Fp8Format | Int8Format,
             inputs: Mapping[str, float] | None = None
             ) -> tuple[list[Entry], dict[str, Callable[[], torch.Tensor]], list[str]]:
    """Every tensor of the export in state-dict order (a quantized linear's weight and scale where its weight was),
    with a function fetching each. ``model`` may be a meta skeleton: only its names are read. ``inputs`` (the
    per-tensor FP8 of the calibrated FP8 scheme): runtime linear name -> largest calibration input, made into each
    linear's ``input_scale``; its weight scale is shared by the linears vLLM fuses (vLLM requantizes a fused layer's
    shards to the largest of their scales, so one scale makes every client read the same weights).
    -> (entries, fetch, the runtime names of the quantized linears)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    entries: list[Entry] = []
    fetch: dict[str, Callable[[], torch.Tensor]] = {}
    quantized = []
    fused = FusedAmax(base, family)
    shared = lambda name: fp8.tensor_scale(fused(name), base.dtype)  # noqa: E731
    for name in model.state_dict().keys():
        if tied and name == f"{family.lm_head}.weight":
            continue
        key = family.to_disk(name)
        if not is_fp8_linear(family, name) or (fmt is Fp8Format.BLOCK and block_refused(family, base, name)):
            entries.append((key, *base.meta(name)))
            fetch[key] = lambda name=name: base.get(name)
            continue
        quantized.append(name[: -len(".weight")])
        n, k = base.meta(name)[1]
        head = key[: -len("weight")]
        for tensor, (shape, dtype) in fmt.tensor_shapes(k, n, base.dtype).items():
            entries.append((head + tensor, dtype, shape))
        if fmt is Fp8Format.TENSOR:
            fetch[key] = lambda name=name, key=key: fmt.pack(base.get(name), key, base.dtype, shared(name))["weight"]
            fetch[head + fmt.scale_name] = lambda name=name: shared(name)
            amax = fused_input_amax(family, inputs, name, SCHEME_NAMES[fmt])  # before anything is written
            for tensor, (shape, dtype) in fmt.input_tensors(base.dtype).items():
                entries.append((head + tensor, dtype, shape))
                fetch[head + tensor] = lambda amax=amax, tensor=tensor: fmt.input_pack(amax, base.dtype)[tensor]
            continue
        fetch[key] = lambda name=name, key=key: fmt.pack(base.get(name), key, base.dtype)["weight"]
        fetch[head + fmt.scale_name] = lambda name=name, key=key: fmt.scale(base.get(name), key, base.dtype)
    for key in base.carried():  # the MTP head of Qwen3.5: in the checkpoint's bytes, never quantized
        entries.append((key, *base.raw_meta(key)))
        fetch[key] = lambda key=key: base.raw(key)
    return entries, fetch, quantized


def block_refused(family: ModelFamily, base: CheckpointTensors, runtime_name: str) -> bool:
    """Block FP8 only: whether vLLM refuses, block-wise, the fused layer of the decoder linear whose weight is
    ``runtime_name``. A layer fusing several linears needs each of them but the last in whole blocks of
    ``fp8.BLOCK[0]`` rows (vLLM 0.33's ``validate_fp8_block_shape``; at TP > 1 every shard, which ``inspect``
    reports). Qwen3.5's in_proj_b / in_proj_a (one row per value head, fused as in_proj_ba) are not: such a layer
    stays in the checkpoint dtype, listed in ``modules_to_not_convert``, as Qwen's own FP8 checkpoints keep it."""
    parts = fused_siblings(family, runtime_name)
    return len(parts) > 1 and any(base.meta(p)[1][0] % fp8.BLOCK[0] for p in parts[:-1])


def not_converted_modules(model, family: ModelFamily, kept: list[str] = (), carried: list[str] = ()) -> list[str]:
    """``modules_to_not_convert`` of a block-FP8 export: the family's names (``not_converted_names``: both layouts
    and the bare leaf, for transformers' prefix / suffix match), every matrix-holding module of the vision tower
    (its linears, and Qwen3-VL's position embedding, which inspect's rules cannot tell from one) and the decoder
    linears ``kept`` (``block_refused``; runtime paths) and the family's own ``kept`` (routers: vLLM's Qwen3-VL-MoE
    builds its ``GateLinear`` with the quantization config, FP8 over the bf16 weight unless named) named whole in
    both layouts, as Qwen's own FP8 checkpoints list them, since vLLM's ``Fp8Config`` matches only exact names.
    ``carried``: the matrices the export copies unquantized from the base (checkpoint keys: Qwen3.5's MTP head),
    named by module; an MoE layer's experts by the layer (``mtp.layers.0.mlp.experts``, which vLLM's exact match
    finds inside every expert's name). vLLM's MTP drafter (``qwen3_5_mtp.py``) builds ``mtp.fc`` and its layers
    with the checkpoint's quantization config under these names, no name mapper applied."""
    vision = [name for name, m in model.named_modules() if name.startswith(family.vision_tower + ".")
              and isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    routers = [name for name, _ in model.named_modules()
               if family.is_layer_key(name) and name.endswith(tuple(f".{k}" for k in family.kept))]
    whole = [form for name in vision + list(kept) + routers for form in (family.to_disk(name + ".")[:-1], name)]
    experts = f".{family.experts}." if family.experts else None
    heads = [key.removesuffix(".weight") for key in carried]
    heads = [h[: h.index(experts) + len(experts) - 1] if experts and experts in h else h for h in heads]
    return list(dict.fromkeys(family.not_converted_names() + whole + heads))


def carried_matrices(base: CheckpointTensors) -> list[str]:
    """The checkpoint keys of the 2-D weights the export copies from the base unquantized (``carried``: Qwen3.5's
    MTP head): the modules a block-FP8 config must name to keep them so."""
    return [key for key in base.carried() if key.endswith(".weight") and len(base.raw_meta(key)[1]) == 2]


def export_fp8(model, processor, base: CheckpointTensors, fmt: Fp8Format | Int8Format, out: str | pathlib.Path,
               report: Callable[[list[str]], dict], options: ExportConfig = ExportConfig(),
               base_folder: pathlib.Path | None = None, inputs: Mapping[str, float] | None = None) -> pathlib.Path:
    """Write the FP8 (or INT8 W8A8, ``Int8Format``: the same weight-and-scale plan) export of the checkpoint
    ``base`` reads to ``out``, published atomically. ``model``: the model's meta skeleton (names and config
    only); ``report``: makes the report from the quantized linears' names once the tensors are written;
    ``inputs``: the calibrated input ranges ``Fp8Format.TENSOR`` needs (``plan_fp8``). -> the published folder."""
    family = base.family
    tmp = temp_dir(out)
    try:
        entries, fetch, quantized = plan_fp8(model, family, base, fmt, inputs)
        write_shards(entries, fetch, tmp, options.max_shard_bytes)
        config = copy.deepcopy(model.config)
        kept = [n for n in quantized_linears(model, family) if n not in set(quantized)]  # block_refused
        config.quantization_config = w8a8_quantization_config(fmt, family) if isinstance(fmt, Int8Format) else \
            fp8_quantization_config(fmt, family, not_converted_modules(model, family, kept, carried_matrices(base)))
        config.dtype = str(base.dtype).removeprefix("torch.")
        return finish_export(tmp, config, processor, base_folder, lambda: report(quantized), out, options)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class SmoothedTensors:
    """The base checkpoint's tensors (a ``CheckpointTensors``) with a calibration pass's SmoothQuant fold replayed
    (``smoothing``: an ``engine.calibration.Smoothing``): a folded norm or bias as the smoothed layer held it, a
    scaled linear's weight in float32 with its scales applied (``smoothing.fold``), anything else as stored. What
    an NVFP4 W4A4 export with smoothing reads in place of the checkpoint; one tensor in memory at a time, as there."""

    def __init__(self, base: CheckpointTensors, smoothing):
        self.base, self.smoothing = base, smoothing
        self.family, self.dtype = base.family, base.dtype

    def get(self, runtime_name: str) -> torch.Tensor:
        replaced = self.smoothing.replaced.get(runtime_name)
        if replaced is not None:
            return replaced
        return self.smoothing.fold(runtime_name, self.base.get(runtime_name))

    def meta(self, runtime_name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.base.meta(runtime_name)

    def carried(self) -> list[str]:
        return self.base.carried()

    def raw_meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.base.raw_meta(key)

    def raw(self, key: str) -> torch.Tensor:
        return self.base.raw(key)


def fused_siblings(family: ModelFamily, runtime_name: str) -> list[str]:
    """The weights of the linears vLLM fuses with the decoder linear whose weight is ``runtime_name`` (q/k/v,
    gate/up: the layer's ``fused``), itself included, in the family's order; [itself] when it is fused with none."""
    inside = runtime_name[len(family.decoder_layers) + 1: -len(".weight")]  # "3.self_attn.q_proj"
    index, _, linear = inside.partition(".")
    layer = family.at(int(index))
    parts = next((parts for _, parts in layer.fused if linear in parts), (linear,))
    return [f"{family.decoder_layers}.{index}.{part}.weight" for part in parts]


def plan_nvfp4(model, family: ModelFamily, base: CheckpointTensors, fmt: Nvfp4Format,
               inputs: Mapping[str, float] | None = None
               ) -> tuple[list[Entry], dict[str, Callable[[], torch.Tensor]], list[str]]:
    """``plan_fp8`` for NVFP4: every tensor of the export in state-dict order, a quantized linear's three tensors
    where its weight was. Each linear's global scale comes from the largest magnitude of the linears vLLM fuses
    with it (read once each and kept as one number), so a fused layer has one; the group scales and the packed
    codes are each computed when written (safetensors orders them by dtype), reading the weight again. W4A4
    (``inputs``: runtime linear name -> largest calibration input) adds each linear's ``input_global_scale``, one
    per fused layer too. -> (entries, fetch, the runtime names of the quantized linears)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    entries: list[Entry] = []
    fetch: dict[str, Callable[[], torch.Tensor]] = {}
    quantized = []
    fused = FusedAmax(base, family)

    def shared_global(name: str) -> torch.Tensor:
        return nvfp4.global_scale(fused(name))

    def packed(name: str, key: str, tensor: str) -> torch.Tensor:
        if tensor == "weight_global_scale":
            return shared_global(name)
        codes, scale, _ = nvfp4.quantize(base.get(name), shared_global(name), key)
        return scale if tensor == "weight_scale" else nvfp4.pack(codes)

    for name in model.state_dict().keys():
        if tied and name == f"{family.lm_head}.weight":
            continue
        key = family.to_disk(name)
        if not is_fp8_linear(family, name):
            entries.append((key, *base.meta(name)))
            fetch[key] = lambda name=name: base.get(name)
            continue
        quantized.append(name[: -len(".weight")])
        n, k = base.meta(name)[1]
        if k % nvfp4.GROUP:  # before anything is written
            raise ValueError(f"{key} is [{n}, {k}]: NVFP4 needs in_features in whole groups of {nvfp4.GROUP}; "
                             "use an FP8 scheme or the integer methods for this model")
        head = key[: -len("weight")]
        for tensor, (shape, dtype) in fmt.tensor_shapes(k, n).items():
            entries.append((head + tensor, dtype, shape))
            fetch[head + tensor] = lambda name=name, key=key, tensor=tensor: packed(name, key, tensor)
        if fmt.static_activations:
            amax = fused_input_amax(family, inputs, name, SCHEME_NAMES[fmt])  # before anything is written
            for tensor, (shape, dtype) in fmt.input_tensors().items():
                entries.append((head + tensor, dtype, shape))
                fetch[head + tensor] = lambda amax=amax, tensor=tensor: fmt.input_pack(amax)[tensor]
    for key in base.carried():  # the MTP head of Qwen3.5: in the checkpoint's bytes, never quantized
        entries.append((key, *base.raw_meta(key)))
        fetch[key] = lambda key=key: base.raw(key)
    return entries, fetch, quantized


def export_nvfp4(model, processor, base: CheckpointTensors, fmt: Nvfp4Format, out: str | pathlib.Path,
                 report: Callable[[list[str]], dict], options: ExportConfig = ExportConfig(),
                 base_folder: pathlib.Path | None = None, inputs: Mapping[str, float] | None = None) -> pathlib.Path:
    """``export_fp8`` for NVFP4 (compressed-tensors ``nvfp4-pack-quantized``): weight-only NVFP4A16, or W4A4 with
    the calibrated input ranges ``inputs``. -> the published folder."""
    family = base.family
    tmp = temp_dir(out)
    try:
        entries, fetch, quantized = plan_nvfp4(model, family, base, fmt, inputs)
        write_shards(entries, fetch, tmp, options.max_shard_bytes)
        config = copy.deepcopy(model.config)
        config.quantization_config = nvfp4_quantization_config(fmt, family)
        config.dtype = str(base.dtype).removeprefix("torch.")
        return finish_export(tmp, config, processor, base_folder, lambda: report(quantized), out, options)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


SHAPE_ONLY = ("g_idx", "weight_shape")  # packed tensors ``plan_rtn`` writes from the shape alone, never kept waiting


def plan_rtn(model, family: ModelFamily, base: CheckpointTensors, modules: ModulePlan,
             fmt: PackFormat) -> tuple[list[Entry], dict[str, Callable[[], torch.Tensor]], list[str]]:
    """Round-to-nearest needs no activations: every tensor of the export in the layer loop's order (a quantized
    linear's packed tensors where its weight was; the same bytes the loop writes), each linear rounded from the
    checkpoint when its first packed tensor is written and its other tensors kept until theirs are (the file
    groups tensors by dtype: a linear's scales wait for the float16 pass; they are small). The group index and
    the shape are written without rounding anything. -> (entries, fetch, the runtime names of the linears rounded)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    entries: list[Entry] = []
    fetch: dict[str, Callable[[], torch.Tensor]] = {}
    quantized = []
    waiting: dict[str, torch.Tensor] = {}  # packed tensors computed, not yet written

    def packed(name: str, key: str, spec) -> torch.Tensor:
        if key not in waiting:
            head = family.to_disk(name)[: -len("weight")]
            waiting.update({head + t: v for t, v in pack_rtn(base.get(name), spec, fmt).items() if t not in SHAPE_ONLY})
        return waiting.pop(key)

    for name in model.state_dict().keys():
        if tied and name == f"{family.lm_head}.weight":
            continue
        key = family.to_disk(name)
        linear = name[: -len(".weight")]
        cfg = modules.config_for(linear) if is_fp8_linear(family, name) else None
        if cfg is None:  # not a decoder linear, or skipped by a rule: as the base holds it
            entries.append((key, *base.meta(name)))
            fetch[key] = lambda name=name: base.get(name)
            continue
        quantized.append(linear)
        n, k = base.meta(name)[1]
        head = key[: -len("weight")]
        for tensor, (shape, dtype) in fmt.tensor_shapes(k, n, cfg.spec).items():
            entries.append((head + tensor, dtype, shape))
            cheap = {"g_idx": lambda spec=cfg.spec, k=k: default_g_idx(k, spec).to(torch.int32),
                     "weight_shape": lambda n=n, k=k: torch.tensor([n, k], dtype=torch.int64)}.get(tensor)
            fetch[head + tensor] = cheap or (lambda name=name, key=head + tensor, spec=cfg.spec: packed(name, key, spec))
    for key in base.carried():  # as the layer loop's export: after the model's own, in the checkpoint's bytes
        entries.append((key, *base.raw_meta(key)))
        fetch[key] = lambda key=key: base.raw(key)
    return entries, fetch, quantized


def rounding_order(entries: list[Entry], family: ModelFamily, quantized: list[str],
                   max_shard_bytes: int | None) -> list[str]:
    """The weights ``plan_rtn``'s export reads, in the order it reads them: each linear's when the first of its
    packed tensors is written (shards in turn, each file in its own order). -> runtime weight names."""
    linear_of = {family.to_disk(name + ".weight")[: -len("weight")]: name + ".weight" for name in quantized}
    order: dict[str, None] = {}
    for shard in plan_shards(entries, max_shard_bytes):
        for key in file_order(shard):
            head, _, tensor = key.rpartition(".")
            if head + "." in linear_of and tensor not in SHAPE_ONLY:
                order.setdefault(linear_of[head + "."])
    return list(order)


def export_rtn(model, processor, base: CheckpointTensors, qcfg: QuantConfig, modules: ModulePlan, fmt: PackFormat,
               out: str | pathlib.Path, report: Callable[[list[str]], dict], options: ExportConfig = ExportConfig(),
               base_folder: pathlib.Path | None = None) -> pathlib.Path:
    """The RTN export of the checkpoint ``base`` reads, straight from its shards to ``out`` (published atomically):
    no calibration, no forward pass, one tensor in memory at a time, the bytes the layer loop would write.
    -> the published folder."""
    family = base.family
    num_layers = len(model.get_submodule(family.decoder_layers))
    tmp = temp_dir(out)
    try:
        entries, fetch, quantized = plan_rtn(model, family, base, modules, fmt)
        with base.read_ahead(rounding_order(entries, family, quantized, options.max_shard_bytes)):
            write_shards(entries, fetch, tmp, options.max_shard_bytes)
        config = copy.deepcopy(model.config)
        config.quantization_config = quantization_config(qcfg, fmt, family, num_layers,
                                                         modules if modules.mixed else None)
        config.dtype = str(base.dtype).removeprefix("torch.")
        return finish_export(tmp, config, processor, base_folder, lambda: report(quantized), out, options)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
