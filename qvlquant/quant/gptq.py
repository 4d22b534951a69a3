"""GPTQ (Frantar et al., 2022) as pure tensor functions: a Hessian from layer inputs, then column-by-column
quantization with error feedback through the inverse Hessian's Cholesky factor.

``H = 2/n * sum_t x_t x_t^T`` over the n calibration tokens a linear saw (padding excluded). Quantizing column j moves
its rounding error onto the not-yet-quantized columns in proportion to ``Hinv[j, j:]``, so that ``X W^T`` changes as
little as possible; updates are applied lazily in blocks of ``block_size`` columns.

>>> _ = torch.manual_seed(0)
>>> x = torch.randn(512, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(512, 64)  # correlated inputs [T, K]
>>> w = torch.randn(16, 64)
>>> H = hessian(*accumulate_hessian(torch.zeros(64, 64), 0, x, None))
>>> qw, info = gptq_quantize(w, H, QuantConfig("gptq", QuantSpec(bits=3, group_size=32)))
>>> from qvlquant.quant.rtn import fake_quantize
>>> err = lambda wq: ((x @ (w - wq).T) ** 2).sum() / ((x @ w.T) ** 2).sum()
>>> bool(err(qw.dequantize()) < 0.5 * err(fake_quantize(w, QuantSpec(3, 32))))
True
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from qvlquant.quant.formats import QuantizedWeight
from qvlquant.quant.rtn import default_g_idx, minmax_qparams, mse_qparams, quantize
from qvlquant.quant.spec import QuantConfig, QuantSpec


class CholeskyError(RuntimeError):
    pass


def accumulate_hessian(S: torch.Tensor, n: int, x: torch.Tensor, mask: torch.Tensor | None,
                       weight: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Add the real tokens of x [..., K] to the running sum ``S = sum_t w_t x_t x_t^T`` [K, K] in S's dtype (in
    place: one pass over S per batch, no [K, K] temporary); mask: [...] bool of real tokens (None: all); weight:
    [...] per-token weights w_t (None: all 1; e.g. vision tokens weighted apart, VLMQ-style). -> (S, n tokens).
    GPTQ's solution does not change when H is scaled, so weights need no normalising.
    The layer loop keeps S in float64, so sums over the batches in another grouping (several ranks) round to the
    same float32 Hessian in all but a few entries per million (``qvlquant.parallel.distributed``). ``hessian(S, n)`` makes ``2/n X^T X`` of it."""
    x = x.reshape(-1, x.shape[-1])
    w = None if weight is None else weight.reshape(-1)
    if mask is not None:
        x = x[mask.reshape(-1)]
        w = None if w is None else w[mask.reshape(-1)]
    x = x.to(S.dtype)
    if x.shape[0]:
        S.addmm_(x.T if w is None else (x * w.to(S.dtype).unsqueeze(1)).T, x)
    return S, n + x.shape[0]


def hessian(S: torch.Tensor, n: int) -> torch.Tensor:
    """``2/n S`` as float32 (S, the sum of ``accumulate_hessian``, is scaled in place and then released)."""
    return hessian_with_scratch(S, n)[0]


