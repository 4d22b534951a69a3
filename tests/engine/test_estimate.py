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
    speed = Speed(flops=50e9, call_seconds=5e-6)
    monkeypatch.setattr(estimate_module, "measured_speed", lambda device, dtype: speed)
    idle, busy = (demo_estimate("gptq", load, monkeypatch) for load in (0.5, 8.0))
    assert busy["seconds_per_layer"] == pytest.approx(4 * idle["seconds_per_layer"], rel=0.05)  # 8 on 2 CPUs
    assert busy["load"] == 8.0 and busy["cpus"] == 2
    assert "load 8.0 on 2 CPUs" in format_estimate(busy) and "load" not in format_estimate(idle)


def test_the_demo_estimate_counts_the_per_call_overhead_a_flop_count_misses(monkeypatch):
    """The demo's layers are small: a GPTQ layer's 5 replays of 64 batches and its 2048 column steps cost more
    than its floating-point work (measured on this 2-core machine: 86 GFLOP/s, 6 us per small call, 1.1-1.9 s
    per layer at a load of 3.5; the flop count alone said 0.2 s)."""
    monkeypatch.setattr(estimate_module, "measured_speed", lambda device, dtype: Speed(86e9, 6e-6))
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
