"""SmoothQuant's math (qvlquant.quant.smoothquant), its fold into a real decoder layer (quant.apply.smooth_layer,
through AWQ's fold), and GPTQ on the INT8 W8A8 grid."""

import copy

import pytest
import torch

from qvlquant.engine.loop import capture_inputs
from qvlquant.families import QWEN2_VL
from qvlquant.quant import int8
from qvlquant.quant.formats import Int8Format, QuantizedWeight
from qvlquant.quant.gptq import accumulate_hessian, gptq_quantize, hessian
from qvlquant.quant.layer import LayerContext, run_layer
from qvlquant.quant.rtn import default_g_idx
from qvlquant.quant.smoothquant import (
    MIN_SCALE,
    input_absmax,
    search_strength,
    smoothing_scales,
    w8a8_error,
    weight_absmax,
)
from qvlquant.quant.spec import QuantConfig, QuantSpec

W8 = QuantSpec(8, -1, True)


def outlier_tokens(t=512, k=256, seed=0) -> torch.Tensor:
    """Tokens [T, K] with a few input channels 50x the rest, as LLM activations have (SmoothQuant's case)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :3] *= 50
    return x


def test_scales_follow_the_formula_and_leave_dead_channels_alone():
    x_max = torch.tensor([4.0, 9.0, 0.0, 1.0])
    w_max = torch.tensor([1.0, 0.25, 2.0, 0.0])
    s = smoothing_scales(x_max, w_max, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 6.0, 1.0, 1.0]))  # sqrt(4 / 1), sqrt(9 / 0.25); zeros: 1
    torch.testing.assert_close(smoothing_scales(x_max, w_max, 1.0)[:2], x_max[:2])  # all onto the weights
    torch.testing.assert_close(smoothing_scales(x_max, w_max, 0.0)[:2], 1 / w_max[:2])
    assert smoothing_scales(torch.tensor([1e-30]), torch.tensor([1.0]), 1.0).item() == pytest.approx(MIN_SCALE)


def test_maxima_are_per_input_channel_over_tokens_and_every_linear():
    x = torch.tensor([[1.0, -7.0], [-3.0, 2.0]])
    assert input_absmax(x).tolist() == [3.0, 7.0]
    w1, w2 = torch.tensor([[1.0, -2.0]]), torch.tensor([[-5.0, 0.5], [0.0, 1.0]])
    assert weight_absmax([w1, w2]).tolist() == [5.0, 2.0]


def test_smoothing_moves_outliers_and_cuts_the_w8a8_error():
    """Unsmoothed, the per-token int8 step is set by the outlier channels; alpha 0.5-0.8 cuts the int8 output
    error at least 3x, and the search finds a strength at least as good as any fixed one and as none."""
    x = outlier_tokens()
    weights = [torch.randn(64, 256, generator=torch.Generator().manual_seed(i)) * 0.05 for i in (1, 2)]
    reference = torch.cat([x @ w.T for w in weights], dim=-1)
    x_max, w_max = input_absmax(x), weight_absmax(weights)
    off = w8a8_error(x, weights, torch.ones(256), reference)
    for alpha in (0.5, 0.8):
        assert w8a8_error(x, weights, smoothing_scales(x_max, w_max, alpha), reference) < off / 3, alpha
    strength, s, info = search_strength(x, weights)
    assert strength not in ("off", 0.0) and info["smoothing_loss"] <= info["smoothing_loss_off"] == pytest.approx(off)
    for alpha in (0.5, 0.8):
        assert info["smoothing_loss"] <= w8a8_error(x, weights, smoothing_scales(x_max, w_max, alpha), reference)
    torch.testing.assert_close(s, smoothing_scales(x_max, w_max, strength))


def test_search_keeps_no_smoothing_where_no_strength_does_better():
    """Inputs of +-1 and integer weights whose rows reach 127 are on the int8 grids already (no error unsmoothed);
    every alpha below 1 makes uneven scales and some error, alpha 1 ties: "off" is kept."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g).sign()
    w = torch.randint(-127, 128, (32, 64), generator=g).float()
    w[:, 5] = 127  # every row's scale is 1; the column maxima (w_max) are uneven
    w[:, 9] = 3
    strength, s, info = search_strength(x, [w])
    assert strength == "off" and torch.equal(s, torch.ones(64))
    assert info["smoothing_loss"] == info["smoothing_loss_off"] == 0.0


