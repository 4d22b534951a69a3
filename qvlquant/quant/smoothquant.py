"""SmoothQuant (Xiao et al., 2023) as pure tensor functions: per-input-channel scales that move the activations'
outliers into the weights before both are quantized to int8 (W8A8: int8 weights per output channel, int8
activations per token).

A few input channels carry activations far larger than the rest, and one per-token int8 step must cover them, so
the others round coarsely. Dividing channel j of the input by ``s_j`` (folded into the previous norm or linear, as
AWQ folds its scales: ``qvlquant.quant.apply``) and multiplying column j of every weight that reads it by ``s_j``
leaves the full-precision function unchanged and evens the ranges out:
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, with ``alpha`` the migration strength (0.8 by default, as
llm-compressor's SmoothQuantModifier; or searched per group for the least W8A8 output error).

T = tokens, K = in_features, N = out_features.

>>> x = torch.tensor([[1.0, 100.0], [2.0, -50.0]])  # channel 1 is an outlier
>>> w = torch.tensor([[1.0, 1.0], [0.5, 2.0]])
>>> s = smoothing_scales(input_absmax(x), weight_absmax([w]), 0.5)
>>> torch.allclose((x / s) @ (w * s).T, x @ w.T)
True
"""

from __future__ import annotations

import math

import torch

from qvlquant.quant.int8 import fake_quantize_activations, fake_quantize_channels

MIN_SCALE = 1e-5  # floor of a scale (llm-compressor's clamp on the weight maxima)
STRENGTH_GRID = 20  # the search tries alpha = 0, 1/20, ..., 1


def input_absmax(x: torch.Tensor) -> torch.Tensor:
    """Largest |x| per input channel over the tokens. x: [T, K] -> [K] float32."""
    return x.abs().amax(0).float()


def weight_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """Largest |w| per input channel over every row of the linears sharing the input. -> [K] float32."""
    return torch.stack([w.abs().amax(0).float() for w in weights]).amax(0)


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = x_max^alpha / w_max^(1 - alpha), 1 where an input or a weight column is all zero (nothing to move),
    at least MIN_SCALE."""
    s = x_max.float().pow(alpha) / w_max.float().clamp(min=MIN_SCALE).pow(1 - alpha)
    live = (x_max > 0) & (w_max > 0)
    return torch.where(live, s, torch.ones_like(s)).clamp(min=MIN_SCALE)


def stored_norm_scales(weight: torch.Tensor, s: torch.Tensor, storage_dtype: torch.dtype,
                       offset: float = 0.0) -> torch.Tensor:
    """The scales a norm really divides by once its folded weight ``(offset + w) / s - offset`` is rounded to the
    checkpoint's ``storage_dtype`` [K]: multiplying the weight columns by these instead of ``s`` keeps the float
    layer unchanged to float32 rounding. It matters for zero-centred norms (``offset`` 1, Qwen3.5): their stored
    ``w`` near -1 keeps bf16's absolute step of 2^-8 on ``1 + w``, up to 1.5 % of it on the demo's. Where the
    stored value would be 0 (or flip sign), ``s`` itself."""
    w = weight.float()
    stored = ((offset + w) / s - offset).to(storage_dtype).float()
    effective = (offset + w) / (offset + stored)
    return torch.where(torch.isfinite(effective) & (effective > 0), effective, s)


def w8a8_output(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor) -> torch.Tensor:
    """What the linears serve after smoothing by ``s`` [K]: int8 per token of ``x / s`` [T, K] times the int8 per
    channel of each ``w * s`` [N, K], all concatenated. -> [T, sum N] float32."""
    xq = fake_quantize_activations(x.float() / s)  # [T, K]
    return torch.cat([xq @ fake_quantize_channels(w.float() * s).T for w in weights], dim=-1)


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error of ``w8a8_output`` against the full-precision ``reference`` [T, sum N] (float64 sum)."""
    return float((w8a8_output(x, weights, s) - reference).pow(2).sum(dtype=torch.float64) / max(1, reference.numel()))


def search_strength(x: torch.Tensor, weights: list[torch.Tensor], x_max: torch.Tensor | None = None,
                    grid: int = STRENGTH_GRID) -> tuple[float | str, torch.Tensor, dict]:
    """The migration strength whose scales give the least W8A8 output error of the linears on tokens ``x`` [T, K]:
    alpha on a grid of ``grid`` + 1 points in [0, 1], or "off" (no smoothing, s = 1; kept where every alpha does
    worse). ``x_max``: the input maxima the scales are made from (all calibration tokens; None: ``x``'s).
    -> (alpha or "off", s [K], {"strength", "smoothing_loss", "smoothing_loss_off"})."""
    x = x.float()
    x_max = input_absmax(x) if x_max is None else x_max
    w_max = weight_absmax(weights)
    reference = torch.cat([x @ w.float().T for w in weights], dim=-1)  # [T, sum N]
    candidates = [("off", torch.ones_like(x_max))]
    candidates += [(i / grid, smoothing_scales(x_max, w_max, i / grid)) for i in range(grid + 1)]
    losses = [w8a8_error(x, weights, s, reference) for _, s in candidates]
    finite = [(loss, i) for i, loss in enumerate(losses) if math.isfinite(loss)]
    if not finite:
        raise FloatingPointError("the smoothing search produced no finite error (NaN in activations or weights?)")
    loss, best = min(finite)
    strength, s = candidates[best]
    return strength, s, {"strength": strength, "smoothing_loss": loss, "smoothing_loss_off": losses[0]}