def hessian_with_scratch(S: torch.Tensor, n: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``2/n S`` as float32, written over S's own memory: a float64 S [K, K] holds two float32 [K, K] matrices,
    so the Hessian takes the first half and the second is returned as scratch for the factorisation
    (``gptq_quantize``'s ``scratch``). S is consumed. No [K, K] matrix is allocated: a 7B down_proj's float64
    sum is 2.9 GB, and a float32 copy beside it and then a working copy beside that would add 1.4 GB each.
    -> (H, scratch or None when S is not a contiguous float64 matrix; then H is ``S.float()``)."""
    if n:
        S.mul_(2.0 / n)
    if S.dtype != torch.float64 or not S.is_contiguous() or S.dim() != 2:
        return S.float(), None
    k = S.shape[0]
    halves = S.view(-1).view(torch.float32)  # [2 K^2] over the same bytes
    H, scratch = halves[: k * k].view(k, k), halves[k * k:].view(k, k)
    for r0 in range(0, k, chunk):
        # float32 rows r0..r1 land on the bytes of float64 rows r0/2..r1/2, all read by now (this chunk's into rows)
        rows = S[r0:r0 + chunk].to(torch.float32)
        halves[r0 * k:r0 * k + rows.numel()] = rows.view(-1)
    return H, scratch


def damped_inverse_cholesky(H: torch.Tensor, damp_percent: float, damp_max: float,
                            perm: torch.Tensor | None = None,
                            out: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U = that inverse), raising damp (x2 each try)
    until it factorises; with ``perm``, of the permuted ``H[perm][:, perm]`` (act-order), gathered straight into the
    working copy. -> (U [K, K], damp_percent used); H is left as it was.

    With P the reversal permutation, P H P = M M^T (M lower) gives H = V V^T for the upper V = P M P, so
    U = V^-1 = P M^-1 P: one Cholesky and one triangular inverse (2/3 K^3 multiply-adds) instead of a Cholesky, a
    Cholesky inverse and a second Cholesky (4/3 K^3); 3.4x faster at K = 4096 here, equal to 4e-7. Everything runs
    in place in one working copy (two [K, K] matrices alive, H and U; the copy is ``out`` when given, e.g. the
    scratch of ``hessian_with_scratch``), and the loop ends for every input: damp must be finite and positive,
    and after at most log2(damp_max / damp_percent) + 2 tries it is an error."""
    if not (math.isfinite(damp_percent) and math.isfinite(damp_max) and 0 < damp_percent <= damp_max):
        raise ValueError(f"need 0 < damp_percent <= damp_max, both finite; got {damp_percent!r} and {damp_max!r}")
    mean_diag = torch.mean(torch.diag(H)).item()
    if not math.isfinite(mean_diag):
        raise CholeskyError("the Hessian holds NaN/inf: check the layer's inputs")
    damp = damp_percent
    info = torch.empty((), dtype=torch.int32, device=H.device)
    while True:
        work = _permuted_copy(H, perm, out)
        work.diagonal().add_(damp * mean_diag)
        _reverse_(work)
        _mirror_lower_(work)  # exactly symmetric: its transpose is itself, bit for bit
        # LAPACK factorises column-major matrices: given the row-major ``work`` torch copies it (1.4 GB for a 7B
        # down_proj); its transposed view is column-major and, being symmetric, holds the same matrix
        torch.linalg.cholesky_ex(work.mT, out=(work.mT, info))  # M, lower, in the transposed view
        if info.item() == 0:
            _transpose_(work)  # M, lower, row-major
            work.tril_()
            _invert_lower_(work)
            _reverse_(work)
            return work, damp
        del work
        if damp >= damp_max:
            raise CholeskyError(
                f"Hessian not positive definite even with damp_percent {damp:g} (limit {damp_max:g}): "
                "use more calibration samples or raise the damping limit"
            )
        damp = min(damp * 2, damp_max)


def _permuted_copy(H: torch.Tensor, perm: torch.Tensor | None, out: torch.Tensor | None = None,
                   chunk: int = 1024) -> torch.Tensor:
    """A copy of ``H`` (``H[perm][:, perm]`` for act-order) into ``out`` (a new matrix when None), gathered
    ``chunk`` rows at a time: the working copy the factorisation needs anyway, so act-order costs no [K, K]
    matrix more than the plain order (a 7B down_proj's Hessian is 1.4 GB)."""
    out = torch.empty_like(H) if out is None else out
    if perm is None:
        return out.copy_(H)
    for r0 in range(0, H.shape[0], chunk):
        out[r0:r0 + chunk] = H.index_select(0, perm[r0:r0 + chunk]).index_select(1, perm)
    return out


def _mirror_lower_(A: torch.Tensor, chunk: int = 1024) -> None:
    """A's strict upper triangle <- its strict lower one, transposed, in place (``chunk`` columns of temporary)."""
    k = A.shape[0]
    for c0 in range(0, k, chunk):
        c1 = min(c0 + chunk, k)
        block = A[c0:c1, c0:c1]
        block.copy_(block.tril() + block.tril(-1).mT)
        A[c0:c1, c1:] = A[c1:, c0:c1].mT  # the copy of a [k - c1, chunk] slice


def _transpose_(A: torch.Tensor, chunk: int = 1024) -> None:
    """A <- A^T in place, swapping ``chunk``-square blocks (one block of temporary)."""
    k = A.shape[0]
    for r0 in range(0, k, chunk):
        r1 = min(r0 + chunk, k)
        A[r0:r1, r0:r1] = A[r0:r1, r0:r1].mT.clone()
        for c0 in range(r1, k, chunk):
            c1 = min(c0 + chunk, k)
            upper = A[r0:r1, c0:c1].clone()
            A[r0:r1, c0:c1] = A[c0:c1, r0:r1].mT
            A[c0:c1, r0:r1] = upper.mT


def _reverse_(A: torch.Tensor, chunk: int = 1024) -> None:
    """A <- P A P (rows and columns reversed) in place, ``chunk`` rows of temporary at a time."""
    k = A.shape[0]
    for r0 in range(0, k // 2, chunk):
        r1 = min(r0 + chunk, k // 2)
        top = A[r0:r1].flip(0, 1)  # a copy: rows r0..r1 as they go to the bottom
        A[r0:r1] = A[k - r1:k - r0].flip(0, 1)
        A[k - r1:k - r0] = top
    if k % 2:
        A[k // 2] = A[k // 2].flip(0)


def _invert_lower_(A: torch.Tensor, base: int = 256, chunk: int = 1024) -> None:
    """A <- A^-1 in place for a lower-triangular A (zeros above the diagonal), by halves:
    [[X, 0], [B, Y]]^-1 = [[X^-1, 0], [-Y^-1 B X^-1, Y^-1]], the products in chunks of rows / columns."""
    n = A.shape[0]
    if n <= base:
        eye = torch.eye(n, dtype=A.dtype, device=A.device)
        A.copy_(torch.linalg.solve_triangular(A, eye, upper=False))
        return
    h = n // 2
    _invert_lower_(A[:h, :h], base, chunk)
    _invert_lower_(A[h:, h:], base, chunk)
    X_inv, Y_inv, B = A[:h, :h], A[h:, h:], A[h:, :h]
    for r in range(0, n - h, chunk):
        B[r:r + chunk] = B[r:r + chunk] @ X_inv
    for c in range(0, h, chunk):
        B[:, c:c + chunk] = -(Y_inv @ B[:, c:c + chunk])


def _group_params(cols: torch.Tensor, spec: QuantSpec, mse: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero [N, 1] of the columns [N, g] about to form one group: their min-max range, or with ``mse`` > 0
    the shrunk range that minimises the |error|^mse of rounding them (``rtn.mse_qparams``)."""
    if mse > 0:
        return mse_qparams(cols, spec, norm=mse)
    return minmax_qparams(cols.amin(1, keepdim=True), cols.amax(1, keepdim=True), spec)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, config: QuantConfig,
                  scratch: torch.Tensor | None = None,
                  qparams: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
                  ) -> tuple[QuantizedWeight, dict]:
    """GPTQ of ``w`` [N, K] given its input Hessian ``H`` [K, K], with ``config``'s spec, block size, damping,
    act-order and static groups; runs on ``w``'s device. A float32 ``H`` is used in place (its dead diagonal
    entries are set to 1): pass a copy to keep it. ``scratch``: a float32 [K, K] the inverse factor is built in
    (``hessian_with_scratch``'s; None: a new one). ``qparams``: per-channel specs only (group size -1), the grid
    fixed from the weight [N, K] -> (scale [N, 1], zero [N, 1]) instead of its min-max range (the INT8 W8A8 grid,
    ``int8.channel_qparams``).
    -> (codes, {"damp_percent", "dead_columns", "loss"})."""
    spec, block_size, desc_act = config.spec, config.block_size, config.desc_act
    static_groups = config.static_groups
    n_out, k = w.shape
    device = w.device
    g = spec.effective_group(k)
    H = H.detach().float()  # [K, K]; no copy when it is float32 already (a 7B down_proj's is 1.4 GB)
    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, make H invertible there
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else torch.arange(k, device=device)
    inv = torch.argsort(perm)
    W = w.detach().float()[:, perm] if desc_act else w.detach().float().clone()  # the one working copy [N, K]
    W[:, dead[perm]] = 0.0
    static = None
    if qparams is not None:
        if spec.group_size != -1:
            raise ValueError(f"a fixed grid (qparams) is per channel: group_size -1, got {spec.group_size}")
        static = [qparams(W)]
    elif static_groups or spec.group_size == -1:  # params fixed up front, on the original column order
        static = [_group_params(W[:, inv[c:c + g]], spec, config.mse) for c in range(0, k, g)]
    Hinv, damp_used = damped_inverse_cholesky(H, config.damp_percent, config.damp_max, perm if desc_act else None,
                                              scratch)
    del H

    Q = torch.zeros(n_out, k, dtype=torch.uint8, device=device)  # codes of at most 8 bits; int32 once, at the end
    scales = torch.zeros(n_out, k // g, device=device)
    zeros = torch.zeros(n_out, k // g, device=device)
    g_idx_perm = torch.zeros(k, dtype=torch.int32, device=device)  # group of each permuted column
    losses = torch.zeros(n_out, device=device)
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()  # [N, b]: updated within the block, written back lazily
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                grp = int(perm[col]) // g
                scale, zero = static[grp]
            elif col % g == 0:
                grp = col // g
                upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]  # the group's current values
                scale, zero = _group_params(upcoming, spec, config.mse)
            g_idx_perm[col] = grp
            scales[:, grp], zeros[:, grp] = scale[:, 0], zero[:, 0]
            wcol = W1[:, i]
            q = quantize(wcol.unsqueeze(1), scale, zero, spec.bits)  # [N, 1]
            deq = (scale * (q - zero)).flatten()
            Q[:, col] = q.flatten().to(torch.uint8)
            d = Hinv1[i, i]
            losses += (wcol - deq) ** 2 / d**2 / 2
            err = (wcol - deq) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    g_idx = g_idx_perm[inv] if (desc_act and static is None) else default_g_idx(k, spec).to(device)
    del W
    qw = QuantizedWeight(Q[:, inv].to(torch.int32), scales, zeros, g_idx.contiguous(), spec)
    info = {"damp_percent": damp_used, "dead_columns": int(dead.sum()), "loss": float(losses.sum())}
    return qw, info
