"""The fused kernels against the torch dequantize-then-matmul reference. On CPU they run in Triton's interpreter
(TRITON_INTERPRET=1, set in conftest before triton is imported): bf16 tiles are upcast to fp32 before tl.dot there,
because the interpreter's bf16 dot is wrong; fp16 and fp32 inputs are tested as they are."""

import pytest
import torch

from qvlquant.quant.formats import PackFormat, QuantizedWeight
from qvlquant.quant.rtn import QuantSpec, default_g_idx, rtn_quantize

kernels = pytest.importorskip("qvlquant.kernels.dequant_matmul")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed(n, k, spec, fmt, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, scale, zero = rtn_quantize(torch.randn(n, k, generator=g), spec)
    g_idx = default_g_idx(k, spec)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    w = QuantizedWeight(q, scale, zero, g_idx, spec)
    return {name: t.to(DEVICE) for name, t in fmt.pack(w).items()}


CASES = [
    (PackFormat.GPTQ, QuantSpec(4, 128, True), False),
    (PackFormat.GPTQ, QuantSpec(4, 32, False), False),
    (PackFormat.GPTQ, QuantSpec(4, 64, True), True),  # act-order g_idx
    (PackFormat.GPTQ, QuantSpec(8, 128, True), False),
    (PackFormat.GPTQ, QuantSpec(8, -1, True), False),
    (PackFormat.GPTQ, QuantSpec(4, -1, False), False),
    (PackFormat.AWQ_GEMM, QuantSpec(4, 128, False), False),
    (PackFormat.AWQ_GEMM, QuantSpec(4, 32, False), False),
]


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("fmt,spec,act_order", CASES, ids=lambda c: getattr(c, "value", str(c)))
def test_kernel_matches_reference(m, fmt, spec, act_order):
    k, n = 256, 128
    tensors = packed(n, k, spec, fmt, act_order)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, torch.float16)
    bias = torch.randn(n).to(DEVICE, torch.float16)
    out = kernels.dequant_matmul(x, tensors, fmt, spec, k, bias)
    ref = kernels.reference_dequant_matmul(x, tensors, fmt, spec, k, bias)
    assert out.shape == (m, n) and out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtypes_and_split_k(dtype):
    k, n = 1024, 64  # k // 512 = 2: decode splits K across programs and sums with fp32 atomics
    spec = QuantSpec(4, 128, True)
    tensors = packed(n, k, spec, PackFormat.GPTQ)
    x = torch.randn(2, 3, k).to(DEVICE, dtype)  # leading dims are kept
    cfg = kernels.launch_config(6, n, k)
    assert cfg["SPLIT_K"] == 2
    out = kernels.dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k)
    ref = kernels.reference_dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k)
    assert out.shape == (2, 3, n) and out.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-1) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_odd_shapes_are_masked():
    k, n = 96, 40  # not multiples of the tiles
    spec = QuantSpec(8, 32, True)
    tensors = packed(n, k, spec, PackFormat.GPTQ)
    x = torch.randn(5, k).to(DEVICE, torch.float16)
    torch.testing.assert_close(kernels.dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k).float(),
                               kernels.reference_dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k).float(),
                               rtol=2e-3, atol=2e-2)


def test_unsupported_is_loud():
    spec = QuantSpec(3, 128, True)
    with pytest.raises(NotImplementedError, match="3-bit gptq is not supported"):
        kernels.dequant_matmul(torch.zeros(1, 256), packed(64, 256, spec, PackFormat.GPTQ), PackFormat.GPTQ, spec, 256)
    with pytest.raises(NotImplementedError, match="pack_quantized"):
        kernels.check_supported(PackFormat.COMPRESSED, QuantSpec(4, 128, True), 256, 64)
    with pytest.raises(ValueError, match="input features"):
        s4 = QuantSpec(4, 128, True)
        kernels.dequant_matmul(torch.zeros(1, 128), packed(64, 256, s4, PackFormat.GPTQ), PackFormat.GPTQ, s4, 256)


@pytest.mark.parametrize("fmt,spec,act_order", [CASES[2], CASES[6]], ids=["gptq-act-order", "awq"])
def test_quant_linear_fused_path_matches_its_reference_path(fmt, spec, act_order):
    """QuantLinear takes the fused kernel on CUDA; on CPU both paths can be compared directly."""
    from qvlquant.runtime import QuantLinear

    k, n = 256, 64
    q, scale, zero = rtn_quantize(torch.randn(n, k), spec)
    g_idx = default_g_idx(k, spec)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(0))]
    layer = QuantLinear.from_weight(QuantizedWeight(q, scale, zero, g_idx, spec), fmt, torch.randn(n))
    x = torch.randn(4, 7, k)
    torch.testing.assert_close(layer._fused(x), layer(x), rtol=1e-4, atol=1e-3)
    assert layer._act_order is act_order


def test_autotune_candidates_and_choice():
    for m, k in ((1, 4096), (16, 512), (33, 8192), (2048, 4096)):
        cands = kernels.autotune_configs(m, 4096, k)
        assert cands[0] == kernels.launch_config(m, 4096, k) and len(cands) > 1
        assert len({tuple(sorted(c.items())) for c in cands}) == len(cands)  # no duplicates
        assert all(c["BLOCK_M"] >= 16 and (c["SPLIT_K"] == 1 or m <= 64) for c in cands)
    assert {c["SPLIT_K"] for c in kernels.autotune_configs(1, 4096, 4096)} >= {1, 8, 16}
    ran = []
    key = ("test-key",)
    assert kernels.pick_config(key, [{"a": 1}, {"a": 2}], ran.append) == {"a": 1}  # interpreter/CPU: the first
    assert ran == [] and kernels.pick_config(key, [{"a": 3}], ran.append) == {"a": 1}  # cached per key
