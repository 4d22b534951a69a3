import copy

import torch

from qvlquant.engine.loop import capture_inputs
from qvlquant.families import QWEN2_VL
from qvlquant.quant.apply import _fold
from qvlquant.quant.awq import (
    activation_scale,
    apply_clip,
    candidate_scales,
    scaled_fake_quant,
    search_clip,
    search_scale,
)
from qvlquant.quant.layer import run_layer
from qvlquant.quant.rtn import fake_quantize
from qvlquant.quant.spec import QuantSpec

SPEC = QuantSpec(4, 64, False)


def outlier_inputs(t=1024, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :4] *= 30  # a few salient channels, as in real LLM activations
    return x


def test_scale_search_beats_plain_rtn_on_salient_channels():
    x = outlier_inputs()
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    s, info = search_scale([w], activation_scale(x), SPEC, lambda ws: x @ ws[0].T)
    err_awq = (x @ (w - scaled_fake_quant(w, s, SPEC)).T).pow(2).mean()
    err_rtn = (x @ (w - fake_quantize(w, SPEC)).T).pow(2).mean()
    assert info["ratio"] > 0 and info["loss"] <= info["loss_unscaled"]
    assert err_awq < 0.8 * err_rtn


def test_candidate_scales_normalised():
    s = candidate_scales(torch.rand(64) + 0.1, torch.rand(64) + 0.1, 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0), atol=1e-5)
    assert torch.equal(candidate_scales(torch.rand(8), torch.ones(8), 0.0), torch.ones(8))


def test_clip_search_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g)
    w = torch.distributions.StudentT(2.0).sample((32, 128))  # heavy tails: rare extremes stretch the ranges
    max_val = search_clip(w, x, SPEC)
    clipped = apply_clip(w, max_val)
    err = lambda v: (x @ (w - fake_quantize(v, SPEC)).T).pow(2).mean(0).sum()
    assert err(clipped) < err(w)
    original = w.abs().view(32, 2, 64).amax(-1)
    assert (max_val <= original).all() and (max_val < original).float().mean() > 0.2


def test_folding_scales_leaves_the_full_precision_layer_unchanged(demo, demo_batches):
    model, _ = demo
    layer = copy.deepcopy(model.model.language_model.layers[1])
    inputs = capture_inputs(model, QWEN2_VL, demo_batches[:2])
    before = [run_layer(layer, x) for x in inputs]
    g = torch.Generator().manual_seed(0)
    for group in QWEN2_VL.scaling_groups:
        prev = layer.get_submodule(group.prev)
        linears = [layer.get_submodule(n) for n in group.linears]
        if isinstance(prev, torch.nn.Linear) and prev.out_features != linears[0].in_features:
            continue
        s = torch.rand(linears[0].in_features, generator=g) * 4 + 0.25
        _fold(prev, linears, s, torch.float32)
    after = [run_layer(layer, x) for x in inputs]
    for a, b, x in zip(after, before, inputs):
        torch.testing.assert_close(a[x.token_mask], b[x.token_mask], rtol=1e-4, atol=1e-4)
    assert not torch.equal(layer.input_layernorm.weight, model.model.language_model.layers[1].input_layernorm.weight)


def test_group_gram_gives_each_groups_mean_squared_output_error():
    """d^T C[g] d (the clipping search's error) equals mean_t (x_tg . d_g)^2 computed token by token."""
    from qvlquant.quant.awq import group_gram

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 128, generator=g)
    d = torch.randn(5, 128, generator=g)  # a weight error per output row
    gram = group_gram(x, SPEC)  # [2, 64, 64]
    via_gram = torch.einsum("ngi,gij,ngj->ng", d.view(5, 2, 64), gram, d.view(5, 2, 64))
    direct = (x.view(300, 1, 2, 64) * d.view(1, 5, 2, 64)).sum(-1).pow(2).mean(0)  # [5, 2]
    torch.testing.assert_close(via_gram, direct, rtol=1e-4, atol=1e-6)
