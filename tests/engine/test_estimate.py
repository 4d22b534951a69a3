"""The up-front estimate (qvlquant.engine.estimate): time per layer as the slowest rank does it."""

import torch

from qvlquant.assets.paths import MODEL_DIR
from qvlquant.engine.estimate import layer_flops
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
