"""The up-front estimate (qvlquant.engine.estimate): time per layer as the slowest rank does it."""

import re

import pytest
import torch

from qvlquant.assets.paths import MODEL_DIR
from qvlquant.config import JobConfig
from qvlquant.engine import estimate as estimate_module
from qvlquant.engine.estimate import Speed, estimate, format_estimate, layer_calls, layer_flops
from qvlquant.engine.skeleton import build_skeleton, load_config
from qvlquant.families import family_for


def demo_layer():
    family = family_for("qwen2_vl")
    skeleton = build_skeleton(load_config(MODEL_DIR, family), family, torch.float32)
    return skeleton.get_submodule(family.decoder_layers)[0], family


def test_gptq_work_splits_tokens_across_ranks_but_not_a_groups_solve():
    layer, family = demo_layer()
    tokens = 6400
    one, two, eight = (layer_flops(layer, family, "gptq", tokens, None, p) for p in (1, 2, 8))
    shapes = {n: (layer.get_submodule(n).out_features, layer.get_submodule(n).in_features) for n in family.linears}
    solve = {n: 2 * o * k * k + 2 * k**3 for n, (o, k) in shapes.items()}
    per_token = 5 * 2 * sum(o * k for o, k in shapes.values()) + sum(2 * k * k for o, k in shapes.values())
    assert one == per_token * tokens + sum(solve.values())  # one process: everything
    # eight ranks: an eighth of the tokens each, and per true-sequential step its largest solve (q, o, gate, down)
    assert eight == per_token * tokens // 8 + sum(max(solve[n] for n in g) for g in family.linear_groups)
    assert one > two > eight
    # without true-sequential the seven solves spread over the ranks at once
    assert layer_flops(layer, family, "gptq", tokens, None, 8, true_sequential=False) < eight


def test_rtn_and_awq_divide_with_the_ranks():
    layer, family = demo_layer()
    for method in ("rtn", "awq"):
        one, two = (layer_flops(layer, family, method, 1024, None, p) for p in (1, 2))
        assert two < one


