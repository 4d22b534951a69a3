"""Running FP8 exports with the numerics of their serving kernels: ``Fp8Linear`` holds the e4m3 weight and its
scales exactly as they are on disk and, on every call, quantizes its input the way vLLM's FP8 linears do (dynamic
e4m3 per token, or per token and group of 128 inputs for block weights; static, with the calibrated per-tensor
``input_scale``, for the FP8 preset), then multiplies by the dequantized weight. So an eval of the loaded model
measures the served W8A8 model, not a weight-only approximation of it.

The activation quantization is emulated (quantize, dequantize at once) on every device; the product is then a
plain matmul in the input's dtype (exact in float32, where the kernels accumulate in float32 too).
"""

from __future__ import annotations

import torch

from qvlquant.quant.formats import Fp8Format
from qvlquant.quant.fp8 import dequantize_tensor, fake_quantize_activations, fake_quantize_static, quantize_tensor
from qvlquant.runtime.stored import StoredLinear
from qvlquant.runtime.swap import replace_linears


class Fp8Linear(StoredLinear):
    @classmethod
    def from_weight(cls, w: torch.Tensor, fmt: Fp8Format, bias: torch.Tensor | None,
                    input_amax: float | None = None) -> "Fp8Linear":
        """A float weight [N, K] quantized to ``fmt`` (and its bias kept as it is); ``input_amax``: the largest
        calibration input, for a format with static activation scales."""
        return cls.packed(w, fmt, bias, input_amax)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt.static_activations:
            return fake_quantize_static(x, self.input_scale)  # [..., K], one calibrated scale
        return fake_quantize_activations(x, self.fmt.activation_group)  # [..., K], what the kernel reads

    def extra_repr(self) -> str:
        group = self.fmt.activation_group
        acts = "static per tensor" if self.fmt.static_activations else \
            f"dynamic per token and {group} inputs" if group else "dynamic per token"
        return f"in={self.in_features}, out={self.out_features}, {self.fmt.value}, activations fp8 {acts}"


def fp8_linear_targets(keys: list[str], family, fmt: Fp8Format) -> list[str]:
    """Runtime paths of the linears an FP8 checkpoint stores quantized: those with the format's scale beside an
    e4m3 weight."""
    marker = "." + fmt.scale_name
    return sorted(family.to_runtime(k)[: -len(marker)] for k in keys if k.endswith(marker))


def swap_in_fp8_linears(model, targets: list[str], fmt: Fp8Format, dtype: torch.dtype) -> None:
    """Replace the nn.Linear at each runtime path in ``targets`` by an empty Fp8Linear (the checkpoint fills it)."""
    replace_linears(model, targets,
                    lambda name, old: Fp8Linear(old.in_features, old.out_features, fmt, old.bias is not None, dtype))


def share_fused_scales(model, family) -> list[str]:
    """What vLLM does when it loads a per-tensor FP8 checkpoint (``requantize_with_max_scale``): the linears it fuses
    (q/k/v, gate/up: ``family``'s ``fused``) run as one layer with one weight scale, the largest of theirs, each
    linear's e4m3 weight dequantized with its own scale and rounded again to e4m3 under the shared one, and one
    input scale, the largest. qvlquant's FP8 exports share both already (nothing changes); llm-compressor's FP8
    preset stores each linear's own weight scale. -> the runtime paths of the linears whose scales changed."""
    from qvlquant.checkpoint.datafree import fused_siblings  # the export's own notion of a fused group

    modules = dict(model.named_modules())
    changed, seen = [], set()
    for name, module in modules.items():
        if not isinstance(module, Fp8Linear) or module.fmt is not Fp8Format.TENSOR or name in seen:
            continue
        group = [s[: -len(".weight")] for s in fused_siblings(family, name + ".weight")] \
            if family.is_layer_key(name) else [name]
        parts = {g: modules[g] for g in group if isinstance(modules.get(g), Fp8Linear)}
        seen.update(parts)
        for field in ("weight_scale", "input_scale"):
            shared = torch.stack([getattr(m, field).reshape(()) for m in parts.values()]).max().reshape(1)
            for g, m in parts.items():
                own = getattr(m, field)
                if torch.equal(own, shared.to(own.dtype)):
                    continue
                if field == "weight_scale":
                    m.weight.copy_(quantize_tensor(dequantize_tensor(m.weight, own), g, own.dtype, shared)[0])
                own.copy_(shared)
                m._dequantized = None
                changed.append(g)
    return sorted(set(changed))
