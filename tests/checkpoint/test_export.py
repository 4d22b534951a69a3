import copy
import json

import pytest
import torch
from safetensors import safe_open

import qvlquant
from qvlquant.checkpoint.export import MANIFEST, export
from qvlquant.config import ExportConfig
from qvlquant.engine.loop import LoopPlan, quantize_model
from qvlquant.families import QWEN2_VL, family_for
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.spec import QuantConfig, QuantSpec
from qvlquant.runtime.load import QuantLinear


def quantize_and_export(demo, demo_batches, out, spec=QuantSpec(4, 128, True), method="rtn", **options):
    model, processor = demo
    q = copy.deepcopy(model)
    plan = LoopPlan(family=QWEN2_VL, qcfg=QuantConfig(method, spec, **options), pack_format=PackFormat.for_job(method))
    result = quantize_model(q, demo_batches, plan)
    export(q, processor, result, out, {"base_model": "demo"})
    return q


def logits(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


CASES = [
    ("rtn", QuantSpec(4, 128, True), {}),
    ("rtn", QuantSpec(8, -1, False), {}),
    ("rtn", QuantSpec(3, 64, True), {}),
    ("gptq", QuantSpec(4, 64, True), {"desc_act": True}),
    ("gptq", QuantSpec(2, 128, False), {"static_groups": True, "desc_act": True}),
    ("awq", QuantSpec(4, 128, False), {}),
]


@pytest.mark.parametrize("method,spec,options", CASES)
def test_export_then_load_gives_the_same_logits(demo, demo_batches, tmp_path, method, spec, options):
    q = quantize_and_export(demo, demo_batches, tmp_path / "q", spec, method, **options)
    loaded, _ = qvlquant.load(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 28
    visual = [m for n, m in loaded.named_modules() if n.startswith("model.visual")]
    assert sum(type(m) is torch.nn.Linear for m in visual) == 10 and not any(isinstance(m, QuantLinear) for m in visual)
    batch = next(b for b in demo_batches if "pixel_values" in b)
    torch.testing.assert_close(logits(loaded, batch), logits(q, batch), rtol=0, atol=1e-5)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == spec.bits and cfg["group_size"] == spec.group_size
    assert {"visual", "model.visual"} <= set(cfg["modules_to_not_convert"])
    if method == "awq":
        assert cfg["quant_method"] == "awq" and cfg["version"] == "gemm" and cfg["zero_point"] is True
    else:
        assert cfg["quant_method"] == "gptq" and cfg["sym"] == spec.sym
        # act-order with static groups is written as plain groups (its g_idx is trivial): vLLM refuses desc_act
        true_act_order = options.get("desc_act", False) and not options.get("static_groups", False)
        assert cfg["desc_act"] is true_act_order and cfg["meta"]["act_order"] is options.get("desc_act", False)


def test_keys_are_those_save_pretrained_writes(demo, demo_batches, tmp_path):
    model, _ = demo
    quantize_and_export(demo, demo_batches, tmp_path / "q")
    model.save_pretrained(tmp_path / "ref")
    with safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as f:
        reference = set(f.keys())
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        ours = set(f.keys())
    qsuffix = (".qweight", ".qzeros", ".scales", ".g_idx")
    as_weights = {k.rsplit(".", 1)[0] + ".weight" if k.endswith(qsuffix) else k for k in ours}
    assert as_weights == reference
    assert any(k.startswith("model.layers.0.self_attn.q_proj.qweight") for k in ours)
    assert "lm_head.weight" not in ours  # tied embeddings, as save_pretrained writes them


def test_tied_embeddings_survive_reload(demo, demo_batches, tmp_path):
    quantize_and_export(demo, demo_batches, tmp_path / "q")
    loaded, _ = qvlquant.load(tmp_path / "q")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()


def test_saved_processor_has_no_truncation(demo, demo_batches, tmp_path):
    quantize_and_export(demo, demo_batches, tmp_path / "q")
    tok = json.loads((tmp_path / "q" / "tokenizer.json").read_text())
    assert tok["truncation"] is None


def test_two_runs_are_byte_identical(demo, demo_batches, tmp_path):
    quantize_and_export(demo, demo_batches, tmp_path / "a")
    quantize_and_export(demo, demo_batches, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_crash_mid_save_keeps_the_old_model(demo, demo_batches, tmp_path, monkeypatch):
    out = tmp_path / "q"
    quantize_and_export(demo, demo_batches, out)
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("qvlquant.checkpoint.export.write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        quantize_and_export(demo, demo_batches, out, QuantSpec(8, 128, True))
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left behind


def test_tampered_or_missing_file_fails_loading(demo, demo_batches, tmp_path):
    out = tmp_path / "q"
    quantize_and_export(demo, demo_batches, out)
    assert json.loads((out / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"]
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        qvlquant.load(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        qvlquant.load(out)


def test_sharded_export_index_and_missing_shard(demo, demo_batches, tmp_path):
    model, processor = demo
    q = copy.deepcopy(model)
    plan = LoopPlan(family=QWEN2_VL, qcfg=QuantConfig("rtn", QuantSpec(4, 128, True)), pack_format=PackFormat.GPTQ)
    result = quantize_model(q, demo_batches, plan)
    out = tmp_path / "sharded"
    export(q, processor, result, out, {}, options=ExportConfig(max_shard_bytes=2 * 2**20))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).exists() for s in shards) and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    loaded, _ = qvlquant.load(out)
    batch = next(b for b in demo_batches if "pixel_values" in b)
    torch.testing.assert_close(logits(loaded, batch), logits(q, batch), rtol=0, atol=1e-5)
    (out / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        qvlquant.load(out)


def test_static_act_order_exports_the_trivial_g_idx_in_the_original_column_order(demo, demo_batches, tmp_path):
    """--desc-act --static-groups: act-order's g_idx is the trivial one, so the checkpoint says desc_act false (the
    only act-order vLLM 0.33 loads) and its packed codes, read with that g_idx, are the quantized weights as they
    are, in the original column order."""
    from qvlquant.quant.formats import PackFormat
    from qvlquant.quant.rtn import default_g_idx

    model, processor = demo
    q = copy.deepcopy(model)
    spec = QuantSpec(4, 64, True)
    qcfg = QuantConfig("gptq", spec, desc_act=True, static_groups=True)
    result = quantize_model(q, demo_batches, LoopPlan(family=QWEN2_VL, qcfg=qcfg, pack_format=PackFormat.GPTQ))
    export(q, processor, result, tmp_path / "q", {})
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["desc_act"] is False and cfg["static_groups"] is True and cfg["meta"]["act_order"] is True
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        for name, qw in result.weights.items():
            prefix = QWEN2_VL.to_disk(name)
            tensors = {k: f.get_tensor(f"{prefix}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
            k = qw.q.shape[1]
            assert torch.equal(tensors["g_idx"], default_g_idx(k, spec))
            unpacked = PackFormat.GPTQ.unpack({n: t for n, t in tensors.items() if n != "g_idx"}, spec, k)
            assert torch.equal(unpacked.q, qw.q)  # the codes, column for column, without any g_idx
            torch.testing.assert_close(unpacked.dequantize(), qw.dequantize(), rtol=0, atol=1e-3)


def test_gptq_module_names_match_no_vision_linear_of_any_family():
    """vLLM treats a linear as GPTQ-quantized when its name contains a modules_in_block_to_quantize entry: the
    entries name the decoder layer, so no vision linear (Qwen2.5-VL's vision MLP is mlp.gate_proj/up/down) matches,
    and optimum still finds each of its runtime names as a suffix."""
    from tiny_models import tiny_model

    from qvlquant.checkpoint.export import modules_in_block_to_quantize

    for model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        family = family_for(model_type)
        model = tiny_model(model_type)
        entries = sum(modules_in_block_to_quantize(family, 3), [])
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        vision = [family.to_disk(n + ".")[:-1].removeprefix("model.") for n in linears if n.startswith("model.visual.")]
        assert vision and not [v for v in vision if any(e in v for e in entries)]
        language = [n for n in linears if n.startswith(family.decoder_layers + ".")]
        assert len(language) == len(entries) == 21
        assert all([e for e in entries if n.endswith(e)] == [n.split("language_model.")[-1]] for n in language)


def test_compressed_tensors_config_is_validated_by_the_library():
    """Where compressed-tensors is installed the config is what its QuantizationConfig validates and writes (static
    act-order as actorder "weight"); a field it rejects fails the export, naming the field."""
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors (interop / vllm extra) not installed")
    from pydantic import ValidationError

    from qvlquant.checkpoint.export import (
        compressed_tensors_config,
        validated_by_library,
    )

    qcfg = QuantConfig("gptq", QuantSpec(4, 128, False), desc_act=True, static_groups=True)
    config = compressed_tensors_config(qcfg, QWEN2_VL)
    parsed = ct.QuantizationConfig.model_validate(config)
    weights = parsed.config_groups["group_0"].weights
    actorder = getattr(weights.actorder, "value", weights.actorder)
    assert actorder in ("weight", "static") and weights.group_size == 128 and not weights.symmetric
    assert config["meta"]["method"] == "gptq" and config["ignore"] == ["lm_head", "re:.*visual.*"]
    bad = {k: v for k, v in config.items() if k != "meta"}
    bad["config_groups"] = {"group_0": dict(bad["config_groups"]["group_0"],
                                            weights=dict(bad["config_groups"]["group_0"]["weights"], group_size=None))}
    with pytest.raises(ValidationError, match="group_size"):
        validated_by_library(bad)


def _dynamic_decision(dynamic: dict, name: str):
    """GPTQModel's / vLLM's reading of ``dynamic``: the first key whose regex re.match-es ``name``."""
    import re

    for key, value in dynamic.items():
        if re.match(key[2:], name):
            return "skip" if key.startswith("-:") else value["bits"]
    return 4


def test_mixed_configs_name_exactly_the_linears_the_rules_chose():
    """GPTQ dynamic, compressed-tensors groups / ignore and AWQ modules_to_not_convert from one plan: every
    linear's decision read back the way each client reads it (transformers' runtime name, the checkpoint name and
    vLLM's fused name) is the plan's, and no other linear is touched."""
    import re

    from qvlquant.checkpoint.export import quantization_config
    from qvlquant.quant.rules import ModulePlan, parse_rule

    rules = [parse_rule(r"layers\.(1|11)\.mlp:skip"), parse_rule(r"layers\.(0|12)\.:bits=8"), parse_rule(r"o_proj:skip")]
    gptq, awq = QuantConfig("gptq"), QuantConfig("awq")
    plan = ModulePlan.resolve(rules, gptq)
    fused = {"self_attn.q_proj": "self_attn.qkv_proj", "self_attn.k_proj": "self_attn.qkv_proj",
             "self_attn.v_proj": "self_attn.qkv_proj", "mlp.gate_proj": "mlp.gate_up_proj",
             "mlp.up_proj": "mlp.gate_up_proj"}
    config = quantization_config(gptq, PackFormat.GPTQ, QWEN2_VL, 13, plan)
    ct = quantization_config(gptq, PackFormat.COMPRESSED, QWEN2_VL, 13, plan)
    groups = {g["weights"]["num_bits"]: g["targets"] for g in ct["config_groups"].values()}
    in_block = {n for group in config["modules_in_block_to_quantize"] for n in group}
    for i in range(13):
        for linear in QWEN2_VL.linears:
            runtime = f"model.language_model.layers.{i}.{linear}"
            cfg = plan.config_for(runtime)
            want = "skip" if cfg is None else cfg.spec.bits
            vllm = f"language_model.model.layers.{i}.{fused.get(linear, linear)}"
            for name in (runtime, f"model.layers.{i}.{linear}", vllm):
                assert _dynamic_decision(config["dynamic"], name) == want, (name, want)
            assert (f"layers.{i}.{linear}" in in_block) == (cfg is not None)
            ct_skip = any(re.match(e[3:], runtime) for e in ct["ignore"] if e.startswith("re:"))
            ct_bits = next((b for b, targets in groups.items() if any(
                t.startswith("re:") and re.match(t[3:], runtime) for t in targets)), 4)
            assert ("skip" if ct_skip else ct_bits) == want, runtime
    awq_plan = ModulePlan.resolve(rules[:1] + rules[2:], awq)
    not_converted = quantization_config(awq, PackFormat.AWQ_GEMM, QWEN2_VL, 13, awq_plan)["modules_to_not_convert"]
    skipped = [n for n in not_converted if n.startswith("layers.")]
    assert len(skipped) == 2 * 3 + 13
    for i in range(13):
        for linear in QWEN2_VL.linears:
            vllm = f"language_model.model.layers.{i}.{linear}"
            assert any(n in vllm for n in skipped) == (awq_plan.config_for(f"model.language_model.layers.{i}.{linear}") is None)


@pytest.mark.parametrize("method,fmt", [("gptq", PackFormat.GPTQ), ("rtn", PackFormat.COMPRESSED),
                                        ("awq", PackFormat.AWQ_GEMM)])
def test_mixed_exports_reload_with_each_linear_as_the_rules_left_it(demo, demo_batches, tmp_path, method, fmt):
    """Rules through export and ``qvlquant.load``: skipped linears come back as nn.Linear holding the base weight
    (in the storage dtype), overridden ones as QuantLinears of their own width, and the logits are the in-memory
    quantized model's."""
    from qvlquant.quant.rules import ModulePlan, parse_rule

    model, processor = demo
    q = copy.deepcopy(model)
    sym = method != "awq"
    qcfg = QuantConfig(method, QuantSpec(4, 128, sym))
    rules = [parse_rule(r"layers\.1\.mlp:skip")] + ([] if fmt is PackFormat.AWQ_GEMM else
                                                   [parse_rule(r"layers\.(0|3)\.self_attn:bits=8,group_size=64")])
    plan = LoopPlan(family=QWEN2_VL, qcfg=qcfg, pack_format=fmt, storage_dtype=torch.float32,
                    modules=ModulePlan.resolve(rules, qcfg))
    result = quantize_model(q, demo_batches, plan)
    export(q, processor, result, tmp_path / "q", {"base_model": "demo"})
    loaded, _ = qvlquant.load(tmp_path / "q")
    prefix = "model.language_model.layers"
    for name in (f"{prefix}.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")):
        m = loaded.get_submodule(name)
        assert type(m) is torch.nn.Linear and torch.equal(m.weight, model.get_submodule(name).weight)
    if fmt is not PackFormat.AWQ_GEMM:
        assert loaded.get_submodule(f"{prefix}.3.self_attn.k_proj").spec == QuantSpec(8, 64, sym)
    assert loaded.get_submodule(f"{prefix}.2.mlp.up_proj").spec == QuantSpec(4, 128, sym)
    batch = next(b for b in demo_batches if "pixel_values" in b)
    torch.testing.assert_close(logits(loaded, batch), logits(q, batch), rtol=0, atol=1e-5)


def test_moe_configs_give_each_layers_experts_one_decision_every_client_reads():
    """Qwen3.5-MoE, rules on whole MoE layers (layer 1's experts skipped, layer 2's at 8 bits; a rule cannot split a
    layer's experts, tests/quant/test_rules.py): GPTQ ``dynamic`` and compressed-tensors regexes stand for every
    expert with ``\\d+`` (one pattern per linear, not one per expert) and match vLLM's MoE layer
    (``language_model.model.layers.1.mlp.experts``, which GPTQ's rules are matched against) and every expert's
    runtime and checkpoint names, of those layers only (not layer 11 / 12); compressed-tensors ignores the routers
    and shared-expert gates, AWQ names them and the skipped MoE layer (vLLM matches its substrings)."""
    import re

    from qvlquant.checkpoint.export import quantization_config
    from qvlquant.engine.loop import fused_groups
    from qvlquant.quant.rules import ModulePlan, parse_rule

    layers = 13
    family = family_for("qwen3_5_moe").bind({"text_config": {"num_experts": 6, "num_experts_per_tok": 2,
                                                             "layer_types": ["linear_attention"] * layers}})
    names = [f"{family.decoder_layers}.{i}.{n}" for i in range(layers) for n in family.at(i).linears]
    rules = [parse_rule(r"layers\.1\.mlp\.experts\.:skip"), parse_rule(r"layers\.2\.mlp\.experts\.:bits=8")]
    gptq = QuantConfig("gptq")
    plan = ModulePlan.resolve(rules, gptq, names, fused_groups(family, layers))
    config = quantization_config(gptq, PackFormat.GPTQ, family, layers, plan)
    ct = quantization_config(gptq, PackFormat.COMPRESSED, family, layers, plan)
    assert max(len(k) for k in config["dynamic"]) < 200  # one pattern per linear, whatever the expert count
    groups = {g["weights"]["num_bits"]: g["targets"] for g in ct["config_groups"].values()}
    want = {1: "skip", 2: 8}
    for i in (1, 2, 11, 12):
        vllm = f"language_model.model.layers.{i}.mlp.experts"
        assert _dynamic_decision(config["dynamic"], vllm) == want.get(i, 4), vllm
        for e in range(6):
            for leaf in ("gate_proj", "up_proj", "down_proj"):
                runtime = f"model.language_model.layers.{i}.mlp.experts.{e}.{leaf}"
                assert _dynamic_decision(config["dynamic"], runtime) == want.get(i, 4), runtime
                ct_skip = any(re.match(x[3:], runtime) for x in ct["ignore"] if x.startswith("re:"))
                ct_bits = next((b for b, targets in groups.items() if any(
                    t.startswith("re:") and re.match(t[3:], runtime) for t in targets)), 4)
                assert ("skip" if ct_skip else ct_bits) == want.get(i, 4), runtime
    for kept in ("mlp.gate", "mlp.shared_expert_gate"):
        runtime = f"model.language_model.layers.3.{kept}"
        assert any(re.match(x[3:], runtime) for x in ct["ignore"] if x.startswith("re:"))
    assert not any(re.match(x[3:], "model.language_model.layers.3.mlp.shared_expert.gate_proj")
                   for x in ct["ignore"] if x.startswith("re:"))
    awq = QuantConfig("awq")
    awq_plan = ModulePlan.resolve(rules[:1], awq, names, fused_groups(family, layers))
    not_converted = quantization_config(awq, PackFormat.AWQ_GEMM, family, layers, awq_plan)["modules_to_not_convert"]
    assert {"mlp.gate", "mlp.shared_expert_gate", "layers.1.mlp.experts"} <= set(not_converted)
    assert [n for n in not_converted if "experts" in n and not n.startswith("layers.1.")] == []


def test_finite_checks_a_tensor_chunk_by_chunk_and_counts_every_bad_value(monkeypatch):
    """The copied tensors' NaN / infinity check walks ``FINITE_CHUNK`` elements at a time (bounded temporaries on
    a whole embedding table) and still finds and counts bad values in any chunk, the last partial one included."""
    from qvlquant.checkpoint import export as export_module

    monkeypatch.setattr(export_module, "FINITE_CHUNK", 7)
    t = torch.zeros(5, 6, dtype=torch.bfloat16)
    assert export_module.finite(t, "x") is t
    t[3, 1], t[4, 5] = float("nan"), float("-inf")  # elements 19 and 29: the third chunk and the last, partial one
    with pytest.raises(ValueError, match=r"^w holds NaN or infinite values \(2 of 30\)"):
        export_module.finite(t, "w")
    ints = torch.zeros(4, dtype=torch.int32)
    assert export_module.finite(ints, "i") is ints


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_finds_one_bad_value_anywhere_in_a_large_tensor(dtype, bad):
    """The check reads a tensor's largest and smallest value: a single NaN or infinity of either sign, at the first,
    a middle or the last element of a tensor long enough for vectorised reductions, is still found."""
    from qvlquant.checkpoint import export as export_module

    t = torch.randn(4099, 33).to(dtype)
    assert export_module.finite(t, "x") is t
    assert export_module.finite(torch.empty(0, 3, dtype=dtype), "e") is not None
    for index in (0, t.numel() // 2, t.numel() - 1):
        u = t.clone()
        u.view(-1)[index] = bad
        with pytest.raises(ValueError, match=r"^y holds NaN or infinite values \(1 of 135267\)"):
            export_module.finite(u, "y")
