"""MoE experts as one linear per expert (qvlquant.engine.experts): the same outputs as transformers' fused experts,
the checkpoint's names, and whole Qwen3.5-MoE runs: per-expert token counts, rarely reached experts rounded to
nearest and named, the router / shared-expert gate / MTP head carried bit for bit."""

import json
import shutil

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


def test_experts_on_all_tokens_see_every_token_and_change_no_output():
    """A rarely reached expert calibrated on all tokens (``rare_experts`` "all_tokens"): while the set is open its
    linears run on every token (a never-picked expert too), the block's output is unchanged, and afterwards the
    experts are back to their routed tokens."""
    from types import SimpleNamespace

    from qvlquant.quant.layer import experts_on_all_tokens

    fused = _fused_experts()
    module = _unfused_copy(fused)
    layer = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    layer.mlp.experts = module
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 32, generator=g)
    index = torch.stack([torch.arange(40) % 5, (torch.arange(40) + 1) % 5], 1)  # expert 5 is never picked
    weights = torch.softmax(torch.randn(40, 2, generator=g), -1)
    seen = {}
    for e in (3, 5):
        module.expert(e).down_proj.register_forward_hook(
            lambda m, a, o, e=e: seen.setdefault(e, []).append((m.routed_rows.tolist(), a[0].shape[0])))
    with torch.no_grad(), experts_on_all_tokens(layer, SimpleNamespace(experts="mlp.experts"), {3, 5}):
        torch.testing.assert_close(module(x, index, weights), fused(x, index, weights), rtol=1e-5, atol=1e-5)
    assert seen == {3: [(list(range(40)), 40)], 5: [(list(range(40)), 40)]}
    seen.clear()
    with torch.no_grad():
        module(x, index, weights)
    assert seen == {3: [(sorted(set((index == 3).nonzero()[:, 0].tolist())), 16)]} and module.all_tokens == frozenset()


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
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_rare_experts_calibrated_on_all_tokens(moe_base, tmp_path, method):
    """``rare_experts="all_tokens"``: the experts under --min-expert-tokens are calibrated on every token of their
    layer instead of rounded to nearest: named under ``calibrated_on_all_tokens``, none rounded, GPTQ's Hessian of
    such an expert counts every calibration token, and its weights are not RTN's."""
    import qvlquant

    from qvlquant.quant.rtn import fake_quantize
    from qvlquant.quant.spec import QuantSpec

    out = tmp_path / method
    report = qvlquant.quantize(model=str(moe_base), output=str(out), method=method, calib="demo", num_samples=4,
                               min_expert_tokens=150, rare_experts="all_tokens")
    experts = report["experts"]
    rare = [(layer, e) for layer, tokens in experts["tokens"].items() for e, n in enumerate(tokens) if n < 150]
    assert rare and experts["rounded_to_nearest"] == []
    assert sorted(experts["calibrated_on_all_tokens"]) == sorted(
        f"{layer}.mlp.experts.{e}.{leaf}" for layer, e in rare for leaf in ("gate_proj", "up_proj", "down_proj"))
    layer, e = rare[0]
    name = f"{layer}.mlp.experts.{e}.up_proj"
    info = report["layers"][name]
    assert info["tokens"] == experts["tokens"][layer][e] and info["fallback"] == "all_tokens"
    if method == "gptq":
        assert info["calibration_tokens"] == report["calibration"]["tokens"]
    base = _tensors(moe_base)
    w = base[name + ".weight"].float()
    rtn = fake_quantize(w, QuantSpec(4, 128, sym=method == "gptq"))
    reloaded, _ = qvlquant.load(out)
    x = torch.randn(16, w.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = reloaded.get_submodule(name)(x)
    assert (got - x @ rtn.T).norm() / (x @ rtn.T).norm() > 1e-2  # calibrated, not rounded to nearest


# --- Qwen3-VL-MoE: experts stored fused (and transposed) in the checkpoint, read one expert at a time -------------

def test_fused_layout_tells_transformers_layout_from_the_transposed_one_by_the_layers_shapes():
    from qvlquant.engine.experts import fused_layout

    slices = family_for("qwen3_vl_moe").fused_experts
    read = lambda gate_up, down: fused_layout(slices, {"gate_up_proj": gate_up, "down_proj": down}, "layer 3")  # noqa: E731
    E, H, I = 4, 64, 24  # noqa: E741
    assert read((E, 2 * I, H), (E, H, I)) is False  # transformers' parameters, what save_pretrained writes
    assert read((E, H, 2 * I), (E, I, H)) is True  # the published checkpoints
    # a square tensor alone reads either way; its layer's other tensor decides (transformers keeps it as stored)
    assert read((E, 2 * H, H), (E, H, H)) is False and read((E, H, 2 * H), (E, H, H)) is True
    assert read((E, H, H), (E, H, H // 2)) is False and read((E, H, H), (E, H // 2, H)) is True
    for gate_up, down in [((E, 2 * I, H), (E, I, H)),  # mixed: gate_up as transformers holds it, down transposed
                          ((E, 2 * I, H), (E + 1, H, I)),  # expert counts differ
                          ((E, 2 * I + 1, H), (E, H, I)), ((E, 2 * I, H), (E, H, I, 1))]:
        with pytest.raises(ValueError, match=r"layer 3: the fused experts' tensors \(gate_up_proj \[.*fit neither"):
            read(gate_up, down)


@pytest.fixture(scope="module")
def vl_moe_base(tmp_path_factory):
    """A tiny Qwen3-VL-MoE checkpoint as published (fused experts transposed; layers sparse, dense, sparse) and the
    float32 model it holds."""
    from tiny_models import qwen3_vl_moe_checkpoint

    folder = tmp_path_factory.mktemp("qwen3_vl_moe") / "base"
    return folder, qwen3_vl_moe_checkpoint(folder)


def _streamed(folder):
    from qvlquant.engine.skeleton import build_skeleton, load_config
    from qvlquant.engine.streaming import check_checkpoint
    from qvlquant.storage.shards import ShardReader

    family = family_for("qwen3_vl_moe")
    config = load_config(folder, family)
    family = family.bind(config)
    skeleton = build_skeleton(config, family, torch.float32)
    reader = ShardReader(folder)
    check_checkpoint(skeleton, family, reader)
    return skeleton, family, reader


@pytest.mark.parametrize("transposed", [True, False])
def test_a_streamed_layer_reads_each_expert_as_its_slice_of_the_fused_tensors(vl_moe_base, tmp_path, transposed):
    """Both layouts: every expert's gate / up / down is its rows of the model's gate_up_proj / down_proj, read one
    expert's entry at a time (a whole fused tensor is never read)."""
    from tiny_models import qwen3_vl_moe_checkpoint

    from qvlquant.engine.streaming import StreamedLayers

    folder, model = vl_moe_base if transposed else (tmp_path, qwen3_vl_moe_checkpoint(tmp_path, transposed=False))
    skeleton, family, reader = _streamed(folder)
    whole = reader.get
    reader.get = lambda key: whole(key) if "experts" not in key else pytest.fail(f"read all of {key}")
    layers = StreamedLayers(skeleton, family, reader, torch.device("cpu"), torch.float32)
    for i in (0, 2):  # the sparse layers
        fused = model.model.language_model.layers[i].mlp.experts
        experts = layers.load(i).mlp.experts
        assert type(experts).__name__ == "ExpertLinears"
        for e in range(8):
            expert = experts.expert(e)
            gate, up = fused.gate_up_proj[e].bfloat16().float().chunk(2)
            assert torch.equal(expert.gate_proj.weight, gate) and torch.equal(expert.up_proj.weight, up), (i, e)
            assert torch.equal(expert.down_proj.weight, fused.down_proj[e].bfloat16().float()), (i, e)
        layers.release(i)
    dense = layers.load(1).mlp
    want = model.model.language_model.layers[1].mlp.down_proj.weight.bfloat16().float()
    assert torch.equal(dense.down_proj.weight, want)


def test_unfused_experts_read_from_the_transposed_checkpoint_give_transformers_logits(vl_moe_base):
    """qvlquant's model (one linear per expert, read expert by expert: ``load_base`` and ``qvlquant.load``) computes
    the logits transformers' own from_pretrained model (fused experts, transposed at load) computes."""
    import transformers as tf
    from tiny_models import tiny_batch

    import qvlquant
    from qvlquant.engine.streaming import load_base

    folder, _ = vl_moe_base
    reference = tf.Qwen3VLMoeForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours, _, family, _ = load_base(folder)
    loaded, _ = qvlquant.load(folder)
    batch = tiny_batch(reference)
    with torch.no_grad():
        want = reference(**batch).logits
        for model in (ours, loaded):
            assert type(model.get_submodule("model.language_model.layers.2.mlp.experts")).__name__ == "ExpertLinears"
            torch.testing.assert_close(model(**batch).logits, want, rtol=1e-4, atol=1e-4)
    assert want.abs().max() > 0.1  # not a vacuous comparison


def test_a_fused_expert_tensor_of_another_shape_is_refused_by_name(vl_moe_base, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = vl_moe_base
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.language_model.layers.2.mlp.experts.down_proj"
    tensors[key] = tensors[key][:, :, :-8].contiguous()  # [E, I, H - 8]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"bad: model.language_model.layers.2.mlp.experts: the fused experts' "
                                         r"tensors \(gate_up_proj \[8, 128, 512\], down_proj \[8, 256, 120\]\) fit "
                                         "neither"):
        _streamed(bad)
    base = load_file(folder / "model.safetensors")
    for leaf in ("gate_up_proj", "down_proj"):  # 6 experts where config.json says 8
        name = f"model.language_model.layers.2.mlp.experts.{leaf}"
        tensors[name] = base[name][:6].contiguous()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"bad: model.language_model.layers.2.mlp.experts.gate_up_proj holds 6 "
                                         r"experts; config.json gives the model more \(model.language_model.layers.2"
                                         r".mlp.experts.6.gate_proj.weight\)"):
        _streamed(bad)


def test_qwen3_vl_moe_refuses_to_pad_an_mlp_its_moe_layers_do_not_have(vl_moe_base, tmp_path):
    import qvlquant

    with pytest.raises(ValueError, match="--pad-intermediate-to: qwen3_vl_moe's decoder layers do not all hold"):
        qvlquant.quantize(model=str(vl_moe_base[0]), output=str(tmp_path / "out"), method="gptq", calib="demo",
                          num_samples=2, pad_intermediate_to=512)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_qwen3_vl_moe_run_quantizes_each_expert_and_reloads(vl_moe_base, tmp_path, method):
    """The streamed run on a checkpoint of transposed fused experts (RTN straight from the checkpoint, GPTQ through
    the layer loop): every expert's linears quantized and written one linear per expert in the names vLLM's per-expert
    loader reads (``mlp.experts.{e}.gate_proj.qweight``), no fused tensor left; the router and the vision tower bit for
    bit; reloads with ``qvlquant.load``, an expert's weight the rounding of its own slice; RTN's logits those of
    transformers' fused model with every weight rounded to nearest."""
    import qvlquant
    from tiny_models import tiny_batch

    from qvlquant.quant.spec import QuantSpec

    folder, model = vl_moe_base
    out = tmp_path / method
    report = qvlquant.quantize(model=str(folder), output=str(out), method=method, calib="demo", num_samples=2)
    assert len(report["layers"]) == 2 * (4 + 8 * 3) + 7  # two sparse layers of 8 experts, one dense layer
    if method == "gptq":
        calibration = report["calibration"]["tokens"]
        assert sorted(report["experts"]["tokens"]) == ["model.language_model.layers.0", "model.language_model.layers.2"]
        assert all(sum(tokens) == 2 * calibration for tokens in report["experts"]["tokens"].values())
    base, export = _tensors(folder), _tensors(out)
    kept = [k for k in base if k.endswith("mlp.gate.weight") or k.startswith("model.visual.")]
    assert len(kept) > 20
    for key in kept:
        assert torch.equal(export[key].view(torch.uint8), base[key].view(torch.uint8)), key
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in export)
    for i in (0, 2):
        for e in range(8):
            for leaf in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.language_model.layers.{i}.mlp.experts.{e}.{leaf}.qweight" in export
    reloaded, _ = qvlquant.load(out)
    up = reloaded.get_submodule("model.language_model.layers.2.mlp.experts.5.up_proj")
    assert type(up).__name__ == "QuantLinear"
    w = base["model.language_model.layers.2.mlp.experts.gate_up_proj"][5].T[256:].float()  # expert 5's up, [I, H]
    # its own weight, 4-bit (GPTQ moves it further, fitting the few tokens this expert got; another expert's or the
    # gate's weight would be about 1.4 away)
    assert (up.quantized_weight().dequantize() - w).norm() / w.norm() < (0.15 if method == "rtn" else 0.5)
    batch = tiny_batch(model)
    with torch.no_grad():
        logits = reloaded(**batch).logits
        if method == "rtn":  # transformers' fused model holding each weight rounded to nearest: the same logits
            want = _rounded(model, QuantSpec(4, 128, sym=True))(**batch).logits
            assert (logits - want).norm() / want.norm() < 1e-3  # the 16-bit scales' rounding only
    assert torch.isfinite(logits).all()
    if method == "rtn":  # load knows each expert's linears (the family bound to the config): one left plain is refused
        from safetensors.torch import save_file

        from qvlquant.storage.manifest import MANIFEST

        edited = tmp_path / "edited"
        shutil.copytree(out, edited)
        (edited / MANIFEST).unlink()
        head = "model.language_model.layers.2.mlp.experts.5.up_proj."
        tensors = {k: v for k, v in export.items() if not k.startswith(head)}
        tensors[head + "weight"] = w.bfloat16().contiguous()
        save_file(tensors, edited / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"{head}weight is a plain weight, but config.json's quantization_config "
                                             "quantizes"):
            qvlquant.load(edited)


def _rounded(model, spec):
    """A copy of a transformers Qwen3-VL-MoE whose decoder linears and experts (in their fused tensors) hold their
    weights rounded to nearest."""
    import copy

    from qvlquant.quant.rtn import fake_quantize

    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(fake_quantize(m.weight, spec))
            experts = getattr(layer.mlp, "experts", None)
            for e in range(experts.num_experts if experts is not None else 0):
                gate, up = experts.gate_up_proj[e].chunk(2)
                experts.gate_up_proj[e] = torch.cat([fake_quantize(gate, spec), fake_quantize(up, spec)])
                experts.down_proj[e] = fake_quantize(experts.down_proj[e], spec)
    return model


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
