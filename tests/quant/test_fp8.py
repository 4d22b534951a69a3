import pytest
import torch

from qvlquant.quant import fp8
from qvlquant.quant.formats import CALIBRATED_SCHEMES, FP8_SCHEMES, Fp8Format

SHAPES = [(256, 384), (128, 128), (200, 300), (1, 129), (130, 5)]  # whole blocks and partial ones at both edges


def reference_blocks(w: torch.Tensor, block=(128, 128)):
    """Block by block with Python loops: the convention of transformers' Fp8Quantize (scale_inv = amax / 448,
    1 for an all-zero block) written independently of the vectorised code."""
    n, k = w.shape
    rows, cols = -(-n // block[0]), -(-k // block[1])
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols)
    for r in range(rows):
        for c in range(cols):
            sl = (slice(r * block[0], (r + 1) * block[0]), slice(c * block[1], (c + 1) * block[1]))
            amax = w[sl].abs().max()
            s = amax / 448 if amax > 0 else torch.tensor(1.0)
            scale[r, c] = s
            q[sl] = (w[sl] / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


def error_bound(w: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    """e4m3 rounds to 3 mantissa bits: half a step is 2**-4 of a normal value; below 2**-6 (x scale) the subnormal
    step is 2**-9, so half of it is 2**-10 x scale."""
    return w.abs() * 2**-4 + scale_full * 2**-10


@pytest.mark.parametrize("shape", SHAPES)
def test_blocks_match_the_loop_reference_bit_for_bit(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3  # rows of different magnitude
    q, scale = fp8.quantize_blocks(w)
    ref_q, ref_scale = reference_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(scale, ref_scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_round_trip_error_within_e4m3_rounding(shape, fmt):
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=torch.bfloat16)
    packed = fmt.pack(w)
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == fmt.tensor_shapes(shape[1], shape[0])
    back = fmt.unpack(packed)
    scale = packed[fmt.scale_name]
    full = fp8.expand_block_scales(scale, shape) if fmt is Fp8Format.BLOCK else scale.expand(shape)
    err = (back - w.float()).abs()
    assert bool((err <= error_bound(w.float(), full) * (1 + 1e-6)).all()), float((err - error_bound(w.float(), full)).max())
    sqnr = 10 * torch.log10(w.float().pow(2).sum() / (back - w.float()).pow(2).sum())
    assert sqnr > 28, float(sqnr)  # measured 31.1-31.6 dB on Gaussian weights
    assert not torch.equal(back, w.float())  # it did round
    assert torch.equal(fmt.scale(w), scale)  # the scale alone is the packed one


@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_requantizing_the_dequantized_weight_gives_the_same_codes(fmt):
    torch.manual_seed(2)
    w = torch.randn(256, 256)
    packed = fmt.pack(w)
    again = fmt.pack(fmt.unpack(packed))
    assert torch.equal(again["weight"].view(torch.uint8), packed["weight"].view(torch.uint8))
    torch.testing.assert_close(again[fmt.scale_name], packed[fmt.scale_name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", list(FP8_SCHEMES.values()))  # per tensor: test_an_all_zero_tensor_...
def test_zero_blocks_stay_exactly_zero_with_scale_one(fmt):
    w = torch.randn(256, 256)
    w[:128, :128] = 0  # one whole block (and, per channel, rows 0-127 partly)
    w[200] = 0  # one whole row
    packed = fmt.pack(w)
    back = fmt.unpack(packed)
    assert torch.equal(back[:128, :128], torch.zeros(128, 128)) and torch.equal(back[200], torch.zeros(256))
    scale = packed[fmt.scale_name]
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert float(scale[0, 0] if fmt is Fp8Format.BLOCK else scale[200, 0]) == 1.0


def test_the_largest_value_of_each_block_lands_on_448():
    torch.manual_seed(3)
    w = torch.randn(256, 256)
    q, _ = fp8.quantize_blocks(w)
    assert float(q.float().abs().amax()) == 448.0
    qc, _ = fp8.quantize_channels(w)
    assert torch.equal(qc.float().abs().amax(1), torch.full((256,), 448.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_non_finite_weight_is_an_error_naming_it(bad, fmt):
    w = torch.randn(128, 128)
    w[3, 4] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight holds NaN or infinite values \(1 of"):
        fmt.pack(w, "model.layers.0.mlp.up_proj.weight")


def test_dequantize_refuses_a_scale_grid_of_the_wrong_shape():
    q, scale = fp8.quantize_blocks(torch.randn(256, 256))
    with pytest.raises(ValueError, match=r"weight_scale_inv is \[1, 2\], a \[256, 256\] weight in 128x128 blocks needs \[2, 2\]"):
        fp8.dequantize_blocks(q, scale[:1])
    qc, sc = fp8.quantize_channels(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"needs \[4, 1\]"):
        fp8.dequantize_channels(qc, sc.t())


@pytest.mark.parametrize("group", [None, 128, 100])
def test_activation_quantization_per_token_and_group(group):
    torch.manual_seed(4)
    x = torch.randn(3, 5, 300) * torch.rand(3, 5, 1) * 10  # tokens of different magnitude
    x[0, 0] = 0  # an all-zero token: scale floored, values stay 0
    q, scale = fp8.quantize_activations(x, group)
    g = 300 if group is None else group
    assert q.shape == x.shape and scale.shape == (3, 5, -(-300 // g))
    assert float(scale[0, 0].min()) == pytest.approx(fp8.ACT_MIN_SCALE)
    fake = fp8.fake_quantize_activations(x, group)
    full = scale.repeat_interleave(g, -1)[..., :300]
    assert bool(((fake - x).abs() <= error_bound(x, full) * (1 + 1e-6)).all())
    assert torch.equal(fake[0, 0], torch.zeros(300)) and not torch.equal(fake, x)
    for t in range(5):  # each (token, group) independently: its largest magnitude is on 448
        chunk = q[1, t, :g].float().abs()
        assert float(chunk.max()) == 448.0


def test_activation_groups_are_independent_of_the_other_tokens():
    """Dynamic per-token scales: a token quantizes the same whatever batch it is in."""
    torch.manual_seed(5)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    alone = fp8.fake_quantize_activations(x[1:2], 128)
    batched = fp8.fake_quantize_activations(x * torch.tensor([[100.0], [1.0], [0.01], [1.0]]).to(x.dtype), 128)
    assert torch.equal(alone[0], batched[1]) and alone.dtype == torch.bfloat16


def test_channel_scales_rounded_to_the_model_dtype_give_the_same_weight_in_every_client():
    """A bf16 weight_scale is rounded before it divides the weight: a client keeping it in bf16 (transformers'
    compressed-tensors path) and one widening it to float32 (vLLM) multiply by the same number."""
    torch.manual_seed(6)
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    packed = Fp8Format.CHANNEL.pack(w, scale_dtype=torch.bfloat16)
    scale = packed["weight_scale"]
    assert scale.dtype == torch.bfloat16 and torch.equal(Fp8Format.CHANNEL.scale(w, scale_dtype=torch.bfloat16), scale)
    back = Fp8Format.CHANNEL.unpack(packed)
    assert torch.equal(back, packed["weight"].float() * scale.float())
    full = scale.float().expand(64, 256)
    assert bool(((back - w.float()).abs() <= error_bound(w.float(), full) * (1 + 1e-6)).all())


# --- per tensor (the calibrated FP8 preset): weights and static activations ---------------------------------------
def test_the_fp8_preset_is_the_per_tensor_layout_with_static_activations():
    fmt = CALIBRATED_SCHEMES["FP8"]
    assert fmt is Fp8Format.TENSOR and fmt.static_activations and fmt.activation_group is None
    assert fmt.tensor_shapes(320, 192, torch.bfloat16) == {"weight": ((192, 320), torch.float8_e4m3fn),
                                                           "weight_scale": ((1,), torch.bfloat16)}
    assert fmt.input_tensors(torch.bfloat16) == {"input_scale": ((1,), torch.bfloat16)}
    assert not any(f.static_activations or f.input_tensors() for f in FP8_SCHEMES.values())


@pytest.mark.parametrize("amax,scale", [(448.0, 1.0), (1.0, 1 / 448), (0.0, 1.0), (3.5, 3.5 / 448)])
def test_tensor_scale_is_amax_over_448(amax, scale):
    assert fp8.tensor_scale(amax).tolist() == [pytest.approx(scale, rel=1e-7)]
    assert fp8.tensor_scale(amax, torch.bfloat16).dtype == torch.bfloat16
    assert float(fp8.tensor_scale(amax, torch.bfloat16)) == float(torch.tensor(scale).bfloat16())


def test_per_tensor_weight_largest_value_lands_on_448_and_a_shared_scale_is_used():
    torch.manual_seed(5)
    w = torch.randn(64, 96) * 3
    q, scale = fp8.quantize_tensor(w)
    assert float(q.float().abs().max()) == 448.0 and torch.equal(scale, fp8.tensor_scale(w.abs().max()))
    shared = fp8.tensor_scale(w.abs().max() * 4)  # a fused sibling's larger weights: this one's codes are smaller
    q2, s2 = fp8.quantize_tensor(w, scale=shared)
    assert torch.equal(s2, shared) and float(q2.float().abs().max()) == pytest.approx(112.0, abs=8)
    back = fp8.dequantize_tensor(q2, s2)
    assert bool(((back - w).abs() <= error_bound(w, s2.expand(w.shape)) * (1 + 1e-6)).all())
    with pytest.raises(ValueError, match=r"weight_scale is \[2\], a per-tensor FP8 weight needs \[1\]"):
        fp8.dequantize_tensor(q, torch.ones(2))


def test_an_all_zero_tensor_stays_zero_with_scale_one():
    q, scale = fp8.quantize_tensor(torch.zeros(8, 16))
    assert scale.tolist() == [1.0] and torch.equal(fp8.dequantize_tensor(q, scale), torch.zeros(8, 16))


def reference_static(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Element by element: x times the reciprocal of the scale in float32, saturated at 448, rounded to e4m3, times
    the scale (vLLM's static QuantFP8.forward_native, written with Python floats for the reciprocal)."""
    inv = torch.tensor(1.0 / torch.tensor(scale, dtype=torch.float32).item(), dtype=torch.float32)
    codes = (x.float() * inv).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes.float() * torch.tensor(scale, dtype=torch.float32)


def test_static_activations_use_the_one_calibrated_scale_and_saturate_beyond_it():
    torch.manual_seed(6)
    x = torch.randn(2, 9, 64) * torch.rand(2, 9, 1) * 10
    amax = float(x.abs().max())
    scale = fp8.tensor_scale(amax, torch.bfloat16)  # as an export stores it
    got = fp8.fake_quantize_static(x, scale)
    assert got.dtype == x.dtype and torch.equal(got, reference_static(x, float(scale)))
    assert bool(((got - x).abs() <= error_bound(x, scale.float().expand(x.shape)) * 1.01 + 1e-6 * amax).all())
    # one scale for every token: a token 1e5 times quieter than the loudest falls into e4m3's subnormals (measured
    # 38 % relative error), where a dynamic per-token scale keeps it at e4m3's 2.7 %
    quiet = x[0, 0] / 1e5
    static_err = (fp8.fake_quantize_static(quiet, scale) - quiet).norm() / quiet.norm()
    dynamic_err = (fp8.fake_quantize_activations(quiet) - quiet).norm() / quiet.norm()
    assert static_err > 0.2 and dynamic_err < 0.04, (float(static_err), float(dynamic_err))
    loud = x * 3  # inputs beyond the calibrated range saturate at 448 x scale
    assert float(fp8.fake_quantize_static(loud, scale).abs().max()) == pytest.approx(448 * float(scale))
    assert fp8.quantize_static(x, scale).dtype == torch.float8_e4m3fn
