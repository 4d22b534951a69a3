"""eval/compare.py: the fidelity measures of a quantized model against its base (answer-token KL, per-linear
relative output error), on hand-computed values and small stub modules, and once through the demo model."""

import math

import pytest
import torch

from qvlquant.calib.easyvqa import load_split
from qvlquant.eval.compare import (
    answer_logits,
    decoder_layer_errors,
    layer_errors,
    linear_inputs,
    mean_kl,
    relative_output_error,
    spread,
    verdict,
)


def test_mean_kl_hand_computed():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    assert mean_kl(p, p) == pytest.approx(0.0, abs=1e-7)
    assert mean_kl(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-6)  # 0.5108
    assert mean_kl(q, p) == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), rel=1e-6)  # 0.3681
    assert mean_kl(p + 3.0, q - 1.0) == pytest.approx(mean_kl(p, q), rel=1e-6)  # logits, not probabilities
    assert mean_kl(torch.cat([p, p]), torch.cat([p, q])) == pytest.approx(mean_kl(p, q) / 2, rel=1e-6)  # row mean


@pytest.mark.parametrize("factor,expected", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.25), (2.0, 1.0), (-1.0, 4.0)])
def test_relative_output_error_hand_computed(factor, expected):
    torch.manual_seed(0)
    x, w = torch.randn(16, 8), torch.randn(4, 8)
    assert relative_output_error(x, w, factor * w) == pytest.approx(expected, abs=1e-6)  # ||(1-f) XW^T||^2/||XW^T||^2


class Tiny(torch.nn.Module):
    """Embedding -> layers.{0,1}.proj, called like a HF model (input_ids, attention_mask, use_cache)."""

    def __init__(self, fail_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 4)
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4)}) for _ in range(2)])
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, input_ids, attention_mask, use_cache=True):
        assert use_cache is False
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer["proj"](h)
        return h


BATCHES = [{"input_ids": torch.tensor([[0, 1, 2], [3, 4, 5]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])},
           {"input_ids": torch.tensor([[6, 7]]), "attention_mask": torch.tensor([[1, 0]])}]


def test_linear_inputs_are_the_real_tokens_subsampled_and_hooks_go():
    model = Tiny()
    xs = linear_inputs(model, ["layers.0.proj"], BATCHES)
    emb = model.emb.weight.detach()
    assert torch.equal(xs["layers.0.proj"], emb[[1, 2, 3, 4, 5, 6]])  # padding positions left out
    xs = linear_inputs(model, ["layers.0.proj"], BATCHES, max_tokens=3)
    assert torch.equal(xs["layers.0.proj"], emb[[1, 3, 6]])  # evenly spaced: rows 0, 2, 5 of 6
    assert not model.layers[0]["proj"]._forward_hooks
    failing = Tiny(fail_at=2)
    with pytest.raises(RuntimeError, match="boom"):
        linear_inputs(failing, ["layers.0.proj", "layers.1.proj"], BATCHES)
    assert not failing.layers[0]["proj"]._forward_hooks and not failing.layers[1]["proj"]._forward_hooks


class Weight:
    def __init__(self, w):
        self.w = w

    def effective_weight(self):
        return self.w


def test_layer_errors_average_per_linear_type():
    model = Tiny()
    w0, w1 = (model.layers[i]["proj"].weight.detach() for i in range(2))
    errors = layer_errors(model, {"layers.0.proj": Weight(w0), "layers.1.proj": Weight(torch.zeros_like(w1))}, BATCHES)
    assert errors == {"proj": pytest.approx(0.5)}  # (0 + 1) / 2 over the two decoder layers
    errors = layer_errors(model, {"layers.0.proj": Weight(0.5 * w0)}, BATCHES)
    assert errors == {"proj": pytest.approx(0.25)}


def test_answer_logits_batched_equal_unbatched(demo):
    """Left padding keeps the last position real: batching prompts of different lengths changes nothing."""
    model, processor = demo
    items = load_split("test")[:3]  # three questions of different token lengths
    one = answer_logits(model, processor, items, batch_size=1)
    three = answer_logits(model, processor, items, batch_size=3)
    assert one.shape == (3, model.config.text_config.vocab_size) and one.dtype == torch.float32
    torch.testing.assert_close(three, one, atol=1e-4, rtol=1e-4)
    assert mean_kl(one, three) < 1e-6


def test_spread_and_verdict_hand_computed():
    assert spread([1.0, 2.0, 3.0]) == (2.0, 1.0) and spread([5.0]) == (5.0, 0.0)
    assert verdict([1.0, 1.2, 1.1], [1.5, 1.6, 1.4]) == "better"  # 0.4 apart, spreads 0.1
    assert verdict([1.5, 1.6, 1.4], [1.0, 1.2, 1.1]) == "worse"
    assert verdict([1.0, 1.4, 1.2], [1.3, 1.5, 1.4]) == "tie"  # 0.2 apart, a spread of 0.2: within the noise
    assert verdict([1.0], [1.1], tolerance=0.2) == "tie"
    with pytest.raises(ValueError, match="no measurements"):
        spread([])


def test_decoder_layer_errors_see_the_function_not_the_parametrisation(demo, demo_batches):
    """Zero for the same model and for a function-preserving rescale (AWQ-style: RMSNorm / s, columns * s); the
    relative squared error of the output for a damaged layer, and only for that layer."""
    import copy

    model, _ = demo
    layers = "model.language_model.layers"
    assert decoder_layer_errors(model, copy.deepcopy(model), layers, demo_batches) == [0.0] * 4
    rescaled = copy.deepcopy(model)
    s = torch.linspace(0.5, 2.0, model.config.text_config.hidden_size)
    with torch.no_grad():
        layer = rescaled.model.language_model.layers[1]
        layer.input_layernorm.weight.div_(s)
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.weight.mul_(s)
    assert max(decoder_layer_errors(model, rescaled, layers, demo_batches)) < 1e-10
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        damaged.model.language_model.layers[2].mlp.down_proj.weight.mul_(1.1)  # the MLP's output: 10 % larger
    errors = decoder_layer_errors(model, damaged, layers, demo_batches)
    assert errors[0] == errors[1] == errors[3] == 0.0 and 1e-3 < errors[2] < 1e-2 * 1.1 ** 2
