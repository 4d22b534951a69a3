"""INT8 W8A8 math: per-channel weights, per-token activations, and the product the int8 kernels compute."""

import pytest
import torch

from qvlquant.quant import int8
from qvlquant.quant.formats import DATAFREE_SCHEMES, Int8Format

SHAPES = [(256, 384), (1, 129), (130, 5), (64, 4096)]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_half_a_step_and_exact_on_the_codes(shape, scale_dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * torch.rand(shape[0], 1) * 3).to(torch.bfloat16)  # rows of different magnitude
    fmt = Int8Format.CHANNEL
    packed = fmt.pack(w, scale_dtype=scale_dtype)
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == fmt.tensor_shapes(shape[1], shape[0],
                                                                                           scale_dtype)
    back = fmt.unpack(packed)
    scale = packed["weight_scale"].float()  # [N, 1]
    err = (back - w.float()).abs()
    # half a step, plus float32 rounding of the division and the product (|w| * 2**-22); a bf16 scale is rounded
    # before it divides, so the codes also carry its relative error (2**-8, at most half a step more at +-127)
    slack = w.float().abs() * (2**-8 if scale_dtype == torch.bfloat16 else 2**-22)
    assert bool((err <= scale / 2 + slack).all()), float((err - scale / 2 - slack).max())
    assert int(packed["weight"].abs().max()) <= 127
    if scale_dtype == torch.float32:  # each row's largest value lands on +-127
        assert torch.equal(packed["weight"].abs().amax(1), torch.full((shape[0],), 127, dtype=torch.int8))
    # the stored pair re-packs to itself: the codes are a fixed point of the round trip
    again = fmt.pack(back, scale_dtype=scale_dtype)
    assert torch.equal(again["weight"], packed["weight"]) and torch.equal(again["weight_scale"], packed["weight_scale"])
    assert torch.equal(fmt.scale(w, scale_dtype=scale_dtype), packed["weight_scale"])  # the scale alone
    sqnr = 10 * torch.log10(w.float().pow(2).sum() / (back - w.float()).pow(2).sum())
    assert sqnr > 38, float(sqnr)  # measured 41.2 - 48.8 dB on these rows


def test_zero_rows_stay_exactly_zero_with_scale_one():
    w = torch.randn(4, 16)
    w[2] = 0
    packed = Int8Format.CHANNEL.pack(w)
    assert float(packed["weight_scale"][2]) == 1.0 and not packed["weight"][2].any()
    assert not Int8Format.CHANNEL.unpack(packed)[2].any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_an_error_naming_it(bad):
    w = torch.randn(8, 8)
    w[3, 3] = bad
    with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj.weight holds NaN or infinite values \(1 of 64\)"):
        Int8Format.CHANNEL.pack(w, "layers.0.mlp.up_proj.weight")


def test_dequantize_refuses_a_scale_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"weight_scale is \[1, 8\], a \[8, 16\] weight per channel needs \[8, 1\]"):
        int8.dequantize_channels(torch.zeros(8, 16, dtype=torch.int8), torch.ones(1, 8))


def test_activations_per_token_within_half_a_step_and_independent_of_other_tokens():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 10
    x[1, 2] = 0  # an all-zero token: codes 0, a finite scale
    q, scale = int8.quantize_activations(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 5, 1)
    assert torch.equal(q.abs().amax(-1)[scale[..., 0] > 1e-9], torch.full((14,), 127, dtype=torch.int8))
    assert not q[1, 2].any() and bool(torch.isfinite(scale).all())
    err = (int8.fake_quantize_activations(x) - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())
    y = x.clone()
    y[0, 0] *= 1000  # another token's magnitude changes nothing here
    assert torch.equal(int8.quantize_activations(y)[0][1:], q[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_product_is_the_integer_matmul_times_both_scales(dtype):
    """What vLLM's cutlass int8 kernel computes: int32 sums of int8 products, then token scale x channel scale,
    plus the bias; here with the sums taken in int64, independently of the float32 emulation."""
    torch.manual_seed(2)
    w, b = torch.randn(96, 1024), torch.randn(96)
    x = (torch.randn(2, 9, 1024) * torch.rand(2, 9, 1) * 4).to(dtype)
    qw, sw = int8.quantize_channels(w)
    qx, sx = int8.quantize_activations(x)
    acc = qx.long() @ qw.long().t()  # [2, 9, 96] exact integers
    expected = (sx.double() * (acc.double() * sw.double().view(-1)) + b.double()).to(dtype)
    got = int8.w8a8_linear(x, qw, sw, b.to(dtype))
    assert got.dtype == dtype
    # float32: the emulation's sums are exact here (|acc| < 2**24), the scales multiply with float32 rounding;
    # bf16: then one rounding to the output dtype (the double reference rounds once, the emulation may differ by an ulp)
    tol = {torch.float32: dict(rtol=1e-6, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=1e-2)}[dtype]
    torch.testing.assert_close(got, expected, **tol)
    assert int(acc.abs().max()) < 2**24
    exact = torch.nn.functional.linear(x.float(), w, b)
    rel = float((got.float() - exact).norm() / exact.norm())
    assert 1e-3 < rel < 0.02, rel  # two int8 roundings (measured 0.011)


def test_the_scheme_names_its_format():
    assert DATAFREE_SCHEMES["W8A8"] is Int8Format.CHANNEL
