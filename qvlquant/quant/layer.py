"""What the per-layer methods and the layer loop share: a decoder layer's captured inputs, replaying the layer,
the one hook helper, the phases the loop times, and the context a method reports each finished linear to."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from typing import Callable, Iterable

import torch

from qvlquant.families import ModelFamily
from qvlquant.parallel.distributed import (
    SINGLE,
    World,
    assign,
    each,
    total,
    total_count,
)
from qvlquant.quant.formats import QuantizedWeight
from qvlquant.quant.rules import ModulePlan
from qvlquant.quant.spec import QuantConfig


class Phase(str, enum.Enum):
    """Where a layer's time goes; the values are the keys of ``phase_seconds`` in quantize_report.json. The loop
    switches to capture, load, pack, share (distributed), replay and save itself; a method names each of the others
    as it enters it (``LayerContext.step``), per linear where it works linear by linear. Packing a finished linear
    (``LayerContext.finish``) and sharing finished linears (``settle``) go back to the phase the method was in, so
    the next linear's work is never timed as packing or as the loop's ``quantize``."""

    CAPTURE = "capture"  # layer 0's inputs, through the vision tower and embeddings
    LOAD = "load"  # a decoder layer read from the checkpoint
    HESSIAN = "hessian"  # GPTQ: replaying the layer to sum X^T X
    SOLVE = "solve"  # GPTQ: each linear's solve (the Hessian's factorisation and the column-by-column loop)
    INPUTS = "inputs"  # AWQ, SmoothQuant: replaying the layer to keep its linears' inputs
    SCALE = "scale"  # AWQ: the scale search and folding the scales (SmoothQuant: its smoothing scales)
    CLIP = "clip"  # AWQ: the clipping search (its Gram matrices included)
    QUANTIZE = "quantize"  # rounding to nearest: RTN, AWQ's own, the linears GPTQ or a rule rounds to nearest
    PACK = "pack"  # codes packed into the export layout, the layer's other tensors recorded
    SHARE = "share"  # a distributed run: finished linears handed from their rank to all
    REPLAY = "replay"  # the quantized layer's outputs: the next layer's inputs
    SAVE = "save"  # the layer's record and the next inputs written to the store


class QuantizationError(RuntimeError):
    """Quantization could not go on; the message names the layer."""


@dataclasses.dataclass
class LayerInput:
    hidden: torch.Tensor  # [B, S, H]
    kwargs: dict  # what the HF model passed to the layer: attention_mask, position_embeddings (cos, sin), ...
    token_mask: torch.Tensor  # [B, S] bool: real tokens (padding excluded from statistics)
    # Qwen3-VL DeepStack: [B, S] bool mask of visual tokens, and per early layer the features [V, H] added there
    visual_pos_masks: torch.Tensor | None = None
    deepstack: list | None = None
    vision_mask: torch.Tensor | None = None  # [B, S] bool: image / video tokens (for vision-token weighting)
    # Hybrid models: what layers of each type receive (their attention masks differ), {layer type: kwargs}
    kwargs_of: dict[str, dict] | None = None

    def of_type(self, layer_type: str | None) -> "LayerInput":
        """The input as a layer of ``layer_type`` receives it (itself when the layers are alike)."""
        if layer_type is None or self.kwargs_of is None or self.kwargs_of.get(layer_type) is self.kwargs:
            return self
        return dataclasses.replace(self, kwargs=self.kwargs_of[layer_type])

    def token_weight(self, vision_weight: float) -> torch.Tensor | None:
        """[B, S] weight of each token in GPTQ's Hessian: ``vision_weight`` for image / video tokens, 1 for text
        (None when every weight is 1)."""
        if vision_weight == 1.0 or self.vision_mask is None:
            return None
        return torch.where(self.vision_mask, vision_weight, 1.0).to(self.hidden.device)

    def to(self, device) -> "LayerInput":
        """The same input on ``device`` (tensors inside kwargs too); itself when already there."""
        if self.hidden.device == torch.device(device):
            return self
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        moved = lambda kw: {k: tuple(move(t) for t in v) if isinstance(v, tuple) else move(v)  # noqa: E731
                            for k, v in kw.items()}
        kwargs = moved(self.kwargs)
        deepstack = None if self.deepstack is None else [move(t) for t in self.deepstack]
        kwargs_of = None if self.kwargs_of is None else {t: kwargs if kw is self.kwargs else moved(kw)
                                                          for t, kw in self.kwargs_of.items()}
        return LayerInput(move(self.hidden), kwargs, move(self.token_mask), move(self.visual_pos_masks), deepstack,
                          move(self.vision_mask), kwargs_of)

    def nbytes(self) -> int:
        tensors = [self.hidden, self.token_mask] + [t for v in self.kwargs.values()
                                                    for t in (v if isinstance(v, tuple) else (v,))
                                                    if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def layer_device(layer: torch.nn.Module) -> torch.device:
    return next(layer.parameters()).device


@torch.no_grad()
def run_layer(layer: torch.nn.Module, x: LayerInput) -> torch.Tensor:
    """The layer's output hidden states [B, S, H], computed where the layer lives (inputs moved there)."""
    x = x.to(layer_device(layer))
    out = layer(x.hidden, use_cache=False, **x.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def next_input(index: int, layer: torch.nn.Module, x: LayerInput) -> LayerInput:
    """What decoder layer ``index + 1`` receives: this layer's output, plus DeepStack features where the HF forward
    adds them (Qwen3-VL, after each of the first len(deepstack) layers). Stays on ``x``'s device."""
    hidden = run_layer(layer, x).to(x.hidden.device)
    if x.deepstack is not None and index < len(x.deepstack):
        hidden = hidden.clone()
        hidden[x.visual_pos_masks] = hidden[x.visual_pos_masks] + x.deepstack[index].to(hidden)
    return dataclasses.replace(x, hidden=hidden)


@contextlib.contextmanager
def hooked(pairs: Iterable[tuple[torch.nn.Module, Callable]], pre: bool = False, with_kwargs: bool = False):
    """Register ``hook`` on each ``module`` (forward hooks, or pre-hooks) for the block; always removed after."""
    handles = []
    try:
        for module, hook in pairs:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()


def rows_of(module: torch.nn.Module, per_token: torch.Tensor | None) -> torch.Tensor | None:
    """A per-token tensor of the batch ([B, S, ...]: the real-token mask, the token weights) for the rows
    ``module`` sees: all of them, or for an expert's linear (``qvlquant.engine.experts``) the tokens routed to it,
    whose flat indices it carries as ``routed_rows`` while it runs."""
    rows = getattr(module, "routed_rows", None)
    if per_token is None or rows is None:
        return per_token
    return per_token.reshape(-1, *per_token.shape[2:])[rows.to(per_token.device)]


@contextlib.contextmanager
def experts_on_all_tokens(layer: torch.nn.Module, family: ModelFamily, experts):
    """While open, the experts ``experts`` (indices) of ``layer``'s MoE block run on every token of the batch, so
    hooks on their linears see all of them (the block's output still takes each expert's output for its routed
    tokens only): how a rarely reached expert is calibrated on all tokens (``QuantConfig.rare_experts``). The block
    (``qvlquant.engine.experts.ExpertLinears``) reads the set as ``all_tokens``."""
    block = layer.get_submodule(family.experts)
    block.all_tokens = frozenset(experts)
    try:
        yield
    finally:
        block.all_tokens = frozenset()


class StopReplay(Exception):
    """Raised by a replay hook once it has seen what it needs: the rest of the layer does not run."""


def replay(layer: torch.nn.Module, inputs: list[LayerInput], pairs: Iterable[tuple[torch.nn.Module, Callable]],
           before_each: Callable[[LayerInput], None] | None = None) -> None:
    """Run ``layer`` over every input with forward hooks ``pairs`` registered (``before_each(x)`` first); a hook
    may end one input's run early by raising ``StopReplay``."""
    with hooked(list(pairs)):
        for x in inputs:
            if before_each is not None:
                before_each(x)
            try:
                run_layer(layer, x)
            except StopReplay:
                pass


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise QuantizationError(
            f"non-finite values (NaN/inf) in {where}: compute in float32 or bfloat16, not float16, and check the model"
        )


def set_weight(linear: torch.nn.Linear, w: QuantizedWeight) -> None:
    """Give ``linear`` the dequantized weight, bit-identical to what a reloaded QuantLinear computes."""
    linear.weight.data = w.dequantize().to(device=linear.weight.device, dtype=linear.weight.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerContext:
    """What a per-layer method needs besides the layer and its inputs. ``finish(name, weight, info)`` is called
    once per linear as soon as it is quantized: it packs the codes, gives the linear its dequantized weight and
    records the result, so no layer's int32 codes outlive their linear (timed as ``Phase.PACK``; the clock then
    goes back to the phase the method was in).

    In a distributed run (``world``) each linear is solved by one rank (``owners``): the method calls ``finish``
    for the linears this rank solved, then ``settle(owners)`` on every rank, which hands each of those linears from
    its owner to all ranks (in one process ``settle`` has nothing to do). ``total`` sums a statistic over every
    rank's calibration tokens, in rank order."""

    family: ModelFamily
    qcfg: QuantConfig
    prefix: str  # runtime path of the layer, for messages: model.language_model.layers.3
    storage_dtype: torch.dtype  # what the export writes: AWQ's folded parameters are rounded to it
    finish: Callable[[str, QuantizedWeight, dict], None]
    # progress inside the layer: the phase entered and what is being done (text for the progress bar)
    step: Callable[[Phase, str], None] = lambda phase, what: None
    world: World = SINGLE
    settle: Callable[[dict[str, int]], None] = lambda owners: None
    modules: ModulePlan | None = None  # per-module rules (None: ``qcfg`` for every linear)

    def fail(self, name: str, why: str) -> QuantizationError:
        return QuantizationError(f"{self.prefix}.{name}: {why}")

    def config(self, name: str) -> QuantConfig | None:
        """The settings of linear ``name`` of this layer (None: skipped, kept in the checkpoint's dtype)."""
        return self.qcfg if self.modules is None else self.modules.config_for(f"{self.prefix}.{name}")

    def quantized(self, names) -> list[str]:
        """``names`` less the skipped ones."""
        return [n for n in names if self.config(n) is not None]

    def owners(self, layer: torch.nn.Module, names) -> dict[str, int]:
        """linear -> the rank that solves it, balanced by weight size (every rank computes the same)."""
        return assign({n: layer.get_submodule(n).weight.numel() for n in names}, self.world)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return total(t, self.world)

    def total_count(self, n: int) -> int:
        return total_count(n, self.world)

    def each(self, n: int) -> list[int]:
        return each(n, self.world)
