"""Fused dequantize-and-multiply for W4A16 / W8A16, reading qvlquant's packed layouts directly (no dequantized copy).

Reads top to bottom: the Triton kernel, its launch configurations, the wrapper (checks, allocation, dispatch by M),
the torch reference it is tested against, and the benchmark entry point (``kernels/bench_dequant_matmul.py``).

One kernel serves both layouts (``LAYOUT`` 0: GPTQ v1, codes packed along K in ``qweight`` [K*b/32, N], zeros-1
packed along N, optional act-order ``g_idx``; 1: AWQ GEMM, codes packed along N in the interleaved order, zeros as
is). Each program computes a [BLOCK_M, BLOCK_N] tile of ``x @ W^T`` over a 1/SPLIT_K slice of K, unpacking a
[BLOCK_K, BLOCK_N] tile of codes in registers. Decode (M <= 16) splits K across programs so that enough programs
stream the weight (the GEMV regime, bound by memory bandwidth); prefill uses plain tiles.

Under ``TRITON_INTERPRET=1`` (CPU, CI) tiles are upcast to fp32 before ``tl.dot``: the interpreter's bf16 dot is
wrong (numpy has no bf16), and only fp32 atomics are used for split-K in any case.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with the CUDA torch wheels
    triton = None

from qvlquant.quant.formats import PackFormat
from qvlquant.quant.rtn import QuantSpec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if triton is not None:

    @triton.jit
    def _dequant_matmul_kernel(
        x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, out_ptr,
        M, N, K, G,
        stride_xm, stride_om,
        BITS: tl.constexpr, GROUP: tl.constexpr, LAYOUT: tl.constexpr, ACT_ORDER: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        PER_WORD: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)  # [BM, BK]
            n_ok = offs_n < N
            j = offs_n % 8
            if LAYOUT == 0:  # GPTQ: qweight [K/PER_WORD, N], code k at bits (k % PER_WORD) * BITS
                words = tl.load(qw_ptr + (offs_k[:, None] // PER_WORD) * N + offs_n[None, :],
                                mask=k_ok[:, None] & n_ok[None, :], other=0)
                q = (words >> ((offs_k[:, None] % PER_WORD) * BITS)) & MASK
            else:  # AWQ: qweight [K, N/8], column j of a word at nibble (j % 2) * 4 + j // 2
                words = tl.load(qw_ptr + offs_k[:, None] * (N // 8) + (offs_n[None, :] // 8),
                                mask=k_ok[:, None] & n_ok[None, :], other=0)
                q = (words >> ((((j % 2) * 4) + (j // 2)) * 4)[None, :]) & MASK
            if ACT_ORDER:
                g = tl.load(gidx_ptr + offs_k, mask=k_ok, other=0)  # [BK] group of each input row
            else:
                g = offs_k // GROUP
            s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if LAYOUT == 0:  # zeros [G, N/PER_WORD] packed along N, stored minus one
                zw = tl.load(qz_ptr + g[:, None] * (N // PER_WORD) + offs_n[None, :] // PER_WORD,
                             mask=k_ok[:, None] & n_ok[None, :], other=0)
                z = ((zw >> ((offs_n[None, :] % PER_WORD) * BITS)) & MASK) + 1
                z = z & MASK
            else:
                zw = tl.load(qz_ptr + g[:, None] * (N // 8) + offs_n[None, :] // 8,
                             mask=k_ok[:, None] & n_ok[None, :], other=0)
                z = (zw >> ((((j % 2) * 4) + (j // 2)) * 4)[None, :]) & MASK
            w = (q - z).to(tl.float32) * s.to(tl.float32)  # [BK, BN]
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        o_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT_K == 1:
            tl.store(out, acc, mask=o_mask)
        else:
            tl.atomic_add(out, acc, mask=o_mask)


def launch_config(m: int, n: int, k: int) -> dict:
    """The default tiles by M: split-K GEMV-style tiles for decode, plain tiles for prefill (what the interpreter
    runs, and the first candidate of the autotuning on a GPU)."""
    return autotune_configs(m, n, k)[0]


def autotune_configs(m: int, n: int, k: int) -> list[dict]:
    """Candidate launch configurations for a problem of M rows, produced by rule rather than listed by hand:
    decode (M <= 16) tries more split-K and narrower N tiles, so that enough programs stream the weight; prefill
    tries larger tiles without split-K."""
    if m <= 16:
        splits = sorted({max(1, min(s, k // 256)) for s in (1, 2, 4, 8, 16)}, key=lambda s: -s)
        base = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=4)
                for sk in splits for bn in (64, 32, 128) for bk in (128, 64)]
        first = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=max(1, min(8, k // 512)), num_warps=4)
    elif m <= 64:
        base = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, SPLIT_K=sk, num_warps=4)
                for bm in (32, 64) for bn in (64, 128) for sk in (1, 2, 4) if sk == 1 or k >= 1024 * sk]
        first = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, SPLIT_K=max(1, min(4, k // 1024)), num_warps=4)
    else:
        base = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, num_warps=w)
                for bm, bn, bk, w in ((64, 128, 64, 8), (128, 128, 32, 8), (64, 64, 64, 4), (128, 64, 64, 4))]
        first = base[0]
    return [first] + [c for c in base if c != first]


_TUNED: dict[tuple, dict] = {}


def _m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())  # 1, 2, 4, ... : one tuning per power of two of M


def pick_config(key: tuple, candidates: list[dict], launch) -> dict:
    """The fastest candidate for ``key``, timed once on the GPU and cached; the first one when only one is allowed
    (the interpreter cannot time kernels). ``launch(cfg)`` runs the kernel into a scratch output."""
    if key in _TUNED:
        return _TUNED[key]
    if INTERPRET or len(candidates) == 1 or not torch.cuda.is_available():
        _TUNED[key] = candidates[0]
        return candidates[0]
    best, best_ms = candidates[0], float("inf")
    for cfg in candidates:
        try:
            launch(cfg)  # compile and warm up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                launch(cfg)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 5
        except Exception:  # a candidate that does not compile for this device (too much shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    return best


def check_supported(fmt: PackFormat, spec: QuantSpec, k: int, n: int) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: use the torch reference path")
    if fmt not in (PackFormat.GPTQ, PackFormat.AWQ_GEMM):
        raise NotImplementedError(f"no fused kernel for the {fmt.value} layout; use the torch reference")
    if spec.bits not in (4, 8) or (fmt is PackFormat.AWQ_GEMM and spec.bits != 4):
        raise NotImplementedError(f"fused kernel: {spec.bits}-bit {fmt.value} is not supported (W4A16 / W8A16 only)")
    if fmt is PackFormat.AWQ_GEMM and n % 8:
        raise ValueError(f"AWQ layout needs out_features divisible by 8, got {n}")
    if fmt is PackFormat.GPTQ and (k % (32 // spec.bits) or n % (32 // spec.bits)):
        raise ValueError(f"GPTQ {spec.bits}-bit layout needs in/out features divisible by {32 // spec.bits}, got {k}/{n}")


def has_act_order(g_idx: torch.Tensor | None, spec: QuantSpec, k: int) -> bool:
    return g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(k) // spec.effective_group(k))


def dequant_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], fmt: PackFormat, spec: QuantSpec,
                   in_features: int, bias: torch.Tensor | None = None, config: dict | None = None,
                   act_order: bool | None = None) -> torch.Tensor:
    """``x @ dequantize(W)^T (+ bias)`` without materialising W. x: [..., K] fp16/bf16/fp32 -> [..., N] in x's dtype."""
    k = in_features
    n = tensors["scales"].shape[1]
    check_supported(fmt, spec, k, n)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m = x2.shape[0]
    g_idx = tensors.get("g_idx")
    if act_order is None:  # callers that run it often (QuantLinear) pass it, saving a sync per call
        act_order = has_act_order(g_idx, spec, k)

    def launch(cfg: dict) -> torch.Tensor:
        out = torch.zeros(m, n, device=x.device, dtype=torch.float32)  # fp32: split-K accumulates with atomics
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        _dequant_matmul_kernel[grid](
            x2, tensors["qweight"], tensors["scales"], tensors["qzeros"], g_idx if act_order else tensors["qzeros"],
            out, m, n, k, spec.groups(k), x2.stride(0), out.stride(0),
            BITS=spec.bits, GROUP=spec.effective_group(k), LAYOUT=0 if fmt is PackFormat.GPTQ else 1,
            ACT_ORDER=act_order, UPCAST=INTERPRET or x.dtype == torch.float32,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
            num_warps=cfg.get("num_warps", 4),
        )
        return out

    if config is None:
        key = (_m_bucket(m), n, k, fmt, spec, x.dtype, act_order, str(x.device))
        config = pick_config(key, autotune_configs(m, n, k), launch)
    out = launch(config)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*lead, n)


def reference_dequant_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], fmt: PackFormat, spec: QuantSpec,
                             in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize then matmul, in fp32 (what the kernel is tested against)."""
    w = fmt.unpack({k: v.cpu() for k, v in tensors.items()}, spec, in_features).dequantize().to(x.device)  # [N, K]
    out = x.float() @ w.T
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
