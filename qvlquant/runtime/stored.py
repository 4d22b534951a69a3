"""``StoredLinear``: what the runtime's FP8 and NVFP4 linears share. It holds a format's tensors exactly as they are
on disk (buffers named as in the checkpoint, so its state dict fills them), its bias, and the weight they stand
for, dequantized once into the input's dtype and device; a subclass says what happens to the input on each call
(``quantize_input``: what the serving kernel reads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class StoredLinear(torch.nn.Module):
    PROBE = (1, 1)  # an (in, out) shape the format accepts: its tensor names, for weight_dequantized

    def __init__(self, in_features: int, out_features: int, fmt, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        for name, (shape, dt) in {**fmt.tensor_shapes(in_features, out_features), **fmt.input_tensors()}.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._dequantized: torch.Tensor | None = None

    @classmethod
    def packed(cls, w: torch.Tensor, fmt, bias: torch.Tensor | None, input_amax: float | None, **pack):
        """A float weight [N, K] packed to ``fmt`` (``pack``: the format's options), its bias kept as it is;
        ``input_amax``: the largest calibration input, which a format with static activation scales needs."""
        n, k = w.shape
        module = cls(k, n, fmt, bias is not None, bias.dtype if bias is not None else torch.float32)
        tensors = fmt.pack(w, **pack)
        if fmt.static_activations:
            if input_amax is None:
                raise ValueError(f"{fmt.value} quantizes activations with a calibrated scale: give the calibrated "
                                 "input_amax")
            tensors |= fmt.input_pack(input_amax)
        for name, t in tensors.items():
            getattr(module, name).copy_(t)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def weight_dequantized(self) -> torch.Tensor:
        """The weight the stored tensors stand for, [N, K] float32."""
        return self.fmt.unpack({name: getattr(self, name) for name in self.fmt.tensor_shapes(*self.PROBE)})

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequantized = None
        super()._load_from_state_dict(*args, **kwargs)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dequantized is None or self._dequantized.dtype != x.dtype or self._dequantized.device != x.device:
            self._dequantized = self.weight_dequantized().to(device=x.device, dtype=x.dtype)  # [N, K]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.quantize_input(x), self._dequantized, bias)
