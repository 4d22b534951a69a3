"""Mixed precision under a size budget, as pure functions: how much error a linear group causes at each candidate
setting, and which candidate each group gets so that the summed error is least at a given number of bits.

Two measures of a linear group's error at a candidate (the group's linears read one input, so share one Hessian):

- ``output_error``: the error of the linears' outputs, exactly ``tr(dW H dW^T)`` summed over the group, with ``H``
  GPTQ's ``2/n X^T X`` and ``dW`` the round-to-nearest error at the candidate (no solve: milliseconds). It is
  divided by the outputs' energy ``tr(W H W^T)``, so that a layer whose activations or weights are 10x larger does not
  count 100x more: what is compared across layers is the signal-to-noise ratio each linear is left with.
- ``squared_error``: the decoder layer's output, replayed with that group alone at the candidate, against full
  precision, over the energy of that output (the residual stream there, which the next layer's RMSNorm rescales;
  so again a relative error, comparable from the first layer to the last).

>>> _ = torch.manual_seed(0)
>>> x, w = torch.randn(256, 64), torch.randn(32, 64)   # inputs [T, K], weight [N, K]
>>> H = 2 / 256 * x.T @ x
>>> errors = [output_error(w, H, QuantSpec(b, 32)) / output_energy(w, H) for b in (3, 4, 8)]
>>> errors[0] > errors[1] > errors[2] > 0
True

``choose`` then solves the multiple-choice knapsack: one candidate per group (size in bits, error), the sizes
summed within a budget, the errors summed as small as they can be (see its docstring for why a table rather than a
Lagrangian sweep).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qvlquant.quant.rtn import fake_quantize
from qvlquant.quant.spec import QuantSpec

MAX_UNITS = 1 << 16  # size steps of the knapsack table: at most 1/65536 of the spare budget lost to rounding


def output_error(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> float:
    """``tr(dW H dW^T)`` for ``dW = w - RTN(w)`` at ``spec``: the summed squared output error of ``w`` [N, K] over the
    tokens behind ``H`` [K, K] (``2/n X^T X``: twice the mean per token)."""
    dw = w.float() - fake_quantize(w.float(), spec)  # [N, K]
    return float(((dw @ H.float()) * dw).sum())


def output_energy(w: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(W H W^T)``: the summed squared output of ``w`` [N, K] over the same tokens (``output_error``'s scale)."""
    w = w.float()
    return float(((w @ H.float()) * w).sum())


def squared_error(ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float]:
    """Squared error of ``out`` against ``ref`` [B, S, H] and the energy of ``ref``, over the real tokens of ``mask``
    [B, S] (None: all). -> (sum |out - ref|^2, sum |ref|^2) in float64, to be summed over batches and divided."""
    ref, out = ref.double(), out.double()
    if mask is not None:
        ref, out = ref[mask.to(ref.device)], out[mask.to(ref.device)]
    return float(((out - ref) ** 2).sum()), float((ref ** 2).sum())


def choose(options: Sequence[Sequence[tuple[int, float]]], budget: int, max_units: int = MAX_UNITS) -> list[int]:
    """One candidate per group, the summed error least with the summed size at most ``budget``.

    ``options[i]``: group i's candidates as (size in bits, error). -> the index chosen in each group.

    A table over the budget (dynamic programming): exact when every size above a group's smallest is a multiple of
    ``unit`` (the sizes' gcd, or the spare budget / ``max_units`` when that gcd would need a larger table; sizes are
    then rounded up, so the choice always fits). A Lagrangian sweep (or a greedy upgrade by error drop per bit)
    only reaches choices on each group's convex hull of (size, error) and stops short of the budget by up to one
    upgrade; on a model with few groups (the demo's 16) that step is a large part of the budget. The table costs
    groups x candidates passes over ``budget / unit`` entries. A last greedy pass, on exact sizes, takes any
    upgrade that still fits, so no single group can move to a larger candidate with less error within the budget.
    A ValueError when even the smallest candidates exceed ``budget``."""
    base = [min(size for size, _ in group) for group in options]
    spare = budget - sum(base)
    if spare < 0:
        raise ValueError(f"the smallest candidates take {sum(base)} bits, more than the budget of {budget}")
    extra = [[size - b for size, _ in group] for group, b in zip(options, base)]
    step = math.gcd(*[x for group in extra for x in group]) or 1
    unit = max(step, -(-spare // max_units))
    cap = spare // unit
    best = torch.zeros(cap + 1, dtype=torch.float64)  # least error of the groups so far within c units
    picks = []
    for group, sizes in zip(options, extra):
        new = torch.full_like(best, math.inf)
        pick = torch.zeros(cap + 1, dtype=torch.int64)
        for j, ((_, error), x) in enumerate(zip(group, sizes)):
            u = -(-x // unit)
            if u > cap:
                continue
            cand = torch.full_like(best, math.inf)
            cand[u:] = best[:cap + 1 - u] + error
            better = cand < new
            new, pick = torch.where(better, cand, new), torch.where(better, j, pick)
        best = new
        picks.append(pick)
    chosen, c = [], cap
    for pick, sizes in zip(reversed(picks), reversed(extra)):
        j = int(pick[c])
        chosen.append(j)
        c -= -(-sizes[j] // unit)
    return fill(options, chosen[::-1], budget)


def fill(options: Sequence[Sequence[tuple[int, float]]], chosen: list[int], budget: int) -> list[int]:
    """``chosen`` with upgrades that fit the budget taken, the largest error drop per bit first, until none fits."""
    chosen = list(chosen)
    left = budget - sum(group[j][0] for group, j in zip(options, chosen))
    while True:
        moves = [((group[j][1] - error) / max(1, size - group[j][0]), i, k)
                 for i, (group, j) in enumerate(zip(options, chosen)) for k, (size, error) in enumerate(group)
                 if error < group[j][1] and 0 <= size - group[j][0] <= left]
        if not moves:
            return chosen
        _, i, k = max(moves)
        left -= options[i][k][0] - options[i][chosen[i]][0]
        chosen[i] = k
