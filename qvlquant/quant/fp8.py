"""FP8 (e4m3) quantization as small pure tensor functions: weights in 128x128 blocks or per output channel, and the
dynamic activation quantization the serving kernels apply, emulated (quantize, then dequantize at once).

N = out_features, K = in_features. Every function runs on the device its inputs are on.

- Blocks (Qwen's official FP8 checkpoints, DeepSeek-V3 style, vLLM ``Fp8LinearMethod`` with ``weight_block_size``):
  ``weight`` [N, K] float8_e4m3fn and ``weight_scale_inv`` [ceil(N/128), ceil(K/128)] float32, one per block (the
  grid rounded up: edge blocks are partial). Despite its name ``weight_scale_inv`` is the multiplier:
  ``w ~= weight * weight_scale_inv`` block by block (transformers' ``Fp8Quantize`` stores ``1 / (448 / amax)``;
  vLLM's block kernels multiply by it).
- Channels (compressed-tensors ``float-quantized``, llm-compressor's FP8_DYNAMIC): ``weight`` [N, K] e4m3 and
  ``weight_scale`` [N, 1] in the model's dtype (as llm-compressor stores it), ``w ~= weight * weight_scale`` row
  by row.
- Per tensor (compressed-tensors ``float-quantized``, llm-compressor's FP8 preset): ``weight`` [N, K] e4m3 and
  ``weight_scale`` [1] in the model's dtype, ``w ~= weight * weight_scale``; the linears vLLM fuses share one scale
  (the caller passes it), since vLLM requantizes a fused layer's shards to the largest of their scales.
- Activations, dynamic: per token (channel weights) or per token and group of 128 inputs (block weights), scale
  ``amax / 448`` floored at ``1 / (448 * 512)`` as vLLM's ``QuantFP8`` does.
- Activations, static (the FP8 preset): one ``input_scale`` [1] per linear, ``amax / 448`` of its calibration
  inputs; at run time ``x * (1 / input_scale)`` saturated to e4m3, as vLLM's static ``QuantFP8`` does.

Scales are ``amax / 448``; an all-zero block or row gets scale 1, so it stays exactly zero and the scale finite.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
BLOCK = (128, 128)  # (rows, columns) of a weight block: Qwen's weight_block_size
ACT_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor on a dynamic activation scale (an all-zero token)


def check_finite(w: torch.Tensor, name: str) -> None:
    """A ValueError naming ``name`` when ``w`` holds NaN or infinity (FP8 has no room for them: e4m3fn has no
    infinity and a NaN scale would poison a whole block)."""
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name} holds NaN or infinite values ({bad} of {w.numel()}); the base model is damaged "
                         "(re-download it); nothing was exported")


def _to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3 value, saturating at +-448 as the serving kernels do (explicit: whether a cast
    saturates or makes NaN of a value past 448 is up to the device's conversion)."""
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _scale(amax: torch.Tensor) -> torch.Tensor:
    """amax -> amax / 448 in float32; 1 where amax is 0 (the block quantizes to exact zeros)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _padded_blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[N, K] -> [N/bn, bn, K/bk, bk] float32, zero-padded up to whole blocks."""
    (n, k), (bn, bk) = w.shape, block
    rows, cols = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(w.float(), (0, cols * bk - k, 0, rows * bn - n))
    return padded.view(rows, bn, cols, bk)