def demo_estimate(method="gptq", load=None, monkeypatch=None):
    """The estimate the demo's quantize prints (64 samples, 2416 tokens), under a simulated load of ``load`` on
    two CPUs when given."""
    family = family_for("qwen2_vl")
    skeleton = build_skeleton(load_config(MODEL_DIR, family), family, torch.float32)
    if load is not None:
        monkeypatch.setattr(estimate_module.os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(estimate_module, "cpu_quota", lambda: 2)
    config = JobConfig.from_flat(output="-", method=method)
    return estimate(skeleton, family, config, torch.device("cpu"), 2416, torch.bfloat16)


ZERO = re.compile(r"(?<![\d.])0 (s|min)\b")


def test_the_demo_estimate_never_says_zero_and_says_it_is_rough():
    for method in ("rtn", "gptq", "awq"):
        text = format_estimate(demo_estimate(method))
        assert not ZERO.search(text), text
        assert "rough" in text
    # a per-layer time too small to print in whole seconds keeps a significant digit
    tiny = dict(demo_estimate("rtn"), seconds_per_layer=0.004, layers=4)
    assert not ZERO.search(format_estimate(tiny)) and "under 0.1 s" in format_estimate(tiny)


def test_the_time_grows_with_the_machines_load(monkeypatch):
    speed = Speed(flops=50e9, call_seconds=5e-6, weight_seconds=1e-9)
    monkeypatch.setattr(estimate_module, "measured_speed", lambda device, dtype: speed)
    idle, busy = (demo_estimate("gptq", load, monkeypatch) for load in (0.5, 8.0))
    assert busy["seconds_per_layer"] == pytest.approx(4 * idle["seconds_per_layer"], rel=0.05)  # 8 on 2 CPUs
    assert busy["load"] == 8.0 and busy["cpus"] == 2
    assert "load 8.0 on 2 CPUs" in format_estimate(busy) and "load" not in format_estimate(idle)


def test_the_demo_estimate_counts_the_per_call_overhead_a_flop_count_misses(monkeypatch):
    """The demo's layers are small: a GPTQ layer's 5 replays of 64 batches and its 2048 column steps cost more
    than its floating-point work (measured on this 2-core machine: 86 GFLOP/s, 6 us per small call, 1.1-1.9 s
    per layer at a load of 3.5; the flop count alone said 0.2 s)."""
    monkeypatch.setattr(estimate_module, "measured_speed", lambda device, dtype: Speed(86e9, 6e-6, 1e-9))
    e = demo_estimate("gptq", 0.0, monkeypatch)
    flops_only = layer_flops(*demo_layer(), "gptq", 2416, None) / 86e9
    assert 0.4 < e["seconds_per_layer"] < 1.2 and e["seconds_per_layer"] > 2 * flops_only


def test_gptq_column_steps_of_a_moe_layer_spread_over_the_ranks():
    """Each linear is solved on one rank, so the slowest rank steps through the columns of its own linears only: a
    MoE layer's expert linears (8 experts here, hundreds at real sizes) divide over the ranks; one rank steps
    through all of them."""
    from tests.tiny_models import qwen3_5_moe_config

    config = qwen3_5_moe_config(layers=1, experts=8)
    family = family_for("qwen3_5_moe").bind(config)
    layer = build_skeleton(config, family, torch.float32).get_submodule(family.decoder_layers)[0]
    kind = family.at(0)
    qcfg = JobConfig.from_flat(output="-", method="gptq").quant
    passes = layer_calls(layer, kind, qcfg, 1, 1) - estimate_module.CALLS_PER_COLUMN * sum(
        layer.get_submodule(n).in_features for n in kind.linears)
    one, four = (layer_calls(layer, kind, qcfg, 1, p) - passes for p in (1, 4))
    experts = sum(layer.get_submodule(n).in_features for n in kind.linears if kind.expert_of(n) is not None)
    assert one == estimate_module.CALLS_PER_COLUMN * sum(layer.get_submodule(n).in_features for n in kind.linears)
    assert one - four >= estimate_module.CALLS_PER_COLUMN * experts * 3 // 4 * 0.9  # the experts' share splits
    assert four * 4 >= one  # no rank does less than its share


def moe_layer(experts=8, top_k=2, hidden=None, intermediate=None):
    """One Qwen3.5-MoE decoder layer on the meta device (no memory) and its layer type's declaration; ``hidden`` /
    ``intermediate``: the text and expert widths (the tiny model's when None)."""
    from tests.tiny_models import qwen3_5_moe_config

    config = qwen3_5_moe_config(layers=1, experts=experts, top_k=top_k)
    if hidden:
        config.text_config.hidden_size = hidden
    if intermediate:
        config.text_config.moe_intermediate_size = config.text_config.shared_expert_intermediate_size = intermediate
    family = family_for("qwen3_5_moe").bind(config)
    skeleton = build_skeleton(config, family, torch.float32)
    return skeleton, family, skeleton.get_submodule(family.decoder_layers)[0], family.at(0)


def test_gptq_expert_work_counts_every_pass_hessian_and_block_update_of_the_experts():
    """The routed experts' work, counted by hand for 8 experts whose Hessian sums fit one chunk: per batch that
    reaches an expert, the final replay runs all 8, the gate/up step's replay stops at expert 7's gate (7 run), the
    down step's at expert 7's down (7 run, and expert 7's gate and up), each group's float64 sum gets one pass; and
    each expert linear's column loop its in-block updates, 2 N K (b + 1)."""
    _, _, layer, kind = moe_layer()
    qcfg = JobConfig.from_flat(output="-", method="gptq").quant
    tokens, batches = 640, 16
    gate, up, down = (layer.get_submodule(f"mlp.experts.0.{n}").weight for n in ("gate_proj", "up_proj", "down_proj"))
    expert = gate.numel() + up.numel() + down.numel()
    per_batch = 8 * expert + 7 * expert + 7 * expert + gate.numel() + up.numel()
    hessians = 8 * (gate.shape[1] ** 2 + down.shape[1] ** 2)
    reached = 1 - (1 - 2 / 8) ** (tokens / batches)
    blocks = 8 * expert * 2 * (qcfg.block_size + 1)
    elements, calls = estimate_module.expert_work(layer, kind, qcfg, tokens, batches)
    assert elements == pytest.approx(batches * reached * (per_batch + hessians) + blocks)
    assert calls == pytest.approx(batches * reached * per_batch / expert * estimate_module.CALLS_PER_EXPERT)
    # 4 ranks: a quarter of the batches each, and each expert linear's solve on one of them
    four, _ = estimate_module.expert_work(layer, kind, qcfg, tokens, batches, 4)
    assert four == pytest.approx(4 * reached * (per_batch + hessians) + blocks / 4)
    # a dense model has no such work
    dense_layer, dense = demo_layer()
    assert estimate_module.expert_work(dense_layer, dense, qcfg, tokens, batches) == (0.0, 0.0)


def test_the_estimate_of_a_real_size_moe_layer_is_not_the_flop_count():
    """Qwen3.5-35B-A3B's MoE block (hidden 2048, 256 experts of 512, top 8, a shared expert; the tiny model's
    attention heads, a small part of the layer's time), GPTQ on 2,111 tokens in
    16 batches, at the speeds its measured CPU run's header recorded (91.2 GFLOP/s, 10.3 us a call) and the fewest
    ns per weight element a few-token linear took on that machine (0.55): the run measured 851-886 s a layer
    (benchmarks/results/real_size_qwen3_5_cpu.json); the estimate without the experts' passes, Hessian sums and
    block updates said 321 s. With them it must say at least 450."""
    skeleton, family, _, _ = moe_layer(experts=256, top_k=8, hidden=2048, intermediate=512)
    config = JobConfig.from_flat(output="-", method="gptq", num_samples=16)
    speed = Speed(91.2e9, 10.3e-6, 0.55e-9)
    e = estimate(skeleton, family, config, torch.device("cpu"), 2111, torch.bfloat16, speed=speed)
    assert 450 < e["seconds_per_layer"] < 886


def test_the_dense_layer_of_a_mixed_moe_model_has_no_expert_work_and_its_sparse_layer_has():
    """Qwen3-VL-MoE with ``mlp_only_layers``: the family has experts, its layer 1 none (a dense MLP)."""
    from tests.tiny_models import qwen3_vl_moe_config

    config = qwen3_vl_moe_config(layers=3, mlp_only_layers=(1,))
    family = family_for(config.model_type).bind(config)
    layers = build_skeleton(config, family, torch.float32).get_submodule(family.decoder_layers)
    qcfg = JobConfig.from_flat(output="-", method="gptq").quant
    sparse, dense = (estimate_module.expert_work(layers[i], family.at(i), qcfg, 640, 16) for i in (0, 1))
    assert dense == (0.0, 0.0) and sparse[0] > 0 and sparse[1] > 0
