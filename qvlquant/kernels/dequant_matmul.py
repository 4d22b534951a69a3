"""Fused dequantize-and-multiply for W4A16 / W8A16, reading qvlquant's packed layouts directly (no dequantized copy).

Reads top to bottom: the Triton kernels (the fused one, the split-K sum, a dequantize-only one); the wrapper (launch
configurations by M, the autotuner, layout checks, allocation and dispatch, the torch operator QuantLinear calls);
the torch reference the kernels are tested against; the two-step baseline the benchmark times the fused kernel
against. The benchmark and the ahead-of-time compile report are scripts: ``benchmarks/bench_dequant_matmul.py`` and
``benchmarks/compile_report.py``.

One kernel serves both layouts (``LAYOUT`` 0: GPTQ v1, codes packed along K in ``qweight`` [K*b/32, N], zeros-1
packed along N, optional act-order ``g_idx``; 1: AWQ GEMM, codes packed along N in the interleaved order
``AWQ_PACK_ORDER`` of quant/formats.py, zeros as is). Each program computes a [BLOCK_M, BLOCK_N] tile of
``x @ W^T`` over a 1/SPLIT_K slice of K: it loads each packed word of its tile once and unpacks it in registers into
a [BLOCK_K, BLOCK_N] tile of codes, and when the K tile lies inside one quantization group it loads one row of
scales and zeros per tile. Decode (M <= 16) splits K
across programs so that enough programs stream the weight (the GEMV regime, bound by memory bandwidth); prefill
uses plain tiles. Without split-K the result is written once, in the input's dtype, bias included.

Under ``TRITON_INTERPRET=1`` (CPU, CI) tiles are upcast to fp32 before ``tl.dot``: the interpreter's bf16 dot is
wrong (numpy has no bf16). Split-K uses no atomics: each K slice stores fp32 partials, a second small kernel sums
them in a fixed order, so results repeat bit for bit.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime import OutOfResources
except ImportError:  # pragma: no cover - triton ships with the CUDA torch wheels
    triton = None

    class OutOfResources(Exception):  # stand-in: without triton nothing is launched, so nothing raises it
        pass

from qvlquant.quant.formats import AWQ_PACK_ORDER, PackFormat, is_contiguous_groups
from qvlquant.quant.spec import QuantSpec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the nibble (0..7) of an AWQ word that holds its column j, in bits 4j..4j+3: AWQ_PACK_ORDER inverted (0x73625140)
AWQ_NIBBLE_OF_COLUMN = sum(AWQ_PACK_ORDER.index(j) << (4 * j) for j in range(8))

if triton is not None:
    _AWQ_NIBBLES = tl.constexpr(AWQ_NIBBLE_OF_COLUMN)  # kernels read globals only as constexpr

    @triton.jit
    def _dequant_tile(qw_ptr, scales_ptr, qz_ptr, gidx_ptr, k0, pid_n, N, K,
                      BITS: tl.constexpr, GROUP: tl.constexpr, LAYOUT: tl.constexpr, ACT_ORDER: tl.constexpr,
                      TILE_IN_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows k0 .. k0+BLOCK_K of W^T, columns of N tile ``pid_n``, dequantized: a [BLOCK_K, BLOCK_N] fp32 tile."""
        PER_WORD: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        NIBBLES: tl.constexpr = _AWQ_NIBBLES
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = offs_k < K
        n_ok = offs_n < N
        if LAYOUT == 0:  # GPTQ: qweight [K/PER_WORD, N], code k at bits (k % PER_WORD) * BITS of word k // PER_WORD
            offs_w = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
            words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :],
                            mask=(offs_w[:, None] < K // PER_WORD) & n_ok[None, :], other=0)  # each word once
            shifts = tl.arange(0, PER_WORD) * BITS
            q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & MASK, (BLOCK_K, BLOCK_N))
            z_word = offs_n // PER_WORD  # zeros [G, N/PER_WORD], packed along N, stored minus one
            z_shift = (offs_n % PER_WORD) * BITS
        else:  # AWQ: qweight [K, N/8], column j of a word in the nibble AWQ_NIBBLE_OF_COLUMN names (codes and zeros)
            offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
            words = tl.load(qw_ptr + offs_k[:, None] * (N // 8) + offs_w[None, :],
                            mask=k_ok[:, None] & (offs_w[None, :] < N // 8), other=0)  # each word once
            shifts = ((NIBBLES >> (tl.arange(0, 8) * 4)) & 0xF) * 4  # [8]
            q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_K, BLOCK_N))
            z_word = offs_n // 8
            z_shift = ((NIBBLES >> ((offs_n % 8) * 4)) & 0xF) * 4  # [BN]
        if TILE_IN_GROUP:  # the whole K tile lies in one group: one row of scales and zeros per tile
            g = k0 // GROUP
            s = tl.load(scales_ptr + g * N + offs_n, mask=n_ok, other=0.0)[None, :]  # [1, BN]
            zw = tl.load(qz_ptr + g * (N * BITS // 32) + z_word, mask=n_ok, other=0)[None, :]
        else:  # act-order g_idx, or groups smaller than the tile: a group per input row
            if ACT_ORDER:
                g = tl.load(gidx_ptr + offs_k, mask=k_ok, other=0)
            else:
                g = offs_k // GROUP
            s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            zw = tl.load(qz_ptr + g[:, None] * (N * BITS // 32) + z_word[None, :],
                         mask=k_ok[:, None] & n_ok[None, :], other=0)
        z = (zw >> z_shift[None, :]) & MASK
        if LAYOUT == 0:
            z = (z + 1) & MASK
        return (q - z).to(tl.float32) * s.to(tl.float32)

    @triton.jit
    def dequant_matmul_kernel(
        x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, bias_ptr, out_ptr,
        M, N, K,
        stride_xm, stride_om,
        BITS: tl.constexpr, GROUP: tl.constexpr, LAYOUT: tl.constexpr, ACT_ORDER: tl.constexpr,
        TILE_IN_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_per_split = (K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)  # [BM, BK]
            w = _dequant_tile(qw_ptr, scales_ptr, qz_ptr, gidx_ptr, k0, pid_n, N, K, BITS, GROUP, LAYOUT, ACT_ORDER,
                              TILE_IN_GROUP, BLOCK_N, BLOCK_K)  # [BK, BN]
            if BLOCK_M == 1:  # GEMV (decode at batch 1): multiply and reduce over K in registers, no tensor cores
                acc += tl.sum(tl.trans(x).to(tl.float32) * w, axis=0)[None, :]
            elif UPCAST:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        o_mask = (offs_m[:, None] < M) & n_ok[None, :]
        if SPLIT_K == 1:  # straight into the caller's dtype, bias included
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:  # this K slice's fp32 partial sums, plane pid_k of [SPLIT_K, M, N]; _split_k_sum adds them up
            out = out_ptr + pid_k * M * stride_om + offs_m[:, None] * stride_om + offs_n[None, :]
            tl.store(out, acc, mask=o_mask)

    @triton.jit
    def _split_k_sum(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK: tl.constexpr):
        """out = sum of the SPLIT_K partial planes (+ bias), in out's dtype: a fixed order, so results repeat
        bit for bit (atomics would not), and no zero-filled buffer or separate cast."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _dequant_kernel(qw_ptr, scales_ptr, qz_ptr, gidx_ptr, out_ptr, N, K,
                        BITS: tl.constexpr, GROUP: tl.constexpr, LAYOUT: tl.constexpr, ACT_ORDER: tl.constexpr,
                        TILE_IN_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """W^T [K, N] in the output's dtype: the first half of dequantize-then-matmul, the baseline the fused kernel
        must beat (what GPTQModel's Triton path does before calling matmul)."""
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        w = _dequant_tile(qw_ptr, scales_ptr, qz_ptr, gidx_ptr, pid_k * BLOCK_K, pid_n, N, K, BITS, GROUP, LAYOUT,
                          ACT_ORDER, TILE_IN_GROUP, BLOCK_N, BLOCK_K)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


def launch_config(m: int, n: int, k: int, group: int | None = None, act_order: bool = False) -> dict:
    """The default tiles by M: split-K GEMV-style tiles for decode, plain tiles for prefill (what the interpreter
    runs, and the first candidate of the autotuning on a GPU)."""
    return autotune_configs(m, n, k, group, act_order)[0]


def autotune_configs(m: int, n: int, k: int, group: int | None = None, act_order: bool = False) -> list[dict]:
    """Candidate launch configurations for a problem of M rows, produced by rule rather than listed by hand:
    decode (M <= 16) tries more split-K and narrower N tiles, so that enough programs stream the weight (at M = 1
    also BLOCK_M = 1 tiles, the GEMV variant that reduces in registers instead of padding M to 16 for tl.dot);
    prefill tries larger tiles without split-K. With a quantization ``group`` smaller than a K tile, the tile shrinks to the
    group, so each tile reads one row of scales and zeros (``TILE_IN_GROUP``) instead of one per input row. With
    act-order every input row has its own group index (a [BLOCK_K, BLOCK_N] tile of scales and zeros), so its K
    tiles are halved: at full size they spill registers on sm_80 and sm_90 (benchmarks/compile_report.py, which
    compiles every candidate for both without a GPU)."""
    k_tiles = (64, 32) if act_order else (128, 64)
    if m <= 16:
        splits = sorted({max(1, min(s, k // 256)) for s in (1, 2, 4, 8, 16)}, key=lambda s: -s)
        base = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=4, num_stages=st)
                for sk in splits for bn in (64, 32, 128) for bk in k_tiles for st in (3, 4)]
        first = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=k_tiles[0], SPLIT_K=max(1, min(8, k // 512)), num_warps=4,
                     num_stages=3)
        if m == 1:  # a single row: also the GEMV variant, which skips the tensor cores' operand shuffle
            base += [dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=4, num_stages=3)
                     for sk in splits for bn in (64, 32, 128) for bk in k_tiles
                     if bn * bk <= 8192]  # 64 weights per thread at 4 warps: larger tiles spill (compile report)
    elif m <= 64:
        base = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=k_tiles[1], SPLIT_K=sk, num_warps=4, num_stages=3)
                for bm in (32, 64) for bn in (64, 128) for sk in (1, 2, 4) if sk == 1 or k >= 1024 * sk]
        first = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=k_tiles[1], SPLIT_K=max(1, min(4, k // 1024)), num_warps=4,
                     num_stages=3)
    else:
        base = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, num_warps=w, num_stages=3)
                for bm, bn, bk, w in ((64, 128, 64, 8), (128, 128, 32, 8), (64, 64, 64, 4), (128, 64, 64, 8))]
        first = base[0]
    configs = [first] + [c for c in base if c != first]
    if group is not None and group < k and not act_order:
        configs = [dict(c, BLOCK_K=min(c["BLOCK_K"], _pow2_floor(group))) for c in configs]
        configs = [c for i, c in enumerate(configs) if c not in configs[:i]]
    return configs


def _pow2_floor(v: int) -> int:
    return 1 << (v.bit_length() - 1)  # tile sizes are powers of two (tl.arange)


_TUNED: dict[tuple, dict] = {}


def _m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())  # 1, 2, 4, ... : one tuning per power of two of M


def is_resource_error(e: Exception) -> bool:
    """Whether a launch failed because this device cannot hold the configuration (shared memory, threads, or
    registers x threads), the one failure a candidate may be skipped for."""
    msg = str(e)
    return isinstance(e, OutOfResources) or "too many resources requested for launch" in msg \
        or "uses too much shared data" in msg  # the CUDA driver's and ptxas's words for the same limits


def fastest_config(candidates: list[dict], launch, time_ms, key: tuple = ()) -> dict:
    """The candidate with the lowest ``time_ms(cfg)``, each first run once by ``launch(cfg)`` (compile, warm up).
    A candidate this device cannot hold is skipped; any other failure is a bug in the kernel or its launch and is
    raised, naming the candidate."""
    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            launch(cfg)
            ms = time_ms(cfg)
        except Exception as e:
            if is_resource_error(e):
                continue
            raise RuntimeError(f"autotuning {key}: launch configuration {cfg} failed for a reason other than the "
                               f"device's resources ({type(e).__name__}: {e}); pass config= to run another one") from e
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"autotuning {key}: none of the {len(candidates)} launch configurations fits this device")
    return best


def _cuda_time_ms(launch, cfg: dict) -> float:
    """Mean milliseconds of ``launch(cfg)`` by CUDA events. Decode kernels take microseconds: they are repeated for
    about 1 ms so that the events resolve them."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def mean_ms(reps: int) -> float:
        start.record()
        for _ in range(reps):
            launch(cfg)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    estimate = mean_ms(3)
    return mean_ms(max(5, min(200, int(1.0 / max(estimate, 1e-3)))))


def pick_config(key: tuple, candidates: list[dict], launch) -> dict:
    """The fastest candidate for ``key``, timed once on the GPU and cached; the first one when only one is allowed
    or nothing can be timed (the interpreter, no CUDA). ``launch(cfg)`` runs the kernel into a scratch output."""
    if key not in _TUNED:
        if INTERPRET or len(candidates) == 1 or not torch.cuda.is_available():
            _TUNED[key] = candidates[0]
        else:
            _TUNED[key] = fastest_config(candidates, launch, lambda cfg: _cuda_time_ms(launch, cfg), key)
    return _TUNED[key]


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
    return g_idx is not None and not is_contiguous_groups(g_idx, spec, k)


def _checked(tensors: dict[str, torch.Tensor], fmt: PackFormat, spec: QuantSpec, k: int,
             act_order: bool | None) -> tuple[int, torch.Tensor | None, bool]:
    """-> (out_features, g_idx, act_order) after checking the layout is supported. Callers that run often
    (QuantLinear) pass ``act_order``, saving the comparison (a device sync) per call."""
    n = tensors["scales"].shape[1]
    check_supported(fmt, spec, k, n)
    g_idx = tensors.get("g_idx")
    if act_order is None:
        act_order = has_act_order(g_idx, spec, k)
    return n, g_idx, act_order


def kernel_constants(fmt: PackFormat, spec: QuantSpec, k: int, x_dtype: torch.dtype, act_order: bool, has_bias: bool,
                     cfg: dict) -> dict:
    """The kernel's compile-time constants for one problem and launch configuration."""
    group = spec.effective_group(k)
    return dict(BITS=spec.bits, GROUP=group, LAYOUT=0 if fmt is PackFormat.GPTQ else 1, ACT_ORDER=act_order,
                TILE_IN_GROUP=not act_order and group % cfg["BLOCK_K"] == 0, HAS_BIAS=has_bias,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
                UPCAST=INTERPRET or x_dtype == torch.float32)


def dequant_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], fmt: PackFormat, spec: QuantSpec,
                   in_features: int, bias: torch.Tensor | None = None, config: dict | None = None,
                   act_order: bool | None = None) -> torch.Tensor:
    """``x @ dequantize(W)^T (+ bias)`` without materialising W. x: [..., K] fp16/bf16/fp32 -> [..., N] in x's dtype.

    One kernel launch when K is not split (the output is written in x's dtype, bias added in the kernel); split-K
    stores fp32 partials per K slice and a second launch sums them (+ bias) into x's dtype."""
    k = in_features
    n, g_idx, act_order = _checked(tensors, fmt, spec, k, act_order)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m = x2.shape[0]
    qzeros = tensors["qzeros"]

    def launch(cfg: dict) -> torch.Tensor:
        split = cfg["SPLIT_K"]
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        part = out if split == 1 else torch.empty(split, m, n, device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
        dequant_matmul_kernel[grid](
            x2, tensors["qweight"], tensors["scales"], qzeros, g_idx if act_order else qzeros,
            bias if bias is not None else qzeros, part, m, n, k, x2.stride(0), n,
            **kernel_constants(fmt, spec, k, x.dtype, act_order, bias is not None, cfg),
            num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
        )
        if split > 1:
            _split_k_sum[(triton.cdiv(m * n, 1024),)](part, bias if bias is not None else part, out, m * n, n,
                                                      SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=1024)
        return out

    if config is None:
        key = (_m_bucket(m), n, k, fmt, spec, x.dtype, act_order, bias is not None, str(x.device))
        config = pick_config(key, autotune_configs(m, n, k, spec.effective_group(k), act_order), launch)
    return launch(config).reshape(*lead, n)


@torch.library.custom_op("qvlquant::dequant_matmul", mutates_args=())
def dequant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                      g_idx: torch.Tensor | None, bias: torch.Tensor | None, fmt: str, bits: int, group_size: int,
                      sym: bool, in_features: int, act_order: bool) -> torch.Tensor:
    """``dequant_matmul`` as a torch operator: torch.compile sees one opaque op (no graph break on the launch
    logic and the autotuning cache) and CUDA graphs capture its kernels. QuantLinear calls this on CUDA."""
    tensors = {"qweight": qweight, "scales": scales, "qzeros": qzeros}
    if g_idx is not None:
        tensors["g_idx"] = g_idx
    return dequant_matmul(x, tensors, PackFormat(fmt), QuantSpec(bits, group_size, sym), in_features, bias,
                          act_order=act_order)


@dequant_matmul_op.register_fake
def _(x, qweight, scales, qzeros, g_idx, bias, fmt, bits, group_size, sym, in_features, act_order):
    return x.new_empty(*x.shape[:-1], scales.shape[1])


def reference_dequant_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], fmt: PackFormat, spec: QuantSpec,
                             in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize then matmul, in fp32 (what the kernel is tested against)."""
    w = fmt.unpack({k: v.cpu() for k, v in tensors.items()}, spec, in_features).dequantize().to(x.device)  # [N, K]
    out = x.float() @ w.T
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


# The two-step baseline benchmarks/bench_dequant_matmul.py times the fused kernel against.


def dequantize(tensors: dict[str, torch.Tensor], fmt: PackFormat, spec: QuantSpec, in_features: int,
               dtype: torch.dtype = torch.bfloat16, act_order: bool | None = None) -> torch.Tensor:
    """The whole weight, transposed ([K, N], ``dtype``), written by a Triton kernel from the packed layout."""
    k = in_features
    n, g_idx, act_order = _checked(tensors, fmt, spec, k, act_order)
    qzeros = tensors["qzeros"]
    cfg = dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=64 if act_order else min(64, _pow2_floor(spec.effective_group(k))),
               SPLIT_K=1)
    consts = kernel_constants(fmt, spec, k, dtype, act_order, False, cfg)
    out = torch.empty(k, n, device=qzeros.device, dtype=dtype)
    grid = (triton.cdiv(k, cfg["BLOCK_K"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _dequant_kernel[grid](tensors["qweight"], tensors["scales"], qzeros, g_idx if act_order else qzeros, out, n, k,
                          **{c: consts[c] for c in ("BITS", "GROUP", "LAYOUT", "ACT_ORDER", "TILE_IN_GROUP",
                                                    "BLOCK_N", "BLOCK_K")})
    return out


def dequantize_then_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], fmt: PackFormat, spec: QuantSpec,
                           in_features: int, act_order: bool | None = None) -> torch.Tensor:
    """The two-step baseline: the weight dequantized in full by a kernel, then a dense matmul (cuBLAS on a GPU)."""
    return x @ dequantize(tensors, fmt, spec, in_features, x.dtype, act_order)