def quantize_blocks(w: torch.Tensor, name: str = "weight",
                    block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (weight [N, K] e4m3, weight_scale_inv [ceil(N/bn), ceil(K/bk)] float32)."""
    check_finite(w, name)
    n, k = w.shape
    blocks = _padded_blocks(w, block)  # [R, bn, C, bk]
    scale = _scale(blocks.abs().amax(dim=(1, 3)))  # [R, C]
    q = _to_fp8(blocks / scale[:, None, :, None])
    return q.view(blocks.shape[0] * block[0], -1)[:n, :k].contiguous(), scale


def block_scales(w: torch.Tensor, name: str = "weight", block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """The ``weight_scale_inv`` [R, C] of ``quantize_blocks`` alone (one pass over ``w``, no codes)."""
    check_finite(w, name)
    return _scale(_padded_blocks(w, block).abs().amax(dim=(1, 3)))


def expand_block_scales(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """[R, C] block scales -> [N, K], each block's scale on each of its elements."""
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[: shape[0], : shape[1]]


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """(weight [N, K] e4m3, weight_scale_inv [R, C]) -> [N, K] float32."""
    n, k = q.shape
    rows, cols = -(-n // block[0]), -(-k // block[1])
    if tuple(scale_inv.shape) != (rows, cols):
        raise ValueError(f"weight_scale_inv is {list(scale_inv.shape)}, a [{n}, {k}] weight in {block[0]}x"
                         f"{block[1]} blocks needs [{rows}, {cols}]")
    return q.float() * expand_block_scales(scale_inv.float(), (n, k), block)


def quantize_channels(w: torch.Tensor, name: str = "weight",
                      scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (weight [N, K] e4m3, weight_scale [N, 1] in ``scale_dtype``). The scale is rounded to
    ``scale_dtype`` before it divides the weight, so ``weight * weight_scale`` is the same for a client that keeps
    it in that dtype (transformers' compressed-tensors path loads it in the model's) and one that widens it."""
    scale = channel_scales(w, name, scale_dtype)  # [N, 1]
    return _to_fp8(w.float() / scale.float()), scale


def channel_scales(w: torch.Tensor, name: str = "weight", scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``weight_scale`` [N, 1] of ``quantize_channels`` alone."""
    check_finite(w, name)
    return _scale(w.abs().amax(dim=1, keepdim=True)).to(scale_dtype)


def dequantize_channels(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(weight [N, K] e4m3, weight_scale [N, 1]) -> [N, K] float32."""
    if tuple(scale.shape) != (q.shape[0], 1):
        raise ValueError(f"weight_scale is {list(scale.shape)}, a [{q.shape[0]}, {q.shape[1]}] weight per channel "
                         f"needs [{q.shape[0]}, 1]")
    return q.float() * scale.float()


def quantize_activations(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 of activations ``x`` [..., K]: one scale per token (``group`` None) or per token and group of
    ``group`` inputs (the last group partial when K is not a multiple). -> (e4m3 [..., K], scales [..., G] float32).
    """
    k = x.shape[-1]
    g = k if group is None else group
    groups = -(-k // g)
    padded = torch.nn.functional.pad(x.float(), (0, groups * g - k)).unflatten(-1, (groups, g))  # [..., G, g]
    scale = (padded.abs().amax(-1) / FP8_MAX).clamp(min=ACT_MIN_SCALE)  # [..., G]
    q = _to_fp8(padded / scale.unsqueeze(-1)).flatten(-2)[..., :k]
    return q, scale


def fake_quantize_activations(x: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """``x`` [..., K] through ``quantize_activations`` and back, in ``x``'s dtype: what the FP8 kernel multiplies."""
    q, scale = quantize_activations(x, group)
    k = x.shape[-1]
    g = k if group is None else group
    full = scale.repeat_interleave(g, dim=-1)[..., :k]
    return (q.float() * full).to(x.dtype)


def tensor_scale(amax: torch.Tensor | float, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The largest magnitude of a weight (or of a fused group's weights, or of a linear's calibration inputs) -> its
    per-tensor scale [1] in ``scale_dtype``: ``amax / 448``, 1 for amax 0."""
    return _scale(torch.as_tensor(amax, dtype=torch.float32).reshape(1)).to(scale_dtype)


def quantize_tensor(w: torch.Tensor, name: str = "weight", scale_dtype: torch.dtype = torch.float32,
                    scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (weight [N, K] e4m3, weight_scale [1] in ``scale_dtype``). ``scale``: the fused group's shared one
    (None: from ``w``'s own amax); rounded to ``scale_dtype`` before it divides the weight, as ``quantize_channels``."""
    check_finite(w, name)
    scale = tensor_scale(w.float().abs().max() if w.numel() else 0.0, scale_dtype) if scale is None \
        else scale.reshape(1).to(scale_dtype)
    return _to_fp8(w.float() / scale.float()), scale


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(weight [N, K] e4m3, weight_scale [1]) -> [N, K] float32."""
    if scale.numel() != 1:
        raise ValueError(f"weight_scale is {list(scale.shape)}, a per-tensor FP8 weight needs [1]")
    return q.float() * scale.float().reshape(1, 1)


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static FP8 of activations ``x`` [..., K] with the calibrated per-tensor ``scale`` [1]: ``x * (1 / scale)``
    in float32, saturated to e4m3 (vLLM's static ``QuantFP8``: it multiplies by the reciprocal). -> e4m3 [..., K]."""
    return _to_fp8(x.float() * scale.float().reshape(()).reciprocal())


def fake_quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` [..., K] through ``quantize_static`` and back, in ``x``'s dtype: what the static FP8 kernel reads."""
    return (quantize_static(x, scale).float() * scale.float().reshape(())).to(x.dtype)
