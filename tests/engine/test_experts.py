"""MoE experts as one linear per expert (qvlquant.engine.experts): the same outputs as transformers' fused experts,
the checkpoint's names, and whole Qwen3.5-MoE runs: per-expert token counts, rarely reached experts rounded to
nearest and named, the router / shared-expert gate / MTP head carried bit for bit."""

import json

import pytest
import torch

from qvlquant.engine.experts import ExpertLinears, coverage, unfuse_experts
from qvlquant.families import family_for


def _fused_experts(experts=6, hidden=32, intermediate=16, seed=0):
    import transformers as tf
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeExperts

    config = tf.Qwen3_5MoeTextConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=experts)
    fused = Qwen3_5MoeExperts(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fused.gate_up_proj.copy_(torch.randn(fused.gate_up_proj.shape, generator=g))
        fused.down_proj.copy_(torch.randn(fused.down_proj.shape, generator=g))
    return fused


def _unfused_copy(fused):
    family = family_for("qwen3_5_moe")
    count, two_i, hidden = fused.gate_up_proj.shape
    module = ExpertLinears(count, family.expert_linears, hidden, two_i // 2, fused.act_fn, torch.float32, "cpu")
    for e in range(count):
        expert = module.expert(e)
        expert.gate_proj.weight.data = fused.gate_up_proj.data[e, : two_i // 2].clone()
        expert.up_proj.weight.data = fused.gate_up_proj.data[e, two_i // 2:].clone()
        expert.down_proj.weight.data = fused.down_proj.data[e].clone()
    return module


def test_expert_linears_compute_what_transformers_fused_experts_compute():
    fused = _fused_experts()
    module = _unfused_copy(fused)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 32, generator=g)
    index = torch.randint(0, 5, (40, 2), generator=g)  # expert 5 is never picked
    index[:, 1] = (index[:, 0] + 1 + torch.randint(0, 4, (40,), generator=g)) % 5
    weights = torch.softmax(torch.randn(40, 2, generator=g), -1)
    seen = {}
    module.expert(3).up_proj.register_forward_hook(lambda m, a, o: seen.update(rows=m.routed_rows.clone(), n=a[0].shape[0]))
    with torch.no_grad():
        torch.testing.assert_close(module(x, index, weights), fused(x, index, weights), rtol=1e-5, atol=1e-5)
    # expert 3's linears ran on exactly the tokens routed to it, and said which while they ran
    routed = sorted(set((index == 3).nonzero()[:, 0].tolist()))
    assert seen["rows"].tolist() == routed and seen["n"] == len(routed)
    assert module.expert(3).up_proj.routed_rows is None  # not left behind


def test_an_unfused_skeleton_is_named_as_the_checkpoint_stores_experts(tmp_path):
    from tiny_models import qwen3_5_checkpoint

    from qvlquant.engine.skeleton import build_skeleton, load_config
    from qvlquant.storage.shards import ShardReader

    qwen3_5_checkpoint(tmp_path, layers=4, moe=True)
    family = family_for("qwen3_5_moe")
    config = load_config(tmp_path, family)
    family = family.bind(config)
    skeleton = build_skeleton(config, family, torch.float32)
    names = {n for n, _ in skeleton.named_parameters()}
    keys = set(ShardReader(tmp_path).keys())
    assert names <= keys and not any("gate_up_proj" in n for n in names)
    assert "model.language_model.layers.2.mlp.experts.7.down_proj.weight" in names
    assert unfuse_experts(skeleton, family) == 0  # once is enough
    layer = skeleton.get_submodule("model.language_model.layers.0")
    linears = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(family.at(0).linears) <= set(linears)
    # every linear of the layer is declared, but the router's 1-row gate and the shared expert's gate: kept as they are
    assert set(linears) - set(family.at(0).linears) == {"mlp.shared_expert_gate"}


def test_coverage_counts_tokens_per_expert_and_names_the_rounded():
    family = family_for("qwen3_5_moe").bind({"text_config": {"num_experts": 3, "num_experts_per_tok": 2, "layer_types": ["full_attention"]}})
    info = {"m.layers.0.mlp.experts.0.gate_proj": {"tokens": 9}, "m.layers.0.mlp.experts.0.up_proj": {"tokens": 9},
            "m.layers.0.mlp.experts.2.gate_proj": {"tokens": 1, "fallback": "rtn"},
            "m.layers.0.mlp.experts.2.down_proj": {"tokens": 1, "fallback": "rtn"},
            "m.layers.0.mlp.experts.1.gate_proj": {"tokens": 4}, "m.layers.0.self_attn.q_proj": {"tokens": 14}}
    got = coverage(family, info)
    assert got["tokens"] == {"m.layers.0": [9, 4, 1]} and (got["fewest_tokens"], got["most_tokens"]) == (1, 9)
    assert got["rounded_to_nearest"] == ["m.layers.0.mlp.experts.2.gate_proj", "m.layers.0.mlp.experts.2.down_proj"]
    assert coverage(family_for("qwen3_5"), info) is None


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory):
    from tiny_models import qwen3_5_checkpoint

    folder = tmp_path_factory.mktemp("qwen3_5_moe") / "base"
    qwen3_5_checkpoint(folder, moe=True)
    return folder


def _tensors(folder):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in list(f.keys())}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_qwen3_5_moe_run_calibrates_each_expert_on_its_own_tokens(moe_base, tmp_path, method):
    """The whole streamed run: every expert's linears quantized, each with the tokens its router sent (their sum is
    top-k times the calibration tokens), the experts under --min-expert-tokens rounded to nearest (exactly RTN's
    codes) and named; the router, the shared-expert gate, the MTP head kept bit for bit; reloads with
    ``qvlquant.load``."""
    import qvlquant
    from tiny_models import MTP_KEYS

    from qvlquant.quant.rtn import fake_quantize
    from qvlquant.quant.spec import QuantSpec

    out = tmp_path / method
    report = qvlquant.quantize(model=str(moe_base), output=str(out), method=method, calib="demo", num_samples=4,
                               min_expert_tokens=150)
    experts = report["experts"]
    calibration = report["calibration"]["tokens"]
    assert experts["experts_per_layer"] == 8 and len(experts["tokens"]) == 4
    for layer, tokens in experts["tokens"].items():
        assert sum(tokens) == 2 * calibration, layer  # top-2 routing: each real token reaches two experts
    rare = [(layer, e) for layer, tokens in experts["tokens"].items() for e, n in enumerate(tokens) if n < 150]
    assert rare, "the threshold should catch some experts of this draw"
    assert sorted(experts["rounded_to_nearest"]) == sorted(f"{layer}.mlp.experts.{e}.{leaf}" for layer, e in rare
                                                           for leaf in ("gate_proj", "up_proj", "down_proj"))
    assert len(report["layers"]) == 4 * (8 * 3 + 3) + 3 * 5 + 4
    base, export = _tensors(moe_base), _tensors(out)
    for key in [k for k in base if k.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))] + list(MTP_KEYS):
        assert torch.equal(export[key].view(torch.uint8), base[key].view(torch.uint8)), key
    reloaded, _ = qvlquant.load(out)
    layer, e = rare[0]
    name = f"{layer}.mlp.experts.{e}.up_proj"
    w = base[name + ".weight"].float()
    expected = fake_quantize(w, QuantSpec(4, 128, sym=method == "gptq"))
    x = torch.randn(16, w.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = reloaded.get_submodule(name)(x)
    assert (got - x @ expected.T).norm() / (x @ expected.T).norm() < 1e-3  # the 16-bit scales' rounding only
    quantized = [n for n, m in reloaded.named_modules() if type(m).__name__ == "QuantLinear"]
    assert len(quantized) == len(report["layers"])


@pytest.mark.slow
def test_the_size_search_gives_each_moe_layer_one_width(moe_base, tmp_path):
    """--target-bits on Qwen3.5-MoE: the search's unit for a layer's experts is all of them (vLLM runs them as one
    layer of one setting), so its choice passes the fused-layer check and every expert of a layer has one width."""
    import qvlquant
    from qvlquant.checkpoint.qconfig import read_quantization_config

    out = tmp_path / "searched"
    report = qvlquant.quantize(model=str(moe_base), output=str(out), method="rtn", group_size=64, target_bits=6.5,
                               candidate_bits=[4, 8], calib="demo", num_samples=2, export_format="compressed-tensors")
    section = report["mixed_precision"]
    assert len(section["groups"]) == 3 * 5 + 5  # per layer: its linear groups, the experts' joined into one unit
    config = json.loads((out / "config.json").read_text())
    quant = read_quantization_config(config["quantization_config"], "config.json")
    widths = {}
    for i in range(4):
        for e in range(8):
            for leaf in ("gate_proj", "up_proj", "down_proj"):
                spec = quant.spec_for(f"model.language_model.layers.{i}.mlp.experts.{e}.{leaf}")
                widths.setdefault(i, set()).add(spec.bits)
    assert all(len(w) == 1 for w in widths.values()), widths
    assert abs(section["bits_per_weight"] - 6.5) < 0.1