def _ctx(prefix="model.language_model.layers.1", method="rtn", storage=torch.float32):
    return LayerContext(family=QWEN2_VL, qcfg=QuantConfig(method, QuantSpec(8, -1, True)), prefix=prefix,
                        storage_dtype=storage, finish=lambda *a: None)


@pytest.mark.parametrize("strength,storage", [(0.8, torch.float32), ("auto", torch.float32), (0.8, torch.bfloat16)])
def test_smoothing_a_decoder_layer_leaves_its_full_precision_output_unchanged(demo, demo_batches, strength, storage):
    """smooth_layer folds each group's scales into its norm / previous linear and multiplies the weight columns:
    the float layer's output is unchanged (a fold applied to one side only moves it by far more than this
    tolerance; with the norms stored in bf16, so does multiplying the columns by s rather than by what the stored
    norm divides by), the norms did change, and the smoothed inputs of q_proj have a smaller max/median spread."""
    from qvlquant.quant.apply import capture_linear_inputs, smooth_layer

    model, _ = demo
    original = model.model.language_model.layers[1]
    layer = copy.deepcopy(original)
    inputs = capture_inputs(model, QWEN2_VL, demo_batches[:2])
    before = [run_layer(layer, x) for x in inputs]
    x_before = torch.cat([f[x.token_mask] for f, x in zip(capture_linear_inputs(layer, inputs, ["self_attn.q_proj"])[
        "self_attn.q_proj"], inputs)])
    info = smooth_layer(layer, inputs, _ctx(storage=storage), strength)
    after = [run_layer(layer, x) for x in inputs]
    for a, b, x in zip(after, before, inputs):
        torch.testing.assert_close(a[x.token_mask], b[x.token_mask], rtol=1e-4, atol=1e-4)
    strengths = {info[n]["smoothed_by"]: info[n]["strength"] for n in info}
    assert set(strengths) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert "self_attn.o_proj" not in info  # v_proj -> o_proj under GQA: v's outputs feed several heads, no fold
    smoothed = [prev for prev, alpha in strengths.items() if alpha != "off"]
    assert len(smoothed) >= 2, strengths
    for prev, alpha in strengths.items():  # each smoothed norm / linear changed, any left "off" did not
        changed = not torch.equal(layer.get_submodule(prev).weight, original.get_submodule(prev).weight)
        assert changed == (alpha != "off"), (prev, alpha)
    if strengths["input_layernorm"] != "off":
        x_after = torch.cat([f[x.token_mask] for f, x in zip(capture_linear_inputs(
            layer, inputs, ["self_attn.q_proj"])["self_attn.q_proj"], inputs)])
        spread = lambda t: float(input_absmax(t).max() / input_absmax(t).median())  # noqa: E731
        assert spread(x_after) < spread(x_before)


def test_a_fixed_strength_keeps_each_inputs_maxima_not_its_tokens(demo, demo_batches, monkeypatch):
    """input_absmaxima (a running maximum, batch by batch, over the real tokens) equals the largest |x| of every
    token capture_linear_inputs keeps, bit for bit; smooth_layer at a fixed strength captures no tokens (memory:
    one vector per linear, whatever the calibration set's size), only the strength search does."""
    from qvlquant.quant import apply

    model, _ = demo
    layer = model.model.language_model.layers[1]
    inputs = capture_inputs(model, QWEN2_VL, demo_batches)
    assert any(not bool(x.token_mask.all()) for x in inputs)  # padded batches: the mask matters
    names = ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"]
    feats = apply.capture_linear_inputs(layer, inputs, names)
    maxima = apply.input_absmaxima(layer, inputs, names)
    for n in names:
        want = input_absmax(torch.cat([f[x.token_mask] for f, x in zip(feats[n], inputs)]))
        assert torch.equal(maxima[n], want), n

    def kept(*args):
        raise AssertionError("smooth_layer at a fixed strength kept the layer's input tokens")

    monkeypatch.setattr(apply, "capture_linear_inputs", kept)
    info = apply.smooth_layer(copy.deepcopy(layer), inputs, _ctx(), 0.8)
    assert {v["strength"] for v in info.values()} == {0.8}
    with pytest.raises(AssertionError, match="kept the layer's input tokens"):
        apply.smooth_layer(copy.deepcopy(layer), inputs, _ctx(), "auto")


