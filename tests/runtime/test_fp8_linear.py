"""FP8 exports run with their serving kernels' numerics: e4m3 weights and dynamic e4m3 activations."""

import pytest
import torch
import torch.nn.functional as F

import qvlquant
from qvlquant.quant import fp8
from qvlquant.quant.formats import FP8_SCHEMES, Fp8Format
from qvlquant.runtime.fp8 import Fp8Linear


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    from qvlquant.api import quantize

    root = tmp_path_factory.mktemp("fp8run")
    models = {}
    for scheme in FP8_SCHEMES:
        quantize(output=str(root / scheme), scheme=scheme)
        models[scheme] = qvlquant.load(root / scheme)[0]
    return models


def kl_and_gap(reference: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference || logits) over the real tokens, mean |logit gap| / mean |reference logit|)."""
    p, q = torch.log_softmax(reference[mask], -1), torch.log_softmax(logits[mask], -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    gap = (reference - logits)[mask].abs().mean() / reference[mask].abs().mean()
    return float(kl), float(gap)


@pytest.mark.parametrize("scheme", list(FP8_SCHEMES))
def test_loaded_fp8_model_is_close_to_bf16_and_not_equal(demo, demo_batches, fp8_models, scheme):
    base, _ = demo
    model = fp8_models[scheme]
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 28
    assert not any(isinstance(m, Fp8Linear) for n, m in model.named_modules() if n.startswith("model.visual"))
    for batch in demo_batches:
        with torch.no_grad():
            ref, got = base(**batch, use_cache=False).logits, model(**batch, use_cache=False).logits
        kl, gap = kl_and_gap(ref, got, batch["attention_mask"].bool())
        # measured on the demo: mean KL 0.9e-3 - 3.4e-3, relative logit gap 1.6 % - 1.7 %
        assert kl < 1e-2 and gap < 0.03, (kl, gap)
        assert gap > 1e-3  # FP8 really rounded something


@pytest.mark.parametrize("scheme", list(FP8_SCHEMES))
def test_activations_are_quantized_as_the_kernels_do(demo_batches, fp8_models, scheme, monkeypatch):
    """Without the activation rounding (W8A16) the logits move: the runtime is W8A8, not weight-only."""
    model = fp8_models[scheme]
    batch = next(b for b in demo_batches if "pixel_values" in b)
    with torch.no_grad():
        w8a8 = model(**batch, use_cache=False).logits
        monkeypatch.setattr("qvlquant.runtime.fp8.fake_quantize_activations", lambda x, group: x)
        w8a16 = model(**batch, use_cache=False).logits
    assert (w8a8 - w8a16).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", list(FP8_SCHEMES.values()))  # static activations: the test below
def test_fp8_linear_matches_the_explicit_w8a8_product(fmt):
    """The module computes quantize(x) @ dequantize(W)^T + b: written out here from the math functions, on
    activations whose tokens and groups differ in magnitude."""
    torch.manual_seed(0)
    w, b = torch.randn(192, 320), torch.randn(192)
    x = torch.randn(2, 7, 320) * torch.rand(2, 7, 1) * 5
    x[..., 128:256] *= 40  # one group of inputs far larger: block activations scale each group on its own
    linear = Fp8Linear.from_weight(w, fmt, b)
    if fmt is Fp8Format.BLOCK:
        wq, ws = fp8.quantize_blocks(w)
        wd = fp8.dequantize_blocks(wq, ws)
        xq = fp8.fake_quantize_activations(x, 128)
    else:
        wq, ws = fp8.quantize_channels(w)
        wd = fp8.dequantize_channels(wq, ws)
        xq = fp8.fake_quantize_activations(x)
    torch.testing.assert_close(linear(x), F.linear(xq, wd, b), rtol=0, atol=0)
    exact = F.linear(x, w, b)
    rel = float((linear(x) - exact).norm() / exact.norm())
    assert 1e-3 < rel < 0.06, rel  # measured 0.03 - 0.04: two e4m3 roundings


def test_static_fp8_linear_matches_the_explicit_product_with_its_calibrated_scale():
    """The FP8 preset's module: quantize(x) with the one stored input_scale, times the per-tensor weight, plus b."""
    torch.manual_seed(1)
    w, b = torch.randn(96, 160), torch.randn(96)
    x = torch.randn(3, 5, 160) * torch.rand(3, 5, 1) * 5
    amax = float(x.abs().max())
    linear = Fp8Linear.from_weight(w, Fp8Format.TENSOR, b, input_amax=amax)
    assert linear.input_scale.tolist() == fp8.tensor_scale(amax).tolist() and linear.weight_scale.shape == (1,)
    wq, ws = fp8.quantize_tensor(w)
    expected = F.linear(fp8.fake_quantize_static(x, fp8.tensor_scale(amax)), fp8.dequantize_tensor(wq, ws), b)
    torch.testing.assert_close(linear(x), expected, rtol=0, atol=0)
    exact = F.linear(x, w, b)
    rel = float((linear(x) - exact).norm() / exact.norm())
    assert 1e-3 < rel < 0.08, rel
    with pytest.raises(ValueError, match="give the calibrated input_amax"):
        Fp8Linear.from_weight(w, Fp8Format.TENSOR, b)


