"""Running INT8 W8A8 exports with the numerics of their serving kernels: ``W8A8Linear`` holds the int8 weight and
its per-channel scale exactly as they are on disk and, on every call, quantizes its input to int8 per token
(symmetric, dynamic, ``absmax / 127``) as vLLM's int8 linears do, then multiplies the codes and applies both scales
(``qvlquant.quant.int8.w8a8_linear``). So an eval of the loaded model measures the served W8A8 model, not a
weight-only approximation of it.

The integer product is emulated in float32 on every device (exact while the sums of code products stay under
2**24, float32 rounding beyond, as vLLM's int32 sum converted to float is); the output is cast to the input's
dtype. The weight stays int8 in memory: it is widened to float32 per call, one linear at a time.
"""

from __future__ import annotations

import torch

from qvlquant.quant.formats import Int8Format
from qvlquant.quant.int8 import w8a8_linear
from qvlquant.runtime.swap import replace_linears


class W8A8Linear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: Int8Format, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        for name, (shape, dt) in fmt.tensor_shapes(in_features, out_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None,
                    fmt: Int8Format = Int8Format.CHANNEL) -> "W8A8Linear":
        """A float weight [N, K] quantized to ``fmt`` (and its bias kept as it is)."""
        n, k = w.shape
        module = cls(k, n, fmt, bias is not None, bias.dtype if bias is not None else torch.float32)
        for name, t in fmt.pack(w).items():
            getattr(module, name).copy_(t)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def weight_dequantized(self) -> torch.Tensor:
        """The weight the stored tensors stand for, [N, K] float32."""
        return self.fmt.unpack({"weight": self.weight, "weight_scale": self.weight_scale})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self.weight, self.weight_scale, self.bias)  # [..., N] in x's dtype

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.fmt.value}, activations int8 dynamic "
                "per token")


def w8a8_linear_targets(keys: list[str], family) -> list[str]:
    """Runtime paths of the linears a W8A8 checkpoint stores quantized: those with a ``weight_scale`` beside their
    int8 weight."""
    marker = ".weight_scale"
    return sorted(family.to_runtime(k)[: -len(marker)] for k in keys if k.endswith(marker))


def swap_in_w8a8_linears(model, targets: list[str], fmt: Int8Format, dtype: torch.dtype) -> None:
    """Replace the nn.Linear at each runtime path in ``targets`` by an empty W8A8Linear (the checkpoint fills it)."""
    replace_linears(model, targets,
                    lambda name, old: W8A8Linear(old.in_features, old.out_features, fmt, old.bias is not None, dtype))
