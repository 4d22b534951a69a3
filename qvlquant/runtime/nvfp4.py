"""Running NVFP4 exports: ``Nvfp4Linear`` holds the packed e2m1 codes and their two scales exactly as they are on
disk and multiplies by the weight they stand for, dequantized once into the input's dtype. NVFP4A16 is weight-only:
the activations are not quantized, as in vLLM's W4A16 kernels, which dequantize inside the matmul. NVFP4 W4A4
(the ``W4A4`` format) also holds the calibrated ``input_global_scale`` and, on every call, quantizes its input to
NVFP4 per token and group of 16 under it (``qvlquant.quant.nvfp4.fake_quantize_activations``, vLLM's reference
numerics), emulated on every device: an eval then scores what a W4A4 kernel (Blackwell's FP4 matmul) serves.
"""

from __future__ import annotations

import torch

from qvlquant.quant.formats import Nvfp4Format
from qvlquant.quant.nvfp4 import fake_quantize_activations
from qvlquant.runtime.stored import StoredLinear
from qvlquant.runtime.swap import replace_linears


class Nvfp4Linear(StoredLinear):
    PROBE = (16, 1)  # one group of 16 inputs

    @classmethod
    def from_weight(cls, w: torch.Tensor, fmt: Nvfp4Format, bias: torch.Tensor | None,
                    global_scale: torch.Tensor | None = None, input_amax: float | None = None) -> "Nvfp4Linear":
        """A float weight [N, K] quantized to ``fmt`` (``global_scale``: its fused group's; None: its own;
        ``input_amax``: the largest calibration input, for W4A4)."""
        return cls.packed(w, fmt, bias, input_amax, global_scale=global_scale)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt.static_activations:
            return fake_quantize_activations(x, self.input_global_scale)  # [..., K], what the W4A4 kernel reads
        return x

    def extra_repr(self) -> str:
        acts = "nvfp4 per 16 inputs, calibrated global scale" if self.fmt.static_activations else "not quantized"
        return f"in={self.in_features}, out={self.out_features}, {self.fmt.value}, activations {acts}"


def nvfp4_linear_targets(keys: list[str], family) -> list[str]:
    """Runtime paths of the linears an NVFP4 checkpoint stores quantized: those with a ``weight_global_scale``."""
    marker = ".weight_global_scale"
    return sorted(family.to_runtime(k)[: -len(marker)] for k in keys if k.endswith(marker))


def swap_in_nvfp4_linears(model, targets: list[str], fmt: Nvfp4Format, dtype: torch.dtype) -> None:
    """Replace the nn.Linear at each runtime path in ``targets`` by an empty Nvfp4Linear (the checkpoint fills it)."""
    replace_linears(model, targets,
                    lambda name, old: Nvfp4Linear(old.in_features, old.out_features, fmt, old.bias is not None, dtype))