def test_fused_per_tensor_scales_are_shared_as_vllm_loads_them():
    """llm-compressor's FP8 preset stores q/k/v's and gate/up's own weight scales; vLLM runs each fused layer under
    the largest (``requantize_with_max_scale``: every shard dequantized with its own scale, rounded again under the
    largest) with the largest input scale, and so does ``share_fused_scales`` (``qvlquant.load``). A linear fused
    with none, and a group already shared, are left bit for bit."""
    from qvlquant.families import family_for
    from qvlquant.runtime.fp8 import share_fused_scales

    torch.manual_seed(0)
    spec = {"self_attn.q_proj": (32, 64, 3.0, 4.0), "self_attn.k_proj": (16, 64, 1.0, 5.0),
            "self_attn.v_proj": (16, 64, 0.5, 4.5), "self_attn.o_proj": (64, 32, 1.0, 2.0),
            "mlp.gate_proj": (48, 64, 1.0, 7.0), "mlp.up_proj": (48, 64, 2.0, 7.0), "mlp.down_proj": (64, 48, 1.0, 9.0)}
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.language_model = torch.nn.Module()
    layer = torch.nn.Module()
    layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
    model.model.language_model.layers = torch.nn.ModuleList([layer])
    for path, (n, k, size, amax) in spec.items():
        parent, leaf = path.split(".")
        setattr(getattr(layer, parent), leaf, Fp8Linear.from_weight(torch.randn(n, k) * size, Fp8Format.TENSOR, None,
                                                                      input_amax=amax))
    before = {p: {b: t.clone() for b, t in layer.get_submodule(p).named_buffers()} for p in spec}
    family = family_for("qwen2_vl")
    changed = share_fused_scales(model, family)
    prefix = "model.language_model.layers.0."
    assert changed == [prefix + p for p in ("mlp.gate_proj", "self_attn.k_proj", "self_attn.q_proj",
                                            "self_attn.v_proj")]
    for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
        w_max = max(before[p]["weight_scale"] for p in group)
        in_max = max(before[p]["input_scale"] for p in group)
        for p in group:
            m = layer.get_submodule(p)
            assert torch.equal(m.weight_scale, w_max) and torch.equal(m.input_scale, in_max)
            old = fp8.dequantize_tensor(before[p]["weight"], before[p]["weight_scale"])
            requantized = (old / w_max.float()).to(torch.float8_e4m3fn)
            assert torch.equal(m.weight.view(torch.uint8), requantized.view(torch.uint8))
            x = torch.randn(3, m.in_features) * 2
            expected = F.linear(fp8.fake_quantize_static(x, in_max), fp8.dequantize_tensor(m.weight, w_max))
            torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    for p in ("self_attn.o_proj", "mlp.down_proj"):  # fused with none
        assert all(torch.equal(t, before[p][b]) for b, t in layer.get_submodule(p).named_buffers())
    assert share_fused_scales(model, family) == []  # shared now: nothing left to change
