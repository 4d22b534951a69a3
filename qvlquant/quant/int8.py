"""INT8 W8A8 as small pure tensor functions: symmetric int8 weights per output channel, and the dynamic per-token
int8 activation quantization vLLM's int8 kernels apply to their input.

N = out_features, K = in_features, M = tokens. Every function runs on the device its inputs are on.

- Weights (compressed-tensors ``int-quantized``, llm-compressor's W8A8 preset): ``weight`` [N, K] int8 and
  ``weight_scale`` [N, 1] (in the model's dtype, as llm-compressor stores it), ``w ~= weight * weight_scale`` row
  by row. Scale ``absmax / 127``, codes rounded half to even and clamped to [-127, 127]: every row's largest value
  lands on +-127 and nothing is clipped. (compressed-tensors' own min-max observer divides by 127.5, half the int8
  range of 255, and clamps at [-128, 127], so it clips each row's largest value by up to half a step; a loader only
  multiplies ``weight * weight_scale``, so both read the same way.) An all-zero row gets scale 1.
- Activations, dynamic (vLLM's ``scaled_int8_quant`` / ``per_token_quant_int8``): per token, scale
  ``absmax / 127`` with absmax floored at 1e-10, codes ``round(x * (127 / absmax))`` clamped to [-128, 127].
- The product (vLLM's cutlass ``scaled_mm`` epilogue): the int32 accumulation of codes times the token's scale
  times the channel's scale, plus the bias, in float32, then cast to the output dtype.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
ACT_MIN_ABSMAX = 1e-10  # vLLM's floor on a token's absmax (an all-zero token: codes 0, a finite scale)


def check_finite(w: torch.Tensor, name: str) -> None:
    """A ValueError naming ``name`` when ``w`` holds NaN or infinity (a NaN row scale would poison the row)."""
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name} holds NaN or infinite values ({bad} of {w.numel()}); the base model is damaged "
                         "(re-download it); nothing was exported")


def channel_scales(w: torch.Tensor, name: str = "weight", scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] -> ``weight_scale`` [N, 1] in ``scale_dtype``: absmax / 127 per row, 1 for an all-zero row."""
    check_finite(w, name)
    amax = w.float().abs().amax(dim=1, keepdim=True)
    return torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)).to(scale_dtype)


def quantize_channels(w: torch.Tensor, name: str = "weight",
                      scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (weight [N, K] int8, weight_scale [N, 1] in ``scale_dtype``). The scale is rounded to
    ``scale_dtype`` before it divides the weight, so ``weight * weight_scale`` is the same in every client."""
    scale = channel_scales(w, name, scale_dtype)  # [N, 1]
    q = torch.round(w.float() / scale.float()).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_channels(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(weight [N, K] int8, weight_scale [N, 1]) -> [N, K] float32."""
    if tuple(scale.shape) != (q.shape[0], 1):
        raise ValueError(f"weight_scale is {list(scale.shape)}, a [{q.shape[0]}, {q.shape[1]}] weight per channel "
                         f"needs [{q.shape[0]}, 1]")
    return q.float() * scale.float()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 of activations ``x`` [..., K], one scale per token.
    -> (codes [..., K] int8, scales [..., 1] float32)."""
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=ACT_MIN_ABSMAX)  # [..., 1]
    q = torch.round(x.float() * (INT8_MAX / amax)).clamp(-INT8_MAX - 1, INT8_MAX)
    return q.to(torch.int8), amax / INT8_MAX


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., K] through ``quantize_activations`` and back, in float32: what the int8 kernel reads."""
    q, scale = quantize_activations(x)
    return q.float() * scale


def w8a8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The served product of a W8A8 linear, emulated in float32: ``x`` [..., K] quantized per token, times the
    int8 ``q`` [N, K], each output scaled by its token's and its channel's scale (``scale`` [N, 1]), plus ``bias``
    [N]; -> [..., N] in ``x``'s dtype. The code products are integers: float32 holds their sums exactly while they
    stay under 2**24, beyond that to float32 rounding, as the kernel's int32 sum converted to float is."""
    xq, xs = quantize_activations(x)  # [..., K] int8, [..., 1]
    acc = torch.nn.functional.linear(xq.float(), q.float())  # [..., N], the integer accumulation
    out = xs * (acc * scale.float().view(-1))  # cutlass epilogue: a_scale * (b_scale * acc)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# The int8 grid on the integer methods' conventions (``qvlquant.quant.rtn``: unsigned codes, ``w ~= scale * (q -
# zero)``), so that GPTQ's solver rounds onto exactly the W8A8 export's grid: zero 128, the row's ``channel_scales``.
GRID_ZERO = INT8_MAX + 1


def channel_qparams(w: torch.Tensor, name: str = "weight",
                    scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (scale [N, 1] float32, rounded through ``scale_dtype`` as the export stores it; zero [N, 1] = 128):
    ``rtn.quantize(w, scale, zero, 8)`` gives codes ``q`` with ``q - 128`` the int8 weight (GPTQ's error feedback may
    reach -128, which int8 holds and every int8 kernel reads)."""
    scale = channel_scales(w, name, scale_dtype).float()  # [N, 1]
    return scale, torch.full_like(scale, GRID_ZERO)


def fake_quantize_channels(w: torch.Tensor) -> torch.Tensor:
    """[N, K] through ``quantize_channels`` and back, in float32 (scales in float32)."""
    return dequantize_channels(*quantize_channels(w))