def test_gptq_on_the_int8_grid_stores_the_w8a8_layout_and_beats_round_to_nearest():
    """GPTQ with the fixed int8 grid (int8.channel_qparams): scales are the data-free W8A8's (absmax / 127 in the
    storage dtype), codes pack to int8 through Int8Format, and the output error on correlated inputs is below
    round-to-nearest's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.05 * torch.randn(1024, 128, generator=g)
    w = torch.randn(48, 128, generator=g)
    H = hessian(*accumulate_hessian(torch.zeros(128, 128, dtype=torch.float64), 0, x, None))
    grid = lambda t: int8.channel_qparams(t, "w", torch.bfloat16)  # noqa: E731
    qw, _ = gptq_quantize(w, H, QuantConfig("gptq", W8), qparams=grid)
    packed = Int8Format.CHANNEL.pack_quantized(qw, torch.bfloat16)
    assert packed["weight"].dtype == torch.int8 and packed["weight_scale"].dtype == torch.bfloat16
    assert torch.equal(packed["weight_scale"], int8.channel_scales(w, "w", torch.bfloat16))
    torch.testing.assert_close(Int8Format.CHANNEL.unpack(packed), qw.dequantize(), rtol=0, atol=0)
    back = Int8Format.CHANNEL.unpack_quantized(packed, W8)
    assert torch.equal(back.q, qw.q) and torch.equal(back.dequantize(), qw.dequantize())
    rtn = Int8Format.CHANNEL.unpack(Int8Format.CHANNEL.pack(w, scale_dtype=torch.bfloat16))
    err = lambda wq: float((x @ (w - wq).T).pow(2).mean())  # noqa: E731
    assert err(qw.dequantize()) < 0.5 * err(rtn)


def test_int8_packing_refuses_codes_off_the_w8a8_grid():
    w = torch.randn(4, 8)
    q = torch.zeros(4, 8, dtype=torch.int32)
    scale = torch.ones(4, 2)  # two groups a row: not per channel
    off = QuantizedWeight(q, scale, torch.full_like(scale, 128), default_g_idx(8, QuantSpec(8, 4, True)),
                          QuantSpec(8, 4, True))
    with pytest.raises(ValueError, match="INT8 W8A8 stores symmetric 8-bit codes per channel"):
        Int8Format.CHANNEL.pack_quantized(off)
    assert w.shape == (4, 8)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_stored_norm_scales_keep_the_folded_norm_exact_after_bf16_rounding(offset):
    """A zero-centred norm (offset 1: it scales by 1 + w) folded by s and stored in bf16 keeps only bf16's absolute
    step on w near -1, so (1 + w_stored) * s misses 1 + w by percents; the stored scales make up for it to float32
    rounding."""
    from qvlquant.quant.smoothquant import stored_norm_scales

    g = torch.Generator().manual_seed(4)
    w = (torch.rand(512, generator=g) * 0.4 + 0.8 - offset).bfloat16().float()  # the effective scale 0.8 to 1.2
    s = torch.rand(512, generator=g) * 8 + 0.5
    stored = ((offset + w) / s - offset).bfloat16().float()
    naive = ((offset + stored) * s - (offset + w)).abs() / (offset + w)
    fixed = ((offset + stored) * stored_norm_scales(w, s, torch.bfloat16, offset) - (offset + w)).abs() / (offset + w)
    assert float(fixed.max()) < 1e-6 and float(naive.max()) > (1e-2 if offset else 1e-3)
