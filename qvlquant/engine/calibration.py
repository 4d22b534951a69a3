"""The calibration pass of the calibrated schemes (``--scheme FP8`` / ``NVFP4``): the largest magnitude each decoder
linear's input reaches over the real (unpadded) calibration tokens, from which the export makes the static
activation scales (FP8's ``input_scale``, NVFP4's ``input_global_scale``: ``qvlquant.quant.formats``).

It streams like the sensitivity pass: capture layer 0's inputs, then one decoder layer at a time from a
``LayerSource`` (the checkpoint, ``engine.streaming.StreamedLayers``), run once over every batch with a hook on each
observed linear (that run's outputs are the next layer's inputs), released. The layers run in full precision, as
llm-compressor calibrates these presets (its sequential pipeline disables quantization while observing, and its
FP8 / NVFP4 weights are not changed in place), so every layer sees the activations of the unquantized model. The
vision tower is never observed: only decoder linears are. Memory holds one layer and the calibration activations.

    ranges = input_ranges(skeleton, batches, family, names, source)   # InputRanges, names: runtime linear paths

NVFP4 W4A4 smooths first (``Smoothing``: SmoothQuant, the W8A8 path's ``quant.apply.smooth_layer``, folded into each
layer's norms and linears as it is loaded); its linears are then observed smoothed, and the export replays the same
fold onto the checkpoint's tensors as it streams them (``checkpoint.datafree.SmoothedTensors``). What is kept for
that is one scale vector per smoothing group and the folded norms, never the layers' weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from qvlquant.engine.loop import InMemoryLayers, LayerSource, capture_inputs
from qvlquant.families import ModelFamily
from qvlquant.quant.apply import smooth_layer
from qvlquant.quant.layer import LayerContext, LayerInput, QuantizationError, hooked, next_input, rows_of
from qvlquant.quant.spec import QuantConfig
from qvlquant.ui.progress import progress


@dataclasses.dataclass(frozen=True)
class InputRanges:
    """What the pass measured: runtime linear name -> the largest |x| among its inputs' real tokens."""

    amax: Mapping[str, float]
    tokens: int  # real (unpadded) calibration tokens every decoder linear saw (a MoE expert's: its routed share)
    seconds: float


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` [..., K] that are real tokens (``mask`` [...] bool; None: all). -> [T, K]."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).to(x.device)]


def input_amax(x: torch.Tensor, mask: torch.Tensor | None) -> float | None:
    """The largest |x| over the real tokens of ``x`` [..., K]; None when there are none."""
    rows = real_rows(x, mask)
    return float(rows.abs().max()) if rows.numel() else None


@torch.no_grad()
def observe_layer(index: int, layer: torch.nn.Module, inputs: list[LayerInput], names: Sequence[str],
                  amax: dict[str, float]) -> list[LayerInput]:
    """Run decoder layer ``index`` once over ``inputs`` with a hook on each linear ``names`` (paths inside the
    layer) raising ``amax[name]`` to the largest |x| it receives on real tokens. -> the next layer's inputs."""
    current: dict = {}

    def hook_for(name: str):
        def hook(module, args, output):
            seen = input_amax(args[0], rows_of(module, current["mask"]))
            if seen is not None:
                prev = amax.get(name, 0.0)
                amax[name] = math.nan if math.isnan(seen) or math.isnan(prev) else max(prev, seen)  # NaN stays

        return hook

    out = []
    with hooked([(layer.get_submodule(n), hook_for(n)) for n in names]):
        for x in inputs:
            current["mask"] = x.token_mask
            out.append(next_input(index, layer, x))
    return out


def by_layer(family: ModelFamily, names: Sequence[str]) -> dict[int, list[str]]:
    """Runtime linear paths -> {decoder layer index: [path inside the layer]}, in the given order."""
    out: dict[int, list[str]] = {}
    for name in names:
        index, _, inside = name[len(family.decoder_layers) + 1:].partition(".")
        if not (name.startswith(family.decoder_layers + ".") and index.isdigit() and inside):
            raise ValueError(f"{name} is not a linear of {family.name}'s decoder layers ({family.decoder_layers}.N.*)")
        out.setdefault(int(index), []).append(inside)
    return out


def _no_finish(name: str, weight, info: dict) -> None:
    raise RuntimeError(f"{name}: smoothing rounds nothing")  # smooth_layer never calls it


@dataclasses.dataclass
class Smoothing:
    """SmoothQuant before the observation of a calibrated scheme (NVFP4 W4A4), called on each decoder layer as it
    is loaded: ``quant.apply.smooth_layer`` (the calibrated W8A8's) with the fixed migration strength ``strength``
    folds its scales into the layer in place, and what the export needs to write the same smoothed model from the
    checkpoint is recorded:

    - ``scales``: runtime weight name -> [("columns" | "rows", s [K] float32)], in the order they were folded (a
      smoothed linear's input columns times s; a previous linear's output rows divided by s);
    - ``replaced``: runtime name -> the folded tensor in the storage dtype (a norm's weight, a previous linear's
      bias), as the layer holds it;
    - ``groups``: runtime name of each norm or linear scales were folded into -> the strength."""

    strength: float
    storage_dtype: torch.dtype
    qcfg: QuantConfig = QuantConfig()
    scales: dict[str, list[tuple[str, torch.Tensor]]] = dataclasses.field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    groups: dict[str, float] = dataclasses.field(default_factory=dict)

    def __call__(self, index: int, family: ModelFamily, layer: torch.nn.Module, inputs: list[LayerInput]) -> None:
        prefix = f"{family.decoder_layers}.{index}"
        ctx = LayerContext(family=family.at(index), qcfg=self.qcfg, prefix=prefix, storage_dtype=self.storage_dtype,
                           finish=_no_finish)
        folded: list = []
        smooth_layer(layer, inputs, ctx, self.strength, folded)
        for group, s in folded:
            s = s.detach().float().cpu()
            for name in group.linears:
                self.scales.setdefault(f"{prefix}.{name}.weight", []).append(("columns", s))
            prev = layer.get_submodule(group.prev)
            if isinstance(prev, torch.nn.Linear):
                self.scales.setdefault(f"{prefix}.{group.prev}.weight", []).append(("rows", s))
                if prev.bias is not None:
                    self.replaced[f"{prefix}.{group.prev}.bias"] = prev.bias.data.to(self.storage_dtype).cpu()
            else:
                self.replaced[f"{prefix}.{group.prev}.weight"] = prev.weight.data.to(self.storage_dtype).cpu()
            self.groups[f"{prefix}.{group.prev}"] = self.strength

    def fold(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The checkpoint's weight at runtime name ``name`` with the recorded scales applied in the order the layer
        folded them, in float32 (the values the smoothed layer held when it computed in float32); unchanged when no
        group scaled it."""
        steps = self.scales.get(name)
        if not steps:
            return weight
        w = weight.float()
        for kind, s in steps:
            w = w * s.view(1, -1) if kind == "columns" else w / s.view(-1, 1)
        return w


@torch.no_grad()
def input_ranges(model, batches: list[dict], family: ModelFamily, names: Sequence[str],
                 source: LayerSource | None = None, offload: str | None = None,
                 prepare: Callable[[int, ModelFamily, torch.nn.Module, list[LayerInput]], None] | None = None
                 ) -> InputRanges:
    """The pass: capture, then per decoder layer load it from ``source``, observe the linears of ``names`` (runtime
    paths) among it while it computes the next layer's inputs, release it. ``prepare(index, family, layer,
    inputs)``, where given, changes each layer in place before it is observed (``Smoothing``). A linear that
    received no real token, or a non-finite value, is an error naming it."""
    t0 = time.time()
    source = source or InMemoryLayers(model, family)
    wanted = by_layer(family, names)
    inputs = capture_inputs(model, family, batches, offload)
    source.after_capture()
    tokens = int(sum(x.token_mask.sum() for x in inputs))
    amax: dict[str, float] = {}
    for i in progress(range(len(model.get_submodule(family.decoder_layers))), desc="calibrate activations",
                      unit="layer"):
        prefix = f"{family.decoder_layers}.{i}"
        layer = source.load(i)
        inputs = [x.of_type(family.layer_type(i)) for x in inputs]  # hybrid models: this layer type's mask
        if prepare is not None:
            prepare(i, family, layer, inputs)
        seen: dict[str, float] = {}
        inputs = observe_layer(i, layer, inputs, wanted.get(i, []), seen)
        amax.update({f"{prefix}.{n}": v for n, v in seen.items()})
        source.release(i)
    for name in names:
        if name not in amax:
            raise QuantizationError(f"{name}: received no calibration tokens, so it has no activation scale; add "
                                    "samples (--num-samples) or use a data-free scheme")
        if not math.isfinite(amax[name]):
            raise QuantizationError(f"{name}: its calibration inputs hold NaN or infinite values; compute in "
                                    "float32 or bfloat16, not float16, and check the model")
    return InputRanges({name: amax[name] for name in names}, tokens, time.time() - t0)
