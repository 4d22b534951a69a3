"""The layer-by-layer loop: capture what decoder layer 0 receives, then quantize and replay one layer at a time.

Layer 0's inputs are captured with a forward pre-hook on the real HF forward, so the hidden states (text embeddings
with the vision tower's features merged in) and the M-RoPE position embeddings are exactly what transformers
computed. Each layer is then quantized from those inputs and replayed; its quantized outputs become the next
layer's inputs. The vision tower, the embeddings and lm_head are never touched.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from qvlquant.families import ModelFamily
from qvlquant.progress import progress
from qvlquant.quant.formats import PackFormat, QuantizedWeight
from qvlquant.quant.rtn import QuantSpec

_DROP_KWARGS = ("past_key_values", "use_cache", "past_key_value", "cache_position")


class _StopForward(Exception):
    """Raised by the capture hook so the rest of the model does not run (private: never escapes capture())."""


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


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"  # rtn | gptq | awq
    spec: QuantSpec = QuantSpec()
    damp_percent: float = 0.1
    damp_max: float = 1.0  # damping is raised step by step up to this before giving up
    block_size: int = 128
    desc_act: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    awq_grid: int = 20
    awq_clip: bool = True
    awq_max_tokens: int = 4096  # tokens kept per linear for AWQ's statistics and clipping search
    storage_dtype: torch.dtype = torch.bfloat16  # what the export writes: folded AWQ scales are rounded to it
    export_format: str = "auto"  # auto: GPTQ layout (rtn, gptq) or AWQ GEMM (awq); or "compressed-tensors"

    def __post_init__(self):
        if self.export_format not in ("auto", "compressed-tensors"):
            raise ValueError(f"export format must be 'auto' or 'compressed-tensors', got {self.export_format!r}")

    @property
    def pack_format(self) -> PackFormat:
        if self.export_format == "compressed-tensors":
            return PackFormat.COMPRESSED
        return PackFormat.AWQ_GEMM if self.method == "awq" else PackFormat.GPTQ


@dataclasses.dataclass
class QuantResult:
    weights: dict[str, QuantizedWeight]  # runtime module name -> quantized weight
    layer_info: dict[str, dict]  # runtime module name -> what the method recorded (damping, scales, error)
    seconds: float = 0.0


@torch.no_grad()
def capture_inputs(model, family: ModelFamily, batches: list[dict]) -> list[LayerInput]:
    """Run the real forward on each batch and keep what decoder layer 0 receives."""
    layer0 = model.get_submodule(family.decoder_layers)[0]
    captured: list[LayerInput] = []
    mask_of_batch: list[torch.Tensor] = []
    deepstack: dict = {}

    def text_model_hook(module, args, kwargs):
        deepstack["masks"] = kwargs.get("visual_pos_masks")
        deepstack["embeds"] = kwargs.get("deepstack_visual_embeds")

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kept = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"}
        x = LayerInput(hidden.detach(), kept, mask_of_batch[-1])
        if family.deepstack and deepstack.get("embeds") is not None:
            x.visual_pos_masks, x.deepstack = deepstack["masks"], [e.detach() for e in deepstack["embeds"]]
        captured.append(x)
        raise _StopForward

    handles = [layer0.register_forward_pre_hook(hook, with_kwargs=True)]
    if family.deepstack:
        text_model = model.get_submodule(family.language_model)
        handles.append(text_model.register_forward_pre_hook(text_model_hook, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask_of_batch.append(batch["attention_mask"].bool().to(device))
            try:
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(captured) != len(batches):
        raise QuantizationError(f"captured inputs for {len(captured)} of {len(batches)} batches")
    return captured


@torch.no_grad()
def run_layer(layer: torch.nn.Module, x: LayerInput) -> torch.Tensor:
    out = layer(x.hidden, use_cache=False, **x.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def next_input(index: int, layer: torch.nn.Module, x: LayerInput) -> LayerInput:
    """What decoder layer ``index + 1`` receives: this layer's output, plus DeepStack features where the HF forward
    adds them (Qwen3-VL, after each of the first len(deepstack) layers)."""
    hidden = run_layer(layer, x)
    if x.deepstack is not None and index < len(x.deepstack):
        hidden = hidden.clone()
        hidden[x.visual_pos_masks] = hidden[x.visual_pos_masks] + x.deepstack[index].to(hidden.dtype)
    return dataclasses.replace(x, hidden=hidden)


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise QuantizationError(
            f"non-finite values (NaN/inf) in {where}: compute in float32 or bfloat16, not float16, and check the model"
        )


def check_group_size(model, family: ModelFamily, spec: QuantSpec) -> None:
    """Every targeted linear's in_features must divide into groups; checked before any calibration work."""
    if spec.group_size == -1:
        return
    bad = []
    for i, layer in enumerate(model.get_submodule(family.decoder_layers)):
        for name in family.linears:
            k = layer.get_submodule(name).in_features
            if k % spec.group_size:
                bad.append(f"{family.decoder_layers}.{i}.{name} (in_features {k})")
    if bad:
        raise ValueError(f"group_size {spec.group_size} does not divide in_features of: {', '.join(bad[:8])}")


def quantize_model(model, family: ModelFamily, batches: list[dict], qcfg: QuantConfig, checkpoints=None) -> QuantResult:
    """Quantize every decoder layer in place (weights become their dequantized values) and return the codes.

    ``checkpoints`` (qvlquant.resume.LayerCheckpoints): finished layers are restored from it instead of being
    quantized again, and each newly finished layer is saved to it."""
    from qvlquant.quant import METHODS

    check_group_size(model, family, qcfg.spec)
    quantize_layer = METHODS[qcfg.method]
    t0 = time.time()
    inputs = capture_inputs(model, family, batches)
    layers = model.get_submodule(family.decoder_layers)
    result = QuantResult({}, {})
    for i in progress(range(len(layers)), desc=f"{qcfg.method} W{qcfg.spec.bits}", unit="layer"):
        prefix = f"{family.decoder_layers}.{i}"
        for x in inputs:
            check_finite(x.hidden, f"the inputs of {prefix}")
        if checkpoints is not None and checkpoints.has(i):
            weights, info = checkpoints.load(i, layers[i], qcfg.spec)
        else:
            weights, info = quantize_layer(layers[i], inputs, family, qcfg, prefix)
            if checkpoints is not None:
                checkpoints.save(i, layers[i], weights, info)
        for name, w in weights.items():
            result.weights[f"{prefix}.{name}"] = w
            result.layer_info[f"{prefix}.{name}"] = info.get(name, {})
        inputs = [next_input(i, layers[i], x) for x in inputs]
    for x in inputs:
        check_finite(x.hidden, f"the outputs of {family.decoder_layers}.{len(layers) - 1}")
    result.seconds = time.time() - t0
    return result


def set_weight(linear: torch.nn.Linear, w: QuantizedWeight) -> None:
    """Give ``linear`` the dequantized weight, bit-identical to what a reloaded QuantLinear computes."""
    linear.weight.data = w.dequantize().to(linear.weight.dtype)
