"""AWQ (Lin et al., 2023) as pure tensor functions: activation-aware per-channel scales, and a clipping search.

Input channels that carry large activations matter most. AWQ multiplies the weight columns of those channels by
``s`` before quantizing (so their rounding error shrinks relative to their size) and divides the previous op (an
RMSNorm weight, or the previous linear's output rows) by ``s``, which leaves the full-precision function unchanged.
``s = mean|x|^r / mean|w_normalised|^(1-r)`` with ``r`` chosen on a grid of 20 points by the output error of the
module the linears feed. Then each group's clipping range is shrunk where that lowers the output error.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from qvlquant.quant.rtn import fake_quantize, minmax_qparams, row_blocks
from qvlquant.quant.spec import QuantSpec


def activation_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of |x| per input channel, float64 (sums over several processes' tokens add up). x: [T, K] -> [K]."""
    return x.abs().sum(0, dtype=torch.float64)


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per input channel. x: [T, K] -> [K] float32."""
    return (activation_sum(x) / max(1, x.shape[0])).float()


def weight_scale(weights: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Mean per-channel |w| normalised by its group's max, over all rows of the linears sharing the input. -> [K]."""
    w = torch.cat([t.float() for t in weights])  # [sum N, K]
    n, k = w.shape
    g = spec.effective_group(k)
    grouped = w.abs().view(n, k // g, g)
    normalised = grouped / grouped.amax(-1, keepdim=True).clamp(min=1e-8)
    return normalised.view(n, k).mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """s [K] for one grid point, normalised so that sqrt(max * min) = 1."""
    s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """What the linear computes after scaling and quantization, seen from the unscaled input: Q(W diag(s)) / s,
    float32, a block of rows at a time (``row_blocks``: the scaling and unscaling passes stay in the cache too)."""
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    for rows in row_blocks(w):
        out[rows] = fake_quantize(w[rows].float() * s, spec) / s
    return out


def search_scale(
    weights: list[torch.Tensor],
    x_mean: torch.Tensor,
    spec: QuantSpec,
    output_of: Callable[[list[torch.Tensor]], torch.Tensor],
    grid: int = 20,
    total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[torch.Tensor, dict]:
    """Grid search of the scale ratio. ``output_of(weights)`` runs the inspected module with the given weights for
    the linears and returns its output on the calibration tokens; ``total`` sums a float64 tensor over every
    process's tokens (identity in one process). The loss of a ratio is the mean squared output error over all
    tokens, from float64 sums. -> (s [K], {"ratio", "loss", "loss_unscaled"})."""
    w_mean = weight_scale(weights, spec)
    reference = output_of([w.float() for w in weights])
    sums = []
    for i in range(grid):
        s = candidate_scales(x_mean, w_mean, i / grid)
        out = output_of([scaled_fake_quant(w, s, spec) for w in weights])
        sums.append((reference - out).float().pow(2).sum(dtype=torch.float64))
    count = total(torch.tensor(float(reference.numel()), dtype=torch.float64, device=reference.device))
    losses = (total(torch.stack(sums)) / count).tolist()
    best = min((loss, i) for i, loss in enumerate(losses) if math.isfinite(loss)) if any(
        math.isfinite(loss) for loss in losses) else None
    if best is None:
        raise FloatingPointError("AWQ scale search produced no finite loss (NaN in activations or weights?)")
    ratio = best[1] / grid
    return candidate_scales(x_mean, w_mean, ratio), {"ratio": ratio, "loss": best[0], "loss_unscaled": losses[0]}


def group_gram_sum(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-group sums of token outer products of x [T, K]: S[g] = X_g^T X_g. -> [G, gs, gs] float64 (sums over
    several processes' tokens add up to one process's, whatever the grouping)."""
    t, k = x.shape
    g = spec.effective_group(k)
    xg = x.double().view(t, k // g, g).transpose(0, 1)  # [G, T, gs]
    return xg.transpose(1, 2) @ xg


def group_gram(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-group Gram matrices of the tokens x [T, K]: C[g] = X_g^T X_g / T. -> [G, gs, gs] float32.

    A group's mean squared output error over the tokens, mean_t (x_tg . d)^2 for a weight error d [gs], equals
    d^T C[g] d: the clipping search evaluates every candidate in O(N K gs) instead of O(N T K)."""
    return (group_gram_sum(x, spec) / max(1, x.shape[0])).float()


def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per-(row, group) clipping range that minimises the group's output error on tokens x [T, K] (AWQ's
    auto_clip: shrink the range in 1/grid steps up to max_shrink). -> max_val [N, G]: clamp each group to
    [-max_val, max_val] before quantizing."""
    return clip_from_gram(w, group_gram(x, spec), spec, grid, max_shrink)


def clip_from_gram(w: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, grid: int = 20,
                   max_shrink: float = 0.5) -> torch.Tensor:
    """``search_clip`` from the tokens' per-group Gram matrices [G, gs, gs] (errors through ``group_gram``); rows
    in chunks that bound memory."""
    n, k = w.shape
    rows = max(1, 2**24 // k)  # about 64 MB per [rows, K] float32 temporary
    return torch.cat([_search_clip_rows(w[r:r + rows], gram, spec, grid, max_shrink) for r in range(0, n, rows)])


def _search_clip_rows(w: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, grid: int, max_shrink: float) -> torch.Tensor:
    n, k = w.shape
    g = spec.effective_group(k)
    wg = w.float().view(n, k // g, g)  # [N, G, gs]
    original = wg.abs().amax(-1, keepdim=True)  # [N, G, 1]
    best_err = torch.full(original.shape, float("inf"), device=w.device)
    best_max = original.clone()
    for i in range(int(max_shrink * grid)):
        max_val = original * (1 - i / grid)
        clipped = torch.clamp(wg, -max_val, max_val)
        scale, zero = minmax_qparams(clipped.amin(-1, keepdim=True), clipped.amax(-1, keepdim=True), spec)
        q = torch.clamp(torch.round(clipped / scale) + zero, 0, spec.maxq)
        d = (scale * (q - zero) - wg).transpose(0, 1)  # [G, N, gs]: the weight error against the unclipped weight
        err = ((d @ gram) * d).sum(-1).transpose(0, 1).unsqueeze(-1)  # [N, G, 1]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max.view(n, k // g)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each group of w [N, K] to [-max_val, max_val] (max_val [N, G])."""
    n, k = w.shape
    groups = max_val.shape[1]
    m = max_val.view(n, groups, 1)
    return torch.clamp(w.float().view(n, groups, k // groups), -m, m).view(n, k).to(w.dtype)
