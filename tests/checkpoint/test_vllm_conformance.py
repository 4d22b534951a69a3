"""vLLM's own code judges qvlquant's exports: for GPTQ, AWQ and compressed-tensors exports of every family (tiny
random models of Qwen2-VL, Qwen2.5-VL and Qwen3-VL), ``inspect`` asks vLLM's quantization classes (override chain,
``from_config``, ``maybe_update_config``, the model's name mapper and fused-module lists, ``get_quant_method`` per
layer, the kernel chosen by ``create_weights`` at each tensor-parallel size, GPU capability faked) which method
every linear gets. The vision tower must be unquantized, the language model quantized, TP 1/2 accepted.

MoE families (Qwen3.5-MoE, Qwen3-VL-MoE; the ``MOE`` table) add each layer's experts as vLLM's one MoE layer: its
method per format and scheme (FP8, INT8 W8A8, NVFP4 too) and TP size, vLLM's own loader given the experts'
tensors, its whole MoE block built (routers unquantized), rules on whole MoE layers, and a split layer refused and
flagged.

Needs vLLM (``pip install 'qvlquant[vllm,test]'`` in its own venv, docs/VLLM.md); skipped without it in the main
venv. CI's second venv (.ci/vllm) sets QVLQUANT_REQUIRE_VLLM=1, so there it cannot skip. Measured on 2 shared
cores at a load average of 5 to 9: 276 s for the 114 tests; the 17 MoE tests took 80 to 120 s run alone (most of
it importing vLLM and building the tiny exports). With Qwen3-VL-MoE's: 158 s for the 151 tests at a load average of
about 3, the 34 MoE tests 96 s. With the schemes' MoE cases: 192 tests, 139 s at a load average of 2.4 to 3
(then the 8 calibrated W8A8 MoE cases, 43 s alone). With the schemes and block FP8 at TP 4 / 8 and block FP8 of
Qwen3.5-MoE, and the MTP drafter asked: 216 tests, 177 s (184 s wall) at a load average of 2.2 to 2.4.
"""

import copy
import json
import os
import shutil

import pytest
import torch

if os.environ.get("QVLQUANT_REQUIRE_VLLM") == "1":  # CI's vLLM venv: a missing vLLM is a failure, not a skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'qvlquant[vllm,test]' in its own venv, "
                                       "docs/VLLM.md): its own classes cannot be asked")

from tiny_models import tiny_batch, tiny_model  # noqa: E402

from qvlquant.checkpoint.datafree import export_fp8, export_nvfp4  # noqa: E402
from qvlquant.checkpoint.export import CheckpointTensors, export, quantization_config  # noqa: E402
from qvlquant.checkpoint.inspection import inspect_checkpoint, quantized_shapes  # noqa: E402
from qvlquant.checkpoint.qconfig import describe_spec, read_quantization_config  # noqa: E402
from qvlquant.checkpoint.vllm import TP_SIZES, copied_rules, vllm_compatibility_warnings  # noqa: E402
from qvlquant.engine.loop import LoopPlan, quantize_model  # noqa: E402
from qvlquant.families import family_for  # noqa: E402
from qvlquant.quant.formats import Fp8Format, Int8Format, Nvfp4Format, PackFormat  # noqa: E402
from qvlquant.quant.spec import QuantConfig, QuantSpec  # noqa: E402
from qvlquant.storage.shards import ShardReader, read_checkpoint_header  # noqa: E402

pytestmark = pytest.mark.slow

TYPES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
FORMATS = {  # format -> (how it is packed, the spec, vLLM's method, the method vLLM gives a quantized linear)
    "gptq": (PackFormat.GPTQ, QuantSpec(4, 64, True), "auto_gptq", "AutoGPTQLinearMethod"),
    "awq": (PackFormat.AWQ_GEMM, QuantSpec(4, 64, False), "auto_awq", "AutoAWQMarlinLinearMethod"),
    "compressed-tensors": (PackFormat.COMPRESSED, QuantSpec(4, 64, True), "compressed-tensors",
                           "CompressedTensorsLinearMethod(CompressedTensorsWNA16)"),
}
VISION_LINEARS = {"qwen2_vl": 10, "qwen2_5_vl": 10, "qwen3_vl": 18}  # vLLM's names (Qwen2.5-VL's gate/up fused)


def make_export(out, model_type, fmt, method="rtn", spec=None, rules=(), **options):
    from qvlquant.quant.rules import ModulePlan

    model = tiny_model(model_type)
    pack, default_spec, _, _ = FORMATS[fmt]
    qcfg = QuantConfig(method, spec or default_spec, **options)
    plan = LoopPlan(family=family_for(model_type).bind(model.config), qcfg=qcfg, pack_format=pack,
                    storage_dtype=torch.bfloat16,
                    modules=ModulePlan.resolve(rules, qcfg) if rules else None)
    result = quantize_model(model, [tiny_batch(model)], plan)
    export(model, None, result, out, {})
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    return {(t, f): make_export(root / f"{t}-{f}", t, f) for t in TYPES for f in FORMATS}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("model_type", TYPES)
def test_vllm_quantizes_the_language_model_and_nothing_of_the_vision_tower(exports, model_type, fmt):
    vllm = inspect_checkpoint(exports[model_type, fmt])["vllm"]
    _, _, method, linear_method = FORMATS[fmt]
    assert vllm["checked_by"].startswith("vLLM 0.33") and vllm["refused"] is None and vllm["method"] == method
    language = {v: m for v, m in vllm["layers"].items() if v.startswith("language_model.model.layers.")}
    vision = {v: m for v, m in vllm["layers"].items() if v.startswith("visual.")}
    assert len(language) == 3 * 4 and set(language.values()) == {linear_method}  # qkv, o, gate_up, down fused
    assert len(vision) == VISION_LINEARS[model_type] and set(vision.values()) == {"UnquantizedLinearMethod"}
    assert vllm["vision_quantized"] == []
    # TP 2 replicates the one KV head; the tiny models' 2 attention heads do not split over 4 or 8 ranks
    assert vllm["tp"][1] == [] and vllm["tp"][2] == []
    for tp in (4, 8):
        assert any("qkv_proj" in p and f"not divisible by {tp}" in p for p in vllm["tp"][tp])
    assert len(vllm["kernels"][1]) == 4 and all(k.endswith("Kernel") for k in vllm["kernels"][1].values())


def test_short_module_names_would_quantize_the_qwen2_5_vl_vision_mlp(exports, tmp_path):
    """The clash vLLM's own substring rule makes of GPTQ's short ``modules_in_block_to_quantize`` names: shown on a
    copy of the export with the old names, so the test above would catch their return."""
    import shutil

    old = tmp_path / "short-names"
    shutil.copytree(exports["qwen2_5_vl", "gptq"], old)
    config = json.loads((old / "config.json").read_text())
    config["quantization_config"]["modules_in_block_to_quantize"] = [list(g) for g in family_for("qwen2_5_vl").linear_groups]
    (old / "config.json").write_text(json.dumps(config))
    report = inspect_checkpoint(old)
    assert report["vllm"]["vision_quantized"] == ["visual.blocks.0.mlp.down_proj", "visual.blocks.0.mlp.gate_up_proj",
                                                  "visual.blocks.1.mlp.down_proj", "visual.blocks.1.mlp.gate_up_proj"]
    assert "vLLM would build 4 vision linears" in report["marlin"][1][0]


def test_true_act_order_is_refused_and_static_groups_accepted(tmp_path):
    """GPTQ act-order: without static groups vLLM 0.33 refuses the export (inspect says so, and the quantize-time
    check warns); with static groups the export is written as desc_act false and vLLM takes it."""
    refused = make_export(tmp_path / "desc-act", "qwen2_vl", "gptq", "gptq", desc_act=True)
    report = inspect_checkpoint(refused)
    assert "desc_act=True) is no longer supported" in report["vllm"]["refused"]
    assert all("refuses the config" in p[0] for p in report["marlin"].values())
    qc = json.loads((refused / "config.json").read_text())["quantization_config"]
    assert "no longer supported" in vllm_compatibility_warnings(qc, family_for("qwen2_vl"))[0]
    static = make_export(tmp_path / "static", "qwen2_vl", "gptq", "gptq", desc_act=True, static_groups=True)
    report = inspect_checkpoint(static)
    assert report["vllm"]["refused"] is None and report["quantization"]["desc_act"] is False
    assert report["marlin"][1] == []


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantize_time_check_agrees_with_vllm(fmt):
    pack, spec, _, _ = FORMATS[fmt]
    family = family_for("qwen2_5_vl")
    assert vllm_compatibility_warnings(quantization_config(QuantConfig("rtn", spec), pack, family, 3), family) == []
    if fmt == "gptq":  # asymmetric GPTQ: vLLM 0.33 has no kernel for it
        asym = quantization_config(QuantConfig("rtn", QuantSpec(4, 64, False)), pack, family, 3)
        assert "sym=False" in vllm_compatibility_warnings(asym, family)[0]


@pytest.mark.parametrize("model_type", TYPES)
def test_the_copied_rules_agree_with_vllm(exports, model_type):
    """The fallback used where vLLM is absent says what vLLM's code says on every export: vision tower, refusal,
    which TP sizes pass."""
    for fmt in FORMATS:
        folder = exports[model_type, fmt]
        config = json.loads((folder / "config.json").read_text())
        qc, family = config["quantization_config"], family_for(model_type)
        header = read_checkpoint_header(folder)
        vision = sorted(family.to_runtime(k[: -len(".weight")] + ".")[:-1] for k, (s, _) in header.items()
                        if k.endswith(".weight") and len(s) == 2 and family.to_runtime(k).startswith("model.visual."))
        quant = read_quantization_config(qc, str(folder / "config.json"))
        copied = copied_rules(quant, quantized_shapes(header, quant, family), vision, family, copy.deepcopy(config))
        asked = inspect_checkpoint(folder)["vllm"]
        assert copied["checked_by"].startswith("a COPY") and copied["vision_quantized"] == asked["vision_quantized"]
        assert copied["refused"] is None and asked["refused"] is None
        assert {tp: not p for tp, p in copied["tp"].items()} == {tp: not p for tp, p in asked["tp"].items()}


@pytest.mark.parametrize("model_type", TYPES)
def test_the_copied_rules_agree_with_vllm_on_fp8(fp8_exports, model_type):
    """The fallback's answers for the FP8 exports: no vision linear quantized (exact names for the block format),
    and the TP sizes vLLM accepts (the block format's input shards in whole blocks of 128)."""
    for fmt in FP8:
        folder = fp8_exports[model_type, fmt]
        config = json.loads((folder / "config.json").read_text())
        family = family_for(model_type)
        header = read_checkpoint_header(folder)
        quant = read_quantization_config(config["quantization_config"], str(folder / "config.json"))
        shapes = quantized_shapes(header, quant, family)
        assert len(shapes) == 3 * (4 if fmt is Fp8Format.BLOCK else 7)  # block: q/k/v kept (BLOCK_KEPT)
        vision = sorted(family.to_runtime(k[: -len(".weight")] + ".")[:-1] for k, (s, _) in header.items()
                        if k.endswith(".weight") and len(s) == 2 and family.to_runtime(k).startswith("model.visual."))
        copied = copied_rules(quant, shapes, vision, family, copy.deepcopy(config))
        asked = inspect_checkpoint(folder)["vllm"]
        assert copied["vision_quantized"] == asked["vision_quantized"] == []
        assert {tp: not p for tp, p in copied["tp"].items()} == {tp: not p for tp, p in asked["tp"].items()}


def test_vllm_allocates_the_shapes_the_checkpoint_holds(exports, tmp_path):
    """At TP 1 the packed tensors of the unfused linears have the shapes vLLM's create_weights allocates to load them
    into (none reported above); a checkpoint packed another way is reported, naming the tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "repacked"
    shutil.copytree(exports["qwen2_vl", "gptq"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.qweight"
    tensors[key] = tensors[key].t().contiguous()  # [N, K/8] instead of GPTQ's [K/8, N]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    problems = inspect_checkpoint(bad)["vllm"]["tp"][1]
    assert problems == [f"{key}: vLLM allocates (32, 128), the checkpoint holds (128, 32)"]


@pytest.mark.parametrize("fmt,bits,accepted", [("gptq", 3, False), ("gptq", 8, True), ("compressed-tensors", 3, True),
                                               ("compressed-tensors", 8, True)])
def test_which_widths_vllm_loads(tmp_path, fmt, bits, accepted):
    """vLLM 0.33 runs GPTQ at 4/8 bits only; compressed-tensors WNA16 at 3 bits too, with the bit-stream packing
    qvlquant writes (its allocated shapes match the checkpoint's)."""
    vllm = inspect_checkpoint(make_export(tmp_path / "q", "qwen2_vl", fmt, spec=QuantSpec(bits, 64, True)))["vllm"]
    assert (vllm["refused"] is None) is accepted and (vllm["tp"][1] == []) is accepted
    if not accepted:
        assert f"bits={bits}, sym=True" in vllm["refused"]


REAL = {  # the released Qwen2-VL text models (2 of their decoder layers; TP decisions are per layer)
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
    "72B": dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8),
    "72B-padded": dict(hidden_size=8192, intermediate_size=29696, num_attention_heads=64, num_key_value_heads=8),
}
REFUSED_AT = {"7B": {8}, "72B": {2, 4, 8}, "72B-padded": set()}  # 28 heads / 8; 29568 / 2 splits a group of 128


@pytest.mark.parametrize("size", list(REAL))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_tensor_parallel_at_the_real_sizes(tmp_path, size, fmt):
    """vLLM's own layer classes at the released shapes (a config.json only: vLLM allocates on the meta device):
    which TP sizes it accepts, and that the copied rules (the fallback) say the same."""
    import transformers

    from qvlquant.checkpoint.vllm import (
        checkpoint_linears,
        marlin_problems,
        pretend_gpu,
        vllm_model_classes,
        vllm_names,
        vllm_quant_config,
        vllm_tensor_parallel,
    )

    pack, spec, _, _ = FORMATS[fmt]
    family = family_for("qwen2_vl")
    text = dict(REAL[size], num_hidden_layers=2, vocab_size=1000, bos_token_id=0, eos_token_id=1)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=64, num_heads=2,
                                                                             hidden_size=text["hidden_size"]))
    spec = QuantSpec(4, 128, spec.sym)  # the released checkpoints' group size
    config.quantization_config = quantization_config(QuantConfig("rtn", spec), pack, family, 2)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    with pretend_gpu(1):
        _, quant = vllm_quant_config(tmp_path, "qwen2_vl")
        outer, _ = vllm_model_classes("qwen2_vl")
    linears = checkpoint_linears(tmp_path)
    problems, kernels = vllm_tensor_parallel(quant, vllm_names(linears, family, outer, quant), linears, family, saved, {})
    assert {tp for tp, p in problems.items() if p} == REFUSED_AT[size]
    assert len(kernels[1]) == 4
    layer0 = {n: s for n, s in linears.items() if n.startswith(family.decoder_layers + ".0.")}
    heads = (text["num_attention_heads"], text["num_key_value_heads"])
    quant = read_quantization_config(saved["quantization_config"], str(tmp_path / "config.json"))
    assert {tp for tp in TP_SIZES if marlin_problems(quant, layer0, tp, family, heads)} == REFUSED_AT[size]


# --- mixed precision: per-module rules as vLLM reads them ------------------------------------------------------------
QKV1 = r".*\.layers\.(?:1)\.self_attn\.(?:{})$"
W8 = QuantSpec(8, 64, True)


def repack(folder, modules: dict, fmt):
    """Rewrite each disk module of ``modules`` in the export ``folder``: to its QuantSpec (re-quantized from the
    4-bit weight), or, for None, to a plain bf16 weight."""
    from safetensors.torch import load_file, save_file

    from qvlquant.quant.formats import QuantizedWeight
    from qvlquant.quant.rtn import default_g_idx, rtn_quantize

    pack, spec, _, _ = FORMATS[fmt]
    tensors = load_file(str(folder / "model.safetensors"))
    for module, new in modules.items():
        names = [n for n in pack.tensor_shapes(64, 64, QuantSpec(4, 64, False)) if f"{module}.{n}" in tensors]
        old = {n: tensors.pop(f"{module}.{n}") for n in names}
        k = {PackFormat.GPTQ: lambda: old["qweight"].shape[0] * 8, PackFormat.AWQ_GEMM: lambda: old["qweight"].shape[0],
             PackFormat.COMPRESSED: lambda: int(old["weight_shape"][1])}[pack]()
        w = pack.unpack(old, spec, k).dequantize()  # [N, K]
        if new is None:
            tensors[f"{module}.weight"] = w.to(torch.bfloat16)
            continue
        q, scale, zero = rtn_quantize(w, new)
        packed = pack.pack(QuantizedWeight(q, scale, zero, default_g_idx(k, new), new))
        tensors.update({f"{module}.{n}": t for n, t in packed.items()})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def mixed(root, model_type, fmt, skip=("mlp.down_proj",), eight=("q_proj", "k_proj", "v_proj"), fused_names=True):
    """An export of the tiny model whose layer 0 ``skip`` linears are plain weights and layer 1 ``eight`` are 8-bit,
    with the config in the format's own terms (the shapes the other engineer's writer writes)."""
    folder = make_export(root / f"{model_type}-{fmt}", model_type, fmt)
    family = family_for(model_type)
    disk = lambda i, leaf: family.to_disk(f"{family.decoder_layers}.{i}.{leaf}.")[:-1]  # noqa: E731
    repack(folder, {**{disk(0, s): None for s in skip}, **{disk(1, f"self_attn.{e}"): W8 for e in eight}}, fmt)
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    section, leaves = skip[0].split(".")[0], [s.split(".")[-1] for s in skip]  # skip: linears of one section
    fused = {"q_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
    skip_rule = rf".*\.layers\.(?:0)\.{section}\.(?:{'|'.join(leaves)})$"
    if fmt == "gptq":
        gptq_leaves = leaves + sorted({fused[e] for e in leaves if e in fused} if fused_names else set())
        qc["dynamic"] = {"-:" + skip_rule.replace("|".join(leaves), "|".join(gptq_leaves)): {},
                         "+:" + QKV1.format("|".join(eight) + ("|qkv_proj" if fused_names else "")):
                             {"bits": 8, "group_size": 64, "sym": True, "desc_act": False}}
        qc["modules_in_block_to_quantize"] = [[n for n in g if not any(n == f"layers.0.{s}" for s in skip)]
                                              for g in qc["modules_in_block_to_quantize"]]
    else:
        weights = {**qc["config_groups"]["group_0"]["weights"], "num_bits": 8}
        qc["config_groups"]["group_1"] = {"targets": ["re:" + QKV1.format("|".join(eight))], "weights": weights,
                                          "format": "pack-quantized"}
        qc["ignore"] = qc["ignore"] + ["re:" + skip_rule]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "qvlquant_manifest.json").unlink()
    return folder


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("model_type", TYPES)
def test_vllm_gives_each_linear_of_a_mixed_export_its_setting(tmp_path, model_type, fmt):
    """GPTQ dynamic (vLLM: ``gptq_utils.get_linear_quant_method`` -> ``get_dynamic_override`` on its fused prefix)
    and compressed-tensors groups + ignore (``get_scheme_dict``: ``should_ignore_layer``, ``find_matched_target``;
    ``re:`` entries untouched by ``apply_vllm_mapper``): the 8-bit override reaches layer 1's fused qkv_proj, the
    skipped down_proj is UnquantizedLinearMethod, everything else keeps the base; no problem at TP 1; the copied
    rules and inspect's counts say the same."""
    report = inspect_checkpoint(mixed(tmp_path, model_type, fmt))
    vllm, prefix = report["vllm"], "language_model.model.layers."
    assert vllm["refused"] is None and vllm["tp"][1] == [], vllm["tp"][1]
    assert vllm["layers"][prefix + "0.mlp.down_proj"] == "UnquantizedLinearMethod"
    assert vllm["settings"][prefix + "1.self_attn.qkv_proj"] == "W8 g64 sym"
    others = {v: s for v, s in vllm["settings"].items() if v.startswith(prefix)
              and v not in (prefix + "0.mlp.down_proj", prefix + "1.self_attn.qkv_proj")}
    assert len(others) == 10 and set(others.values()) == {"W4 g64 sym"}
    assert report["module_settings"] == {"W4 g64 sym": 17, "W8 g64 sym": 3, "not quantized": 1}
    assert "mixed" in report["quantization"]
    copied = copied_rules(*copied_inputs(report["folder"], model_type))
    assert copied["refused"] is None and copied["tp"][1] == []


def copied_inputs(folder, model_type):
    import pathlib

    folder = pathlib.Path(folder)
    config = json.loads((folder / "config.json").read_text())
    family, header = family_for(model_type).bind(config), read_checkpoint_header(folder)
    quant = read_quantization_config(config["quantization_config"], str(folder / "config.json"))
    return quant, quantized_shapes(header, quant, family), [], family, config


@pytest.mark.parametrize("fmt,refusal", [("gptq", "Detected some but not all shards of language_model.model.layers.0."
                                                  "self_attn.qkv_proj are quantized"),
                                         ("compressed-tensors", "Found different quantization schemes for the shards "
                                                                "of language_model.model.layers.0.self_attn.qkv_proj")])
@pytest.mark.parametrize("model_type", TYPES)
def test_vllm_refuses_a_partly_skipped_fused_group(tmp_path, model_type, fmt, refusal):
    """GPTQ: ``is_layer_gptq_quantized`` (modules_in_block_to_quantize omits the skipped shard); compressed-tensors:
    ``should_ignore_layer``. The copied rules refuse it too."""
    report = inspect_checkpoint(mixed(tmp_path, model_type, fmt, skip=("self_attn.q_proj",)))
    assert refusal in report["vllm"]["refused"]
    copied = copied_rules(*copied_inputs(report["folder"], model_type))
    assert any("vLLM fuses self_attn.q_proj, self_attn.k_proj, self_attn.v_proj" in p for p in copied["tp"][1])


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_a_partly_overridden_fused_group_is_flagged_where_vllm_says_nothing(tmp_path, fmt):
    """8 bits for q_proj alone: vLLM builds layer 1's qkv_proj at the base 4 bits without a word (GPTQ: the fused
    prefix matches no rule; compressed-tensors: ``_match_fused_layer`` wants every shard, so the class target wins):
    qvlquant's check of vLLM's decision names it, and the copied rules refuse it."""
    report = inspect_checkpoint(mixed(tmp_path, "qwen2_vl", fmt, eight=("q_proj",), fused_names=False))
    assert report["vllm"]["refused"] is None
    assert report["vllm"]["settings"]["language_model.model.layers.1.self_attn.qkv_proj"] == "W4 g64 sym"
    assert any("qkv_proj: vLLM builds it W4 g64 sym, the checkpoint holds model.language_model.layers.1.self_attn."
               "q_proj W8 g64 sym" in p for p in report["marlin"][1])
    copied = copied_rules(*copied_inputs(report["folder"], "qwen2_vl"))
    assert any("vLLM fuses self_attn.q_proj" in p for p in copied["tp"][1])


AWQ_FORMS = {"short": "layers.0.mlp.down_proj", "disk": "{disk}", "runtime": "model.language_model.layers.0.mlp.down_proj"}


@pytest.mark.parametrize("form", list(AWQ_FORMS))
@pytest.mark.parametrize("model_type", TYPES)
def test_vllm_and_transformers_skip_an_awq_linear_named_in_modules_to_not_convert(tmp_path, model_type, form):
    """vLLM: ``is_layer_skipped(..., match_mode="substring")`` after ``apply_vllm_mapper`` maps the list (a
    checkpoint-key "model.layers..." becomes "language_model.model.layers..."); transformers: anchored or suffix
    (``spec_for``). Each form below is read as skipped by both."""
    family = family_for(model_type)
    folder = make_export(tmp_path / "awq", model_type, "awq")
    repack(folder, {family.to_disk(f"{family.decoder_layers}.0.mlp.down_proj.")[:-1]: None}, "awq")
    config = json.loads((folder / "config.json").read_text())
    entry = AWQ_FORMS[form].format(disk=family.to_disk(f"{family.decoder_layers}.0.mlp.down_proj.")[:-1])
    config["quantization_config"]["modules_to_not_convert"].append(entry)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "qvlquant_manifest.json").unlink()
    report = inspect_checkpoint(folder)
    assert report["vllm"]["layers"]["language_model.model.layers.0.mlp.down_proj"] == "UnquantizedLinearMethod"
    assert report["vllm"]["refused"] is None and report["marlin"][1] == []
    assert report["module_settings"] == {"W4 g64 asym": 20, "not quantized": 1}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("model_type", TYPES)
def test_vllm_reads_qvlquants_own_mixed_exports(tmp_path, model_type, fmt):
    """The export writer's rules (GPTQ dynamic, compressed-tensors groups + ignore, AWQ modules_to_not_convert),
    asked of vLLM's own classes: layer 0's MLP skipped (UnquantizedLinearMethod for gate_up_proj and down_proj),
    layer 1's attention at 8 bits (not for AWQ GEMM, which holds one width), the rest at the base setting, nothing
    of the vision tower quantized, no problem at TP 1."""
    from qvlquant.quant.rules import parse_rule

    rules = [parse_rule(r"layers\.0\.mlp:skip")]
    if fmt != "awq":
        rules.append(parse_rule(r"layers\.1\.self_attn:bits=8"))
    method = "awq" if fmt == "awq" else "rtn"
    report = inspect_checkpoint(make_export(tmp_path / "q", model_type, fmt, method=method, rules=rules))
    vllm, prefix = report["vllm"], "language_model.model.layers."
    assert vllm["refused"] is None and vllm["tp"][1] == [], vllm["tp"][1]
    assert vllm["vision_quantized"] == []
    skipped = {prefix + "0.mlp.gate_up_proj", prefix + "0.mlp.down_proj"}
    assert {v for v, m in vllm["layers"].items() if v.startswith(prefix) and m == "UnquantizedLinearMethod"} == skipped
    settings = {v: s for v, s in vllm["settings"].items() if v.startswith(prefix) and v not in skipped}
    eight = {prefix + "1.self_attn.qkv_proj", prefix + "1.self_attn.o_proj"} if fmt != "awq" else set()
    assert {v for v, s in settings.items() if s.startswith("W8")} == eight
    assert {s.split()[0] for v, s in settings.items() if v not in eight} == {"W4"}


# --- FP8, data-free: Qwen's block format and compressed-tensors FP8_DYNAMIC --------------------------------------
FP8 = {  # format -> (vLLM's method, what it gives a decoder linear, the kernel at TP 1 on an sm_90)
    # sm_90 with humming installed (the vLLM venv); TritonFp8BlockScaledMMKernel was what vLLM answered while the
    # faked GPU still said no to has_device_capability
    Fp8Format.BLOCK: ("fp8", "Fp8LinearMethod", "HummingFP8ScaledMMLinearKernel"),
    Fp8Format.CHANNEL: ("compressed-tensors", "CompressedTensorsLinearMethod(CompressedTensorsW8A8Fp8)",
                        "CutlassFP8ScaledMMLinearKernel"),
}


# the tiny models' k_proj / v_proj have 64 rows (one KV head of 64): not whole blocks of 128, so vLLM cannot load
# block scales for their fused qkv_proj and the block export keeps it (``datafree.block_refused``; the released
# models' K/V heads are 128 wide, quantized)
BLOCK_KEPT = "self_attn.qkv_proj"


def make_fp8_export(root, model_type, fmt, not_converted=None):
    """The tiny model saved in bf16, then exported data-free from its checkpoint as ``quantize --scheme`` does."""
    model = tiny_model(model_type).to(torch.bfloat16)
    model.save_pretrained(root / f"{model_type}-base")
    family = family_for(model_type)
    base = CheckpointTensors(ShardReader(root / f"{model_type}-base"), family, torch.bfloat16)
    return export_fp8(model, None, base, fmt, root / f"{model_type}-{fmt.value}", lambda quantized: {})


@pytest.fixture(scope="module")
def fp8_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-fp8")
    return {(t, f): make_fp8_export(root, t, f) for t in TYPES for f in FP8}


@pytest.mark.parametrize("fmt", list(FP8))  # data-free; the calibrated FP8 below
@pytest.mark.parametrize("model_type", TYPES)
def test_vllm_serves_fp8_exports_with_the_vision_tower_unquantized(fp8_exports, model_type, fmt):
    vllm = inspect_checkpoint(fp8_exports[model_type, fmt])["vllm"]
    method, linear_method, kernel = FP8[fmt]
    assert vllm["checked_by"].startswith("vLLM 0.33") and vllm["refused"] is None and vllm["method"] == method
    language = {v: m for v, m in vllm["layers"].items() if v.startswith("language_model.model.layers.")}
    vision = {v: m for v, m in vllm["layers"].items() if v.startswith("visual.")}
    kept = {v for v in language if fmt is Fp8Format.BLOCK and v.endswith(BLOCK_KEPT)}
    assert len(language) == 3 * 4 and len(kept) == (3 if fmt is Fp8Format.BLOCK else 0)
    assert {language[v] for v in kept} <= {"UnquantizedLinearMethod"}
    assert {m for v, m in language.items() if v not in kept} == {linear_method}
    assert len(vision) == VISION_LINEARS[model_type] and set(vision.values()) == {"UnquantizedLinearMethod"}
    assert vllm["vision_quantized"] == [] and vllm["tp"][1] == []
    assert {k for v, k in vllm["kernels"][1].items() if v not in kept} == {kernel}
    if fmt is Fp8Format.BLOCK:  # o_proj's input (128 columns) splits into 64 at TP 2: not a whole block of 128
        assert vllm["tp"][2] == ["language_model.model.layers.0.self_attn.o_proj: ValueError: Weight "
                                 "input_size_per_partition = 64 is not divisible by weight quantization block_k = 128."]
    else:
        assert vllm["tp"][2] == []


def test_block_fp8_of_qwen3_5_keeps_the_fused_layers_vllm_cannot_load_blockwise(tmp_path, monkeypatch):
    """Qwen3.5's in_proj_b / in_proj_a (one row per value head: 32 in the tiny model, 48 to 64 in the released ones)
    are fused by vLLM as in_proj_ba; block-FP8 scales of parts that are not whole blocks of 128 rows are offset past
    the end of the fused scale by vLLM 0.33's own loader. The block export keeps such a layer in bf16 (as Qwen's FP8
    checkpoints keep in_proj_a/b): vLLM builds it unquantized and loads everything at TP 1. Without the rule, inspect
    names the failure vLLM's loader raises."""
    import qvlquant
    from tiny_models import qwen3_5_checkpoint

    from qvlquant.checkpoint import datafree

    qwen3_5_checkpoint(tmp_path / "base")
    qvlquant.quantize(model=str(tmp_path / "base"), output=str(tmp_path / "fp8"), scheme="FP8_BLOCK")
    vllm = inspect_checkpoint(tmp_path / "fp8")["vllm"]
    assert vllm["refused"] is None and vllm["tp"][1] == []
    layers = {v.removeprefix("language_model.model."): m for v, m in vllm["layers"].items() if ".layers." in v}
    assert layers["layers.0.linear_attn.in_proj_ba"] == "UnquantizedLinearMethod"
    assert layers["layers.0.linear_attn.in_proj_qkvz"] == layers["layers.0.mlp.gate_up_proj"] == "Fp8LinearMethod"
    # vLLM's MTP drafter (Qwen3_5MTP: the quantization config, no name mapper) keeps the bf16 MTP matrices
    from vllm.model_executor.models.qwen3_5_mtp import Qwen3_5MTP

    from qvlquant.checkpoint.vllm import pretend_gpu, vllm_decisions, vllm_quant_config

    mtp = {n: [n] for n in ("mtp.fc", "mtp.layers.0.mlp.down_proj")}  # the tiny base's (tiny_models.MTP_KEYS)
    with pretend_gpu(1):
        _, quant = vllm_quant_config(tmp_path / "fp8", "qwen3_5", classes=(Qwen3_5MTP,))
        drafter, _ = vllm_decisions(quant, mtp, {n: (256, 128) for n in mtp})
    assert drafter == dict.fromkeys(mtp, "UnquantizedLinearMethod")
    monkeypatch.setattr(datafree, "block_refused", lambda *a: False)
    qvlquant.quantize(model=str(tmp_path / "base"), output=str(tmp_path / "unkept"), scheme="FP8_BLOCK")
    problems = inspect_checkpoint(tmp_path / "unkept")["vllm"]["tp"][1]
    assert "model.language_model.layers.0.linear_attn.in_proj_a.weight_scale_inv: vLLM's loader failed: " \
           "RuntimeError: start (1) + length (1) exceeds dimension size (1)." in problems


def test_vllm_matches_fp8_modules_to_not_convert_by_exact_name_only(fp8_exports, tmp_path):
    """Why the block export names every vision linear: with only the family's prefixes (``visual``, ``model.visual``)
    vLLM's Fp8Config would build the vision tower's linears as FP8 over bf16 weights."""
    folder = fp8_exports["qwen2_vl", Fp8Format.BLOCK]
    edited = tmp_path / "prefixes-only"
    shutil.copytree(folder, edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = family_for("qwen2_vl").not_converted_names()
    (edited / "config.json").write_text(json.dumps(config))
    quantized = inspect_checkpoint(edited)["vllm"]["vision_quantized"]
    assert len(quantized) == VISION_LINEARS["qwen2_vl"] and all(n.startswith("visual.") for n in quantized)


# --- INT8 W8A8, data-free: compressed-tensors int-quantized (llm-compressor's W8A8) ----------------------------------
W8A8 = ("compressed-tensors", "CompressedTensorsLinearMethod(CompressedTensorsW8A8Int8)",
        "CutlassInt8ScaledMMLinearKernel")  # vLLM's method, what it gives a decoder linear, the kernel on an sm_90


@pytest.fixture(scope="module")
def w8a8_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-w8a8")
    return {t: make_fp8_export(root, t, Int8Format.CHANNEL) for t in TYPES}


@pytest.mark.parametrize("model_type", TYPES)
def test_vllm_serves_w8a8_exports_with_the_vision_tower_unquantized(w8a8_exports, model_type):
    """vLLM picks its int8 W8A8 scheme (dynamic per-token activations, per-channel weights) for every decoder
    linear, allocates the shapes the export holds (int8 weight [N, K], scale [N, 1]) and leaves the vision tower
    unquantized; the copied rules agree."""
    folder = w8a8_exports[model_type]
    vllm = inspect_checkpoint(folder)["vllm"]
    method, linear_method, kernel = W8A8
    assert vllm["checked_by"].startswith("vLLM 0.33") and vllm["refused"] is None and vllm["method"] == method
    language = {v: m for v, m in vllm["layers"].items() if v.startswith("language_model.model.layers.")}
    vision = {v: m for v, m in vllm["layers"].items() if v.startswith("visual.")}
    assert len(language) == 3 * 4 and set(language.values()) == {linear_method}
    assert len(vision) == VISION_LINEARS[model_type] and set(vision.values()) == {"UnquantizedLinearMethod"}
    assert vllm["vision_quantized"] == [] and vllm["tp"][1] == [] and vllm["tp"][2] == []
    assert set(vllm["kernels"][1].values()) == {kernel}
    config = json.loads((folder / "config.json").read_text())
    family = family_for(model_type)
    header = read_checkpoint_header(folder)
    quant = read_quantization_config(config["quantization_config"], str(folder / "config.json"))
    shapes = quantized_shapes(header, quant, family)
    assert len(shapes) == 3 * 7
    vision_names = sorted(family.to_runtime(k[: -len(".weight")] + ".")[:-1] for k, (s, _) in header.items()
                          if k.endswith(".weight") and len(s) == 2 and family.to_runtime(k).startswith("model.visual."))
    copied = copied_rules(quant, shapes, vision_names, family, copy.deepcopy(config))
    assert copied["vision_quantized"] == [] and copied["refused"] is None
    assert {tp: not p for tp, p in copied["tp"].items()} == {tp: not p for tp, p in vllm["tp"].items()}


def test_vllm_serves_the_calibrated_w8a8_export_as_the_data_free_one(tmp_path):
    """SmoothQuant auto + GPTQ on the demo (its smoothed norms, GPTQ's int8 codes, the same layout and config but
    for meta): vLLM gives every decoder linear the same int8 W8A8 scheme and kernel, the vision tower none."""
    from qvlquant.api import quantize

    folder = tmp_path / "w8a8-gptq"
    quantize(output=str(folder), scheme="W8A8", method="gptq", smoothing_strength="auto", num_samples=4)
    vllm = inspect_checkpoint(folder)["vllm"]
    method, linear_method, kernel = W8A8
    assert vllm["checked_by"].startswith("vLLM 0.33") and vllm["refused"] is None and vllm["method"] == method
    language = {v: m for v, m in vllm["layers"].items() if v.startswith("language_model.model.layers.")}
    vision = {v: m for v, m in vllm["layers"].items() if v.startswith("visual.")}
    assert len(language) == 4 * 4 and set(language.values()) == {linear_method}  # the demo: 4 layers, fused
    assert len(vision) == VISION_LINEARS["qwen2_vl"] and set(vision.values()) == {"UnquantizedLinearMethod"}
    assert vllm["vision_quantized"] == [] and vllm["tp"][1] == [] and vllm["tp"][2] == []
    assert set(vllm["kernels"][1].values()) == {kernel}


def test_vllm_refuses_nothing_it_is_told_about_w8a8_at_quantize_time(w8a8_exports):
    config = json.loads((w8a8_exports["qwen2_vl"] / "config.json").read_text())
    assert vllm_compatibility_warnings(config["quantization_config"], family_for("qwen2_vl")) == []


# --- NVFP4A16, data-free: compressed-tensors nvfp4-pack-quantized, weight-only ------------------------------------
NVFP4_METHOD = "CompressedTensorsLinearMethod(CompressedTensorsW4A4Fp4)"  # vLLM 0.33: W4A4Fp4(use_a16=True)


@pytest.fixture(scope="module")
def nvfp4_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-nvfp4")
    out = {}
    for t in TYPES:
        model = tiny_model(t).to(torch.bfloat16)
        model.save_pretrained(root / f"{t}-base")
        base = CheckpointTensors(ShardReader(root / f"{t}-base"), family_for(t), torch.bfloat16)
        out[t] = export_nvfp4(model, None, base, Nvfp4Format.PACKED, root / f"{t}-nvfp4", lambda quantized: {})
    return out


@pytest.mark.parametrize("model_type", TYPES)
def test_vllm_serves_nvfp4a16_exports_with_the_vision_tower_unquantized(nvfp4_exports, model_type):
    """vLLM's compressed-tensors config picks its NVFP4 scheme in weight-only mode for every decoder linear (and
    allocates the tensors' shapes: uint8 [N, K/2], e4m3 [N, K/16], a float32 global scale); the vision tower
    unquantized; TP 1 and 2 accepted."""
    vllm = inspect_checkpoint(nvfp4_exports[model_type])["vllm"]
    assert vllm["checked_by"].startswith("vLLM 0.33") and vllm["refused"] is None
    assert vllm["method"] == "compressed-tensors"
    language = {v: m for v, m in vllm["layers"].items() if v.startswith("language_model.model.layers.")}
    vision = {v: m for v, m in vllm["layers"].items() if v.startswith("visual.")}
    assert len(language) == 3 * 4 and set(language.values()) == {NVFP4_METHOD}
    assert len(vision) == VISION_LINEARS[model_type] and set(vision.values()) == {"UnquantizedLinearMethod"}
    assert vllm["vision_quantized"] == [] and vllm["tp"][1] == [] and vllm["tp"][2] == []
    assert set(vllm["kernels"][1].values()) == {"HummingNvFp4LinearKernel"}  # sm_90 with humming installed


# vLLM 0.33's weight-only NVFP4 kernel by compute capability (init_nvfp4_linear_kernel(use_a16=True), auto backend,
# as installed in the vLLM venv: humming present, no GPU)
NVFP4_KERNELS = {(7, 5): "MarlinNvFp4LinearKernel", (8, 0): "MarlinNvFp4LinearKernel",
                 (8, 9): "MarlinNvFp4LinearKernel", (9, 0): "HummingNvFp4LinearKernel",
                 (10, 0): "FlashInferCuteDslNvFp4W4A16LinearKernel", (12, 0): "MarlinNvFp4LinearKernel"}


@pytest.mark.parametrize("capability", list(NVFP4_KERNELS))
def test_which_kernel_vllm_runs_nvfp4a16_with(nvfp4_exports, capability):
    """What the docs and the card say about hardware: Marlin's FP4 kernel from Turing on, Humming on Hopper,
    FlashInfer's CuTe-DSL W4A16 on sm_100; the scheme is the same weight-only one everywhere."""
    from qvlquant.checkpoint.vllm import pretend_gpu, vllm_quant_config

    with pretend_gpu(1, capability):
        _, quant = vllm_quant_config(nvfp4_exports["qwen2_vl"], "qwen2_vl")
        scheme = quant.get_scheme(torch.nn.Linear(64, 64), "language_model.model.layers.0.mlp.down_proj")
    assert type(scheme).__name__ == "CompressedTensorsW4A4Fp4" and scheme.use_a16 is True
    assert type(scheme.kernel).__name__ == NVFP4_KERNELS[capability]


@pytest.mark.parametrize("model_type", TYPES)
def test_the_copied_rules_agree_with_vllm_on_nvfp4(nvfp4_exports, model_type):
    folder = nvfp4_exports[model_type]
    config = json.loads((folder / "config.json").read_text())
    family, header = family_for(model_type), read_checkpoint_header(folder)
    quant = read_quantization_config(config["quantization_config"], str(folder / "config.json"))
    shapes = quantized_shapes(header, quant, family)
    assert len(shapes) == 3 * 7
    vision = sorted(family.to_runtime(k[: -len(".weight")] + ".")[:-1] for k, (s, _) in header.items()
                    if k.endswith(".weight") and len(s) == 2 and family.to_runtime(k).startswith("model.visual."))
    copied = copied_rules(quant, shapes, vision, family, copy.deepcopy(config))
    asked = inspect_checkpoint(folder)["vllm"]
    assert copied["vision_quantized"] == asked["vision_quantized"] == []
    assert {tp: not p for tp, p in copied["tp"].items()} == {tp: not p for tp, p in asked["tp"].items()}


# --- Qwen3.5 (dense): Gated DeltaNet and gated full-attention layers --------------------------------------------------
QWEN3_5_FUSED = {  # vLLM's name in layer 0 (DeltaNet) / 3 (full attention) -> the linears it fuses
    "layers.0.linear_attn.in_proj_qkvz": 2, "layers.0.linear_attn.in_proj_ba": 2, "layers.0.linear_attn.out_proj": 1,
    "layers.0.mlp.gate_up_proj": 2, "layers.0.mlp.down_proj": 1, "layers.3.self_attn.qkv_proj": 3,
    "layers.3.self_attn.o_proj": 1, "layers.3.mlp.gate_up_proj": 2, "layers.3.mlp.down_proj": 1,
}


@pytest.fixture(scope="module")
def qwen3_5_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-qwen3_5")
    return {f: make_export(root / f, "qwen3_5", f) for f in ("gptq", "compressed-tensors")}


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_vllm_quantizes_every_qwen3_5_layer_type_and_nothing_of_the_vision_tower(qwen3_5_exports, fmt):
    """vLLM's Qwen3_5ForConditionalGeneration view: the DeltaNet's fused in_proj_qkvz / in_proj_ba, its out_proj,
    the gated attention's qkv_proj / o_proj and the MLPs all W4 g64 in every layer; the vision tower (and the
    DeltaNet's conv1d, which vLLM builds without a quantization config) unquantized; TP 1 and 2 accepted."""
    report = inspect_checkpoint(qwen3_5_exports[fmt])["vllm"]
    assert report["checked_by"].startswith("vLLM") and report["refused"] is None
    method = FORMATS[fmt][3]
    decoder = {v: m for v, m in report["layers"].items() if ".layers." in v and not v.startswith("visual")}
    assert len(decoder) == 3 * 5 + 4 and set(decoder.values()) == {method}
    for name in QWEN3_5_FUSED:
        assert report["layers"][f"language_model.model.{name}"] == method and \
            report["settings"][f"language_model.model.{name}"] == "W4 g64 sym"
    vision = {v: m for v, m in report["layers"].items() if v.startswith("visual.")}
    assert len(vision) == 10 and set(vision.values()) == {"UnquantizedLinearMethod"} and not report["vision_quantized"]
    assert report["tp"][1] == [] and report["tp"][2] == []


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_vllm_keeps_the_qwen3_5_mtp_head_unquantized(qwen3_5_exports, fmt):
    """vLLM builds the MTP head (speculative decoding) from the export with its quantization config: the carried
    ``mtp.*`` tensors are bf16, so its linears must be unquantized, though ``layers.0.mlp.gate_proj`` (GPTQ's
    list) is a substring of ``mtp.layers.0.mlp.gate_proj``."""
    from qvlquant.checkpoint.vllm import pretend_gpu, vllm_decisions, vllm_quant_config

    names = {n: [n] for n in ("mtp.fc", "mtp.layers.0.mlp.gate_up_proj", "mtp.layers.0.self_attn.qkv_proj",
                              "mtp.layers.0.mlp.down_proj")}
    with pretend_gpu(1):
        _, quant = vllm_quant_config(qwen3_5_exports[fmt], "qwen3_5")
        layers, _ = vllm_decisions(quant, names, {n: (256, 256) for n in names})
        main, _ = vllm_decisions(quant, {"language_model.model.layers.0.mlp.gate_up_proj": ["x"]}, {"x": (128, 512)})
    assert set(layers.values()) == {"UnquantizedLinearMethod"}
    assert set(main.values()) == {FORMATS[fmt][3]}


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_a_rule_keeps_qwen3_5_linear_attention_in_16_bit_for_vllm_too(tmp_path, fmt):
    """``--ignore linear_attn`` (what the published checkpoints do): the DeltaNet's linears stay bf16 in the export
    and vLLM builds them unquantized; the full-attention layer and the MLPs stay W4."""
    from qvlquant.quant.rules import parse_rule

    folder = make_export(tmp_path / fmt, "qwen3_5", fmt, rules=(parse_rule("linear_attn:skip"),))
    report = inspect_checkpoint(folder)["vllm"]
    layers = {v.removeprefix("language_model.model."): m for v, m in report["layers"].items()}
    assert all(layers[f"layers.{i}.linear_attn.{n}"] == "UnquantizedLinearMethod"
               for i in (0, 1, 2) for n in ("in_proj_qkvz", "in_proj_ba", "out_proj"))
    assert {layers[f"layers.{i}.mlp.down_proj"] for i in range(4)} | {layers["layers.3.self_attn.qkv_proj"]} == \
        {FORMATS[fmt][3]}
    header = read_checkpoint_header(folder)
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in header
    assert report["tp"][1] == []


# --- The calibrated schemes: FP8 (static per-tensor input scales) and NVFP4 (W4A4) -----------------------------------
CALIBRATED = {  # scheme -> (vLLM's method for a decoder linear, the kernel at TP 1 on an sm_90)
    "FP8": ("CompressedTensorsLinearMethod(CompressedTensorsW8A8Fp8)", "CutlassFP8ScaledMMLinearKernel"),
    # sm_90 has no FP4 matmul: vLLM serves W4A4 weight-only there (Humming, installed in the vLLM venv)
    "NVFP4": ("CompressedTensorsLinearMethod(CompressedTensorsW4A4Fp4)", "HummingNvFp4LinearKernel"),
}


def make_calibrated_export(root, model_type, scheme):
    """The tiny model's activation ranges over a tiny batch (the calibration pass, in memory), then its bf16
    checkpoint exported with them as ``quantize --scheme`` does."""
    from qvlquant.checkpoint.datafree import quantized_linears
    from qvlquant.engine.calibration import input_ranges
    from qvlquant.quant.formats import CALIBRATED_SCHEMES

    model = tiny_model(model_type)
    family = family_for(model_type).bind(model.config)
    ranges = input_ranges(model, [tiny_batch(model)], family, quantized_linears(model, family))
    model = model.to(torch.bfloat16)
    model.save_pretrained(root / f"{model_type}-{scheme}-base")
    base = CheckpointTensors(ShardReader(root / f"{model_type}-{scheme}-base"), family, torch.bfloat16)
    fmt = CALIBRATED_SCHEMES[scheme]
    write = export_nvfp4 if isinstance(fmt, Nvfp4Format) else export_fp8
    return write(model, None, base, fmt, root / f"{model_type}-{scheme}", lambda quantized: {}, inputs=ranges.amax)


@pytest.fixture(scope="module")
def calibrated_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-calibrated")
    return {(t, s): make_calibrated_export(root, t, s) for t in TYPES for s in CALIBRATED}


@pytest.mark.parametrize("scheme", list(CALIBRATED))
@pytest.mark.parametrize("model_type", TYPES)
def test_vllm_serves_calibrated_exports_with_the_vision_tower_unquantized(calibrated_exports, model_type, scheme):
    """vLLM's compressed-tensors config gives every decoder linear its static-FP8 scheme (W8A8Fp8 with
    ``is_static_input_scheme``, per-tensor weights) or its W4A4 NVFP4 scheme (``use_a16`` false: an input global
    scale allocated), allocates the shapes the export holds, leaves the vision tower unquantized; TP 1 and 2
    accepted; the copied rules agree."""
    folder = calibrated_exports[model_type, scheme]
    vllm = inspect_checkpoint(folder)["vllm"]
    linear_method, kernel = CALIBRATED[scheme]
    assert vllm["checked_by"].startswith("vLLM 0.33") and vllm["refused"] is None
    assert vllm["method"] == "compressed-tensors"
    language = {v: m for v, m in vllm["layers"].items() if v.startswith("language_model.model.layers.")}
    vision = {v: m for v, m in vllm["layers"].items() if v.startswith("visual.")}
    assert len(language) == 3 * 4 and set(language.values()) == {linear_method}
    assert len(vision) == VISION_LINEARS[model_type] and set(vision.values()) == {"UnquantizedLinearMethod"}
    assert vllm["vision_quantized"] == [] and vllm["tp"][1] == [] and vllm["tp"][2] == []
    assert set(vllm["kernels"][1].values()) == {kernel}
    config = json.loads((folder / "config.json").read_text())
    family, header = family_for(model_type), read_checkpoint_header(folder)
    quant = read_quantization_config(config["quantization_config"], str(folder / "config.json"))
    shapes = quantized_shapes(header, quant, family)
    assert len(shapes) == 3 * 7
    vision_names = sorted(family.to_runtime(k[: -len(".weight")] + ".")[:-1] for k, (s, _) in header.items()
                          if k.endswith(".weight") and len(s) == 2 and family.to_runtime(k).startswith("model.visual."))
    copied = copied_rules(quant, shapes, vision_names, family, copy.deepcopy(config))
    assert copied["vision_quantized"] == [] and copied["refused"] is None
    assert {tp: not p for tp, p in copied["tp"].items()} == {tp: not p for tp, p in vllm["tp"].items()}
    assert vllm_compatibility_warnings(config["quantization_config"], family) == []


def vllm_scheme(folder, capability=(9, 0)):
    from qvlquant.checkpoint.vllm import pretend_gpu, vllm_quant_config

    with pretend_gpu(1, capability):
        _, quant = vllm_quant_config(folder, "qwen2_vl")
        return quant.get_scheme(torch.nn.Linear(64, 64), "language_model.model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("capability,served", [((8, 0), "CompressedTensorsW8A16Fp8"), ((8, 6), "CompressedTensorsW8A16Fp8"),
                                                 ((8, 9), "CompressedTensorsW8A8Fp8"), ((9, 0), "CompressedTensorsW8A8Fp8"),
                                                 ((10, 0), "CompressedTensorsW8A8Fp8")])
def test_vllm_reads_the_fp8_export_as_static_per_tensor_from_sm_89(calibrated_exports, capability, served):
    """FP8 W8A8 with the stored input scale (static, per tensor) from compute capability 8.9; below it vLLM serves
    the FP8 weights with 16-bit activations (its W8A16 scheme), leaving the input scale unused."""
    from compressed_tensors.quantization import QuantizationStrategy

    scheme = vllm_scheme(calibrated_exports["qwen2_vl", "FP8"], capability)
    assert type(scheme).__name__ == served
    if served == "CompressedTensorsW8A8Fp8":
        assert scheme.is_static_input_scheme is True and scheme.strategy == QuantizationStrategy.TENSOR


# vLLM 0.33's W4A4 NVFP4 kernel by compute capability (init_nvfp4_linear_kernel(use_a16=False), auto backend, as
# installed in the vLLM venv: flashinfer and humming present; CUTLASS's FP4 answered by a CUDA 12.8 build's rule):
# FP4 activations only on Blackwell (FlashInfer's CUTLASS FP4 matmul); before it a weight-only kernel, activations
# 16-bit as NVFP4A16 (Marlin's FP4, Humming on Hopper)
NVFP4_W4A4_KERNELS = {(7, 5): "MarlinNvFp4LinearKernel", (8, 0): "MarlinNvFp4LinearKernel",
                      (8, 9): "MarlinNvFp4LinearKernel", (9, 0): "HummingNvFp4LinearKernel",
                      (10, 0): "FlashInferCutlassNvFp4LinearKernel", (12, 0): "FlashInferCutlassNvFp4LinearKernel"}


@pytest.mark.parametrize("capability", list(NVFP4_W4A4_KERNELS))
def test_which_kernel_vllm_runs_nvfp4_w4a4_with(calibrated_exports, capability):
    scheme = vllm_scheme(calibrated_exports["qwen2_vl", "NVFP4"], capability)
    assert type(scheme).__name__ == "CompressedTensorsW4A4Fp4" and scheme.use_a16 is False
    assert type(scheme.kernel).__name__ == NVFP4_W4A4_KERNELS[capability]


def test_qvlquants_emulation_is_vllms_reference_numerics(calibrated_exports):
    """The activation quantization ``qvlquant.load`` emulates, against vLLM's own: its static per-tensor
    ``QuantFP8.forward_native`` for FP8, its ``ref_nvfp4_quant_dequant`` (the emulation backend's, and the CUDA
    kernels' order of operations) for NVFP4, bit for bit on the stored scales; and a loaded NVFP4 linear equals
    vLLM's emulated W4A4 product (``run_nvfp4_emulations``) on the stored tensors."""
    import qvlquant
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
        ref_nvfp4_quant_dequant,
        run_nvfp4_emulations,
    )
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    from qvlquant.checkpoint.vllm import pretend_gpu
    from qvlquant.quant import fp8, nvfp4

    torch.manual_seed(0)
    model, _ = qvlquant.load(calibrated_exports["qwen2_vl", "FP8"], dtype=torch.bfloat16)
    linear = model.model.language_model.layers[1].mlp.down_proj
    x = torch.randn(5, linear.in_features, dtype=torch.bfloat16) * 3
    with pretend_gpu(1):  # the op reads vLLM's current config when it is built; forward_native is plain torch
        theirs, _ = QuantFP8(static=True, group_shape=GroupShape.PER_TENSOR).forward_native(x, linear.input_scale)
    assert torch.equal(fp8.quantize_static(x, linear.input_scale).view(torch.uint8), theirs.view(torch.uint8))

    model, _ = qvlquant.load(calibrated_exports["qwen2_vl", "NVFP4"], dtype=torch.float32)
    linear = model.model.language_model.layers[1].mlp.down_proj
    x = torch.randn(5, linear.in_features) * 3
    gscale = linear.input_global_scale
    assert torch.equal(nvfp4.fake_quantize_activations(x, gscale), ref_nvfp4_quant_dequant(x, gscale, 16))
    served = run_nvfp4_emulations(x, gscale, linear.weight_packed, linear.weight_scale,
                                  1.0 / linear.weight_global_scale, swizzle=False)
    torch.testing.assert_close(linear(x), served, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_a_rule_gives_qwen3_5_linear_attention_8_bits_in_vllm_too(tmp_path, fmt):
    """``--override 'linear_attn:bits=8'``: the DeltaNet's inputs are one linear group in qvlquant but two fused
    layers in vLLM (in_proj_qkvz, in_proj_ba); GPTQ's ``dynamic`` rule names both, so vLLM builds both, and out_proj,
    at W8 (it named in_proj_qkvz only, and vLLM built in_proj_ba at W4 over 8-bit tensors)."""
    from qvlquant.quant.rules import parse_rule

    folder = make_export(tmp_path / fmt, "qwen3_5", fmt, rules=(parse_rule("linear_attn:bits=8"),))
    report = inspect_checkpoint(folder)["vllm"]
    settings = {v.removeprefix("language_model.model."): s for v, s in report["settings"].items()}
    assert {settings[f"layers.{i}.linear_attn.{n}"] for i in (0, 1, 2)
            for n in ("in_proj_qkvz", "in_proj_ba", "out_proj")} == {"W8 g64 sym"}
    assert settings["layers.3.self_attn.qkv_proj"] == "W4 g64 sym" and report["tp"][1] == []


# --- Mixture of experts: every expert of a layer in one vLLM MoE layer ----------------------------------------------
def _qwen3_5_moe_base(folder):
    from tiny_models import qwen3_5_checkpoint

    qwen3_5_checkpoint(folder, moe=True)


def _qwen3_vl_moe_base(folder):
    from tiny_models import qwen3_vl_moe_checkpoint

    # as published: experts fused and transposed on disk; layer 1 dense. No norm_topk_prob in its config.json
    # (transformers' config class has none): the export adds what vLLM's Qwen3MoeSparseMoeBlock reads
    qwen3_vl_moe_checkpoint(folder, layers=4)


# the schemes (``quantize --scheme``; FP8, NVFP4 and W8A8+gptq, SmoothQuant then GPTQ, calibrated on the demo) ->
# the method vLLM gives every other
# decoder linear, and the tensors each expert linear holds (what vLLM's MoE loader takes)
MOE_SCHEMES = {
    "FP8_DYNAMIC": ("CompressedTensorsLinearMethod(CompressedTensorsW8A8Fp8)", ("weight", "weight_scale")),
    "W8A8": ("CompressedTensorsLinearMethod(CompressedTensorsW8A8Int8)", ("weight", "weight_scale")),
    "W8A8+gptq": ("CompressedTensorsLinearMethod(CompressedTensorsW8A8Int8)", ("weight", "weight_scale")),
    "NVFP4A16": (NVFP4_METHOD, ("weight_packed", "weight_scale", "weight_global_scale")),
    "FP8": ("CompressedTensorsLinearMethod(CompressedTensorsW8A8Fp8)", ("weight", "weight_scale", "input_scale")),
    "NVFP4": (NVFP4_METHOD, ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")),
}
MOE_LEAVES = {"gptq": ("qweight", "qzeros", "scales"), "awq": ("qweight", "qzeros", "scales"),
              "compressed-tensors": ("weight_packed", "weight_scale"),
              **{scheme: leaves for scheme, (_, leaves) in MOE_SCHEMES.items()}}


def _linear_method(fmt):
    """The method vLLM gives a quantized decoder linear (not an MoE layer) of an export in ``fmt``."""
    return FORMATS[fmt][3] if fmt in FORMATS else MOE_SCHEMES[fmt][0]


MOE = {  # family -> what its tiny checkpoint holds and how vLLM builds it; a new MoE family needs an entry only
    "qwen3_5_moe": dict(
        base=_qwen3_5_moe_base,  # writes the tiny bf16 checkpoint into a folder
        formats=("gptq", "compressed-tensors", *MOE_SCHEMES),  # the formats and schemes checked
        moe_layers=(0, 1, 2, 3), experts=8,  # the decoder layers holding experts
        # vLLM's quantized modules of the decoder: 3 DeltaNet layers (in_proj_qkvz, in_proj_ba, out_proj) and a
        # full-attention layer (qkv_proj, o_proj), each with a shared expert (gate_up_proj, down_proj) and its experts
        vllm_modules=3 * 6 + 5, vision_linears=10,
        block=("qwen3_next", "Qwen3NextSparseMoeBlock"),  # vLLM's MoE block: (models module, class(config, prefix))
        kept=("gate", "shared_expert_gate"),  # its linears built without a quantization config: routers
        shared_expert=True,  # the block's shared expert (quantized linears of their own)
        first_moe_layers=(0, 3),  # the first layer of each type: inspect builds and loads those at every TP size
        rule_layers=(0, 3),  # the MoE layers the rules test skips / gives 8 bits (first layers: loaded at TP 1, 2)
    ),
    "qwen3_vl_moe": dict(
        base=_qwen3_vl_moe_base, formats=("gptq", "awq", "compressed-tensors", *MOE_SCHEMES), moe_layers=(0, 2, 3),
        experts=8,
        # per layer qkv_proj, o_proj, and the experts or (the dense layer 1) gate_up_proj (vLLM's Qwen3MoeMLP, a
        # fused layer its packed_modules_mapping does not name) and down_proj
        vllm_modules=4 * 2 + 3 + 2, vision_linears=14,
        block=("qwen3_moe", "Qwen3MoeSparseMoeBlock"),
        kept=("gate",),  # a GateLinear built WITH the quantization config: the export's config must keep it
        shared_expert=False, first_moe_layers=(0,), rule_layers=(0, 2),
    ),
}
MOE_METHODS = {  # format -> the method vLLM 0.33 gives an MoE layer at TP 1 and 2 (sm_90), and its experts kernel
    "gptq": ("AutoGPTQMoEMethod", "HummingIndexedExperts"),
    "awq": ("AutoAWQMoEMethod", "HummingIndexedExperts"),
    "compressed-tensors": ("CompressedTensorsWNA16MoEMethod", "HummingIndexedExperts"),
    # FP8: Triton's kernel, ahead of Humming in vLLM's order (what an sm_90 answers; HummingIndexedExperts while the
    # faked GPU still said no to supports_fp8)
    "FP8_DYNAMIC": ("CompressedTensorsW8A8Fp8MoEMethod", "TritonExperts"),
    "FP8": ("CompressedTensorsW8A8Fp8MoEMethod", "TritonExperts"),  # static input scales
    "W8A8": ("CompressedTensorsW8A8Int8MoEMethod", "TritonExperts"),
    "W8A8+gptq": ("CompressedTensorsW8A8Int8MoEMethod", "TritonExperts"),
    # one class for both: use_a16 is NVFP4A16's (no input global scale read)
    "NVFP4A16": ("CompressedTensorsW4A4Nvfp4MoEMethod", "HummingIndexedExperts"),
    "NVFP4": ("CompressedTensorsW4A4Nvfp4MoEMethod", "HummingIndexedExperts"),
}
MOE_CASES = [(t, f) for t in MOE for f in MOE[t]["formats"]]
MOE_RULED = [(t, f) for t, f in MOE_CASES if f in ("gptq", "compressed-tensors")]  # AWQ GEMM, the schemes: one width


def moe_export(root, model_type, fmt, rules=(), method="rtn"):
    """The tiny MoE checkpoint (made once per ``root``), exported as ``quantize`` does (RTN: straight from the
    checkpoint) at W4 g64 in ``fmt``, or with ``--scheme fmt`` (a scheme of ``MOE_SCHEMES``)."""
    import qvlquant

    base = root / f"{model_type}-base"
    if not base.exists():
        MOE[model_type]["base"](base)
    out = root / f"{model_type}-{fmt}-{method}-{len(rules)}"
    if fmt in MOE_SCHEMES:
        scheme, _, rounding = fmt.partition("+")
        calibrated = {"calib": "demo", "num_samples": 2} if scheme in ("FP8", "NVFP4") or rounding else {}
        qvlquant.quantize(model=str(base), output=str(out), scheme=scheme, rules=list(rules), **calibrated,
                          **({"method": rounding} if rounding else {}))
        return out
    sym = method != "awq"
    qvlquant.quantize(model=str(base), output=str(out), method=method, bits=4, group_size=64, sym=sym,
                      export_format="compressed-tensors" if fmt == "compressed-tensors" else "auto",
                      rules=list(rules), **({"calib": "demo", "num_samples": 2} if method == "awq" else {}))
    return out


@pytest.fixture(scope="module")
def moe_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-moe")
    return {(t, f): moe_export(root, t, f, method="awq" if f == "awq" else "rtn") for t, f in MOE_CASES}


def _moe_layers(report, model_type):
    return [f"language_model.model.layers.{i}.mlp.experts" for i in MOE[model_type]["moe_layers"]]


@pytest.mark.parametrize("model_type,fmt", MOE_CASES)
def test_vllm_builds_each_moe_layer_of_the_export_quantized(moe_exports, model_type, fmt):
    """vLLM's view of a W4 g64 export of an MoE family in each format: each layer's experts one MoE layer
    (``FusedMoEFactory``: AutoGPTQMoEMethod / AutoAWQMoEMethod / CompressedTensorsWNA16MoEMethod) at W4 g64, or a
    scheme's (CompressedTensorsW8A8Fp8MoEMethod / W8A8Int8MoEMethod / W4A4Nvfp4MoEMethod), every
    other decoder linear (the shared expert's and a dense layer's MLP included) quantized, the vision tower
    unquantized, TP 1 and 2 accepted with the experts' tensors loaded by vLLM's own loader without a problem."""
    report = inspect_checkpoint(moe_exports[model_type, fmt])["vllm"]
    entry, (moe_method, kernel) = MOE[model_type], MOE_METHODS[fmt]
    assert report["checked_by"].startswith("vLLM 0.33") and report["refused"] is None
    decoder = {v: m for v, m in report["layers"].items() if ".layers." in v and not v.startswith("visual")}
    experts = _moe_layers(report, model_type)
    assert {v: decoder[v] for v in experts} == {v: moe_method for v in experts}
    assert {report["settings"][v] for v in experts} == \
        {describe_spec(FORMATS[fmt][1]) if fmt in FORMATS else "not an integer setting"}
    others = {v: m for v, m in decoder.items() if v not in experts}
    assert len(others) == entry["vllm_modules"] - len(experts) and set(others.values()) == {_linear_method(fmt)}
    # routers: not among the linears inspect asks about (Qwen3.5-MoE's vLLM builds without a quantization config,
    # Qwen3-VL-MoE's with it: the block's test below shows both unquantized)
    assert not any(v.rsplit(".", 1)[-1] in entry["kept"] for v in decoder)
    vision = {v: m for v, m in report["layers"].items() if v.startswith("visual.")}
    assert len(vision) == entry["vision_linears"] and set(vision.values()) == {"UnquantizedLinearMethod"}
    assert not report["vision_quantized"] and report["tp"][1] == [] and report["tp"][2] == []
    assert {report["kernels"][1][f"language_model.model.layers.{i}.mlp.experts"] for i in entry["first_moe_layers"]} \
        == {kernel}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("model_type,fmt", MOE_CASES)
def test_vllm_loads_every_experts_tensors_where_its_moe_layer_reads_them(moe_exports, model_type, fmt, tp):
    """Layer 0's experts built on the CPU as vLLM builds them at TP ``tp`` (rank 0), and the export's per-expert
    tensors given to vLLM's own loader (through its checkpoint mapper: GPTQ's g_idx dropped): each parameter of the
    MoE layer then holds, for every expert, rank 0's share of the tensors the export wrote (gate then up along the
    intermediate dimension of w13, down's along w2's): the packed codes byte for byte, the scales as the model's
    dtype holds them; a per-tensor scale in its expert's slot (gate's and up's side by side, or one where vLLM
    keeps one: static FP8's input scale, which its loader refuses unless gate's and up's are equal)."""
    from safetensors.torch import load_file

    from qvlquant.checkpoint.vllm import (
        build_vllm_experts,
        checkpoint_linears,
        pretend_gpu,
        vllm_model_classes,
        vllm_names,
        vllm_quant_config,
    )

    folder = moe_exports[model_type, fmt]
    family = family_for(model_type).bind(json.loads((folder / "config.json").read_text()))
    tensors = load_file(str(folder / "model.safetensors"))
    linears = checkpoint_linears(folder)
    with pretend_gpu(tp):
        _, quant = vllm_quant_config(folder, model_type)
        outer, _ = vllm_model_classes(model_type)
        vname = "language_model.model.layers.0.mlp.experts"
        shards = vllm_names(linears, family, outer, quant)[vname]
        runner = build_vllm_experts(shards, linears, family, quant, vname, torch.bfloat16, device="cpu")
        mapper = quant.get_checkpoint_weight_mapper()
        disk = family.to_disk(f"{family.decoder_layers}.0.{family.experts}.")
        weights = [(f"{vname}.{k[len(disk):]}", t) for k, t in tensors.items() if k.startswith(disk)]
        loaded = list(runner.load_weights([(n[len(vname) + 1:], t) for n, t in mapper.apply(iter(weights))]))
    experts = runner.routed_experts
    assert type(experts.quant_method).__name__ == MOE_METHODS[fmt][0] and loaded
    gptq = fmt in ("gptq", "awq")  # [in, out] tensors (qweight [K/8, N] / [K, N/8]), not [out, in]
    split = {"gate_proj": 1 if gptq else 0, "up_proj": 1 if gptq else 0, "down_proj": 0 if gptq else 1}
    names = [n for n in tensors if n.startswith(disk + "0.gate_proj.") and not n.endswith(("g_idx", "weight_shape"))]
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == sorted(MOE_LEAVES[fmt])
    for e in range(MOE[model_type]["experts"]):
        for leaf in (n.rsplit(".", 1)[-1] for n in names):
            ckpt = {p: tensors[f"{disk}{e}.{p}.{leaf}"] for p in split}
            w13, w2 = getattr(experts, f"w13_{leaf}")[e], getattr(experts, f"w2_{leaf}")[e]
            if ckpt["gate_proj"].numel() == 1:  # a per-tensor scale: one per expert linear
                gate, up, down = (ckpt[p].reshape(()).to(w13.dtype) for p in split)
                # gate's and up's side by side, or one (static input scales: vLLM's loader wants them equal)
                assert torch.equal(w13, torch.stack([gate, up]) if w13.numel() == 2 else gate), (e, leaf)
                assert torch.equal(gate, up) or w13.numel() == 2, (e, leaf)
                assert torch.equal(w2.reshape(()), down), (e, leaf)
                continue
            # (float16 scales are read into the model's bfloat16, as vLLM serves the export; a per-channel scale of
            # down_proj [out, 1] is every rank's whole)
            share = {p: (t.narrow(split[p], 0, t.shape[split[p]] // tp) if t.shape[split[p]] > 1 else t)
                     .to(w13.dtype) for p, t in ckpt.items()}
            n = share["gate_proj"].shape[split["gate_proj"]]
            assert torch.equal(w13.narrow(split["gate_proj"], 0, n), share["gate_proj"]), (e, leaf)
            assert torch.equal(w13.narrow(split["up_proj"], n, n), share["up_proj"]), (e, leaf)
            assert torch.equal(w2, share["down_proj"]), (e, leaf)


@pytest.mark.parametrize("model_type,fmt", MOE_CASES)
def test_vllm_builds_the_routers_of_its_moe_block_unquantized(moe_exports, model_type, fmt, monkeypatch):
    """vLLM's whole MoE block built from the export's config (its own class, TP 2): the router and the
    shared-expert gate get no quantization method (Qwen3.5-MoE's are built without the quantization config;
    Qwen3-VL-MoE's router is a GateLinear built with it, which the export's config keeps), the shared expert the
    format's linear method, the experts its MoE method. Two run-time pieces a CPU build of vLLM lacks are
    stood in for: the SiLU-and-mul op (no weights) and the shared experts' CUDA stream (vLLM's own switch)."""
    methods = _vllm_moe_block(moe_exports[model_type, fmt], model_type, monkeypatch)
    assert {methods[k] for k in MOE[model_type]["kept"]} == {"UnquantizedLinearMethod"}
    assert methods["experts.routed_experts"] == MOE_METHODS[fmt][0]
    shared = {v for n, v in methods.items() if n.startswith("shared_expert.")}
    assert shared == ({_linear_method(fmt).split("(")[0]} if MOE[model_type]["shared_expert"] else set())


@pytest.mark.parametrize("fmt", MOE["qwen3_5_moe"]["formats"])
def test_vllms_mtp_drafter_keeps_the_mtp_head_of_every_qwen3_5_moe_export(moe_exports, fmt):
    """vLLM's MTP drafter (``Qwen3_5MoeMTP``: the checkpoint's quantization config, no name mapper) builds the MTP
    matrices the export copies in bf16 unquantized: GPTQ's ``-:`` dynamic rule and compressed-tensors' ``ignore``
    (the W4 export's and the schemes', whose config group targets every Linear) name ``mtp.``."""
    from vllm.model_executor.models.qwen3_5_mtp import Qwen3_5MoeMTP

    from qvlquant.checkpoint.vllm import pretend_gpu, vllm_decisions, vllm_quant_config

    mtp = {n: [n] for n in ("mtp.fc", "mtp.layers.0.mlp.down_proj")}  # the tiny base's (tiny_models.MTP_KEYS)
    with pretend_gpu(1):
        _, quant = vllm_quant_config(moe_exports["qwen3_5_moe", fmt], "qwen3_5_moe", classes=(Qwen3_5MoeMTP,))
        drafter, _ = vllm_decisions(quant, mtp, {n: (256, 128) for n in mtp})
    assert drafter == dict.fromkeys(mtp, "UnquantizedLinearMethod")


def _vllm_moe_block(folder, model_type, monkeypatch, tp=2) -> dict[str, str]:
    """vLLM's whole MoE block of layer 0 (its own class, MOE[model_type]["block"]) built on the meta device from the
    export's config at TP ``tp``: its module names -> their quantization methods."""
    import importlib

    from transformers import AutoConfig
    from vllm.config import get_current_vllm_config

    from qvlquant.checkpoint.vllm import pretend_gpu, vllm_quant_config

    module, cls = MOE[model_type]["block"]
    models = importlib.import_module(f"vllm.model_executor.models.{module}")
    monkeypatch.setenv("VLLM_DISABLE_SHARED_EXPERTS_STREAM", "1")
    monkeypatch.setattr(importlib.import_module("vllm.model_executor.models.qwen2_moe"), "SiluAndMul",
                        torch.nn.Identity)
    with pretend_gpu(tp):
        _, quant = vllm_quant_config(folder, model_type)
        engine = get_current_vllm_config()
        engine.model_config.hf_text_config = AutoConfig.from_pretrained(folder).text_config
        object.__setattr__(engine, "quant_config", quant)
        with torch.device("meta"):
            block = getattr(models, cls)(engine, prefix="language_model.model.layers.0.mlp")
    return {n: type(m.quant_method).__name__ for n, m in block.named_modules() if hasattr(m, "quant_method")}


@pytest.mark.parametrize("model_type", list(MOE))
def test_the_copied_rules_agree_with_vllm_on_moe_exports(moe_exports, model_type):
    """The fallback's answer for the MoE exports at every TP size, including the MoE layers' own rules (GPTQ: MoeWNA16
    past a split group, refused below groups of 32; compressed-tensors: a split group refused)."""
    for fmt in MOE[model_type]["formats"]:
        folder = moe_exports[model_type, fmt]
        copied = copied_rules(*copied_inputs(folder, model_type))
        asked = inspect_checkpoint(folder)["vllm"]
        assert copied["refused"] is None and copied["vision_quantized"] == []
        assert {tp: not p for tp, p in copied["tp"].items()} == {tp: not p for tp, p in asked["tp"].items()}
        # the MoE layers each names (inspect builds the first layer of each type; the copy checks them all)
        firsts = tuple(f".layers.{i}.mlp.experts" for i in MOE[model_type]["first_moe_layers"])
        moe = lambda problems: {p.split(":")[0].replace("model.language_model.", "language_model.model.")  # noqa: E731
                                for p in problems if p.split(":")[0].endswith(firsts)}
        for tp in TP_SIZES:
            assert moe(copied["tp"][tp]) == moe(asked["tp"][tp]), tp


def _moe_rule(model_type, layer, action):
    """A rule on every expert of one layer: ``layers\\.0\\.mlp\\.experts\\.:skip``."""
    import re

    return rf"layers\.{layer}\.{re.escape(family_for(model_type).experts)}\.:{action}"


@pytest.mark.parametrize("model_type,fmt", MOE_RULED)
def test_vllm_gives_each_moe_layer_its_rule(tmp_path, model_type, fmt):
    """Rules on whole MoE layers, as vLLM reads them: the first MoE layer (of one type)'s experts skipped
    (UnquantizedFusedMoEMethod; GPTQ: the ``-:`` dynamic rule names vLLM's ``mlp.experts``; compressed-tensors: its
    ``ignore`` regex matches expert 0's names, which vLLM asks), another's (the other type's) at 8 bits, the rest
    at W4; vLLM's own loader takes the first MoE layers' tensors (plain weights, 8-bit codes) at TP 1 and 2."""
    skipped, eight = MOE[model_type]["rule_layers"]
    folder = moe_export(tmp_path, model_type, fmt, rules=(_moe_rule(model_type, skipped, "skip"),
                                                          _moe_rule(model_type, eight, "bits=8")))
    report = inspect_checkpoint(folder)
    vllm = report["vllm"]
    assert vllm["refused"] is None and vllm["tp"][1] == [] and vllm["tp"][2] == [], vllm["tp"]
    experts = dict.fromkeys(_moe_layers(vllm, model_type))
    skipped, eight = (f"language_model.model.layers.{i}.mlp.experts" for i in (skipped, eight))
    assert vllm["layers"][skipped] == "UnquantizedFusedMoEMethod" and vllm["settings"][skipped] == "not quantized"
    assert vllm["layers"][eight] == MOE_METHODS[fmt][0] and vllm["settings"][eight] == "W8 g64 sym"
    assert {vllm["settings"][v] for v in experts if v not in (skipped, eight)} == {"W4 g64 sym"}
    assert copied_rules(*copied_inputs(folder, model_type))["tp"][1] == []


@pytest.mark.parametrize("model_type,fmt", MOE_RULED)
def test_one_expert_given_another_setting_is_refused_and_flagged(tmp_path, moe_exports, model_type, fmt):
    """vLLM builds an MoE layer at one setting and reads nothing else: compressed-tensors asks expert 0's names only,
    GPTQ's ``dynamic`` is matched against the layer's name. So qvlquant refuses a rule that splits a layer's
    experts (before any work), and a checkpoint whose config does (edited here: expert 3 of layer 0 at 8 bits) is
    built at W4 by vLLM without a word: inspect's check of vLLM's decision names it, and the copied rules refuse it."""
    import qvlquant

    linears = 3 * MOE[model_type]["experts"]  # gate, up, down of every expert
    with pytest.raises(ValueError, match=rf"layers\.0\.mlp\.experts: {linears - 3} linears W4g64 rtn \(first "
                                         r"0\.gate_proj\), 3 linears W8g64 rtn \(first 3\.gate_proj\); vLLM runs these "
                                         "linears as one fused layer"):
        qvlquant.quantize(model=str(moe_exports[model_type, fmt].parent / f"{model_type}-base"),
                          output=str(tmp_path / "refused"), bits=4, group_size=64,
                          rules=[r"layers\.0\.mlp\.experts\.3\.:bits=8"])
    assert not (tmp_path / "refused").exists()
    edited = tmp_path / "edited"
    shutil.copytree(moe_exports[model_type, fmt], edited)
    config = json.loads((edited / "config.json").read_text())
    qc = config["quantization_config"]
    pattern = r".*\.layers\.0\.mlp\.experts\.3\.(?:gate_proj|up_proj|down_proj)$"
    if fmt == "gptq":
        qc.setdefault("dynamic", {})[f"+:{pattern}"] = {"bits": 8, "group_size": 64, "sym": True, "desc_act": False}
    else:
        qc["config_groups"]["group_1"] = {**qc["config_groups"]["group_0"], "targets": [f"re:{pattern}"],
                                          "weights": {**qc["config_groups"]["group_0"]["weights"], "num_bits": 8}}
    (edited / "config.json").write_text(json.dumps(config))
    (edited / "qvlquant_manifest.json").unlink()
    report = inspect_checkpoint(edited)
    vname = "language_model.model.layers.0.mlp.experts"
    assert report["vllm"]["refused"] is None and report["vllm"]["settings"][vname] == "W4 g64 sym"
    flagged = [p for p in report["marlin"][1] if p.startswith(vname)]
    assert len(flagged) == 3 and all("vLLM builds it W4 g64 sym, the checkpoint holds model.language_model."
                                     "layers.0.mlp.experts.3." in p and p.endswith("W8 g64 sym [qvlquant's check of "
                                                                                   "vLLM's decision]") for p in flagged)
    copied = copied_rules(*copied_inputs(edited, model_type))
    assert any(f"vLLM runs mlp.experts ({linears} linears) as one layer of one setting, the config gives them W4 g64 "
               f"sym ({linears - 3} linears), W8 g64 sym (3 linears)" in p for p in copied["tp"][1])


def test_vllms_moe_loader_is_watched_for_what_it_would_misread(moe_exports, tmp_path):
    """The experts' tensors inspect gives vLLM's loader: one stored transposed is an error vLLM's loader raises; a
    scale with one group row where two belong it loads without a word (it narrows its destination to what it is
    given, for padded layers), leaving the second row uninitialised: inspect names it."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "repacked"
    shutil.copytree(moe_exports["qwen3_5_moe", "gptq"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    head = "model.language_model.layers.0.mlp.experts."
    tensors[head + "0.gate_proj.qweight"] = tensors[head + "0.gate_proj.qweight"].t().contiguous()
    tensors[head + "1.down_proj.scales"] = tensors[head + "1.down_proj.scales"][:1].contiguous()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    problems = inspect_checkpoint(bad)["vllm"]["tp"][1]
    assert any(p.startswith(head + "0.gate_proj.qweight: vLLM's loader: RuntimeError") for p in problems), problems
    assert head + "1.down_proj.scales: vLLM's loader fills 128 of the 256 values of expert 1's w2_scales (shape " \
        "(2, 128)) from the checkpoint; the rest stays uninitialised" in problems


MOE_SIZES = dict(hidden_size=2048, moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=16,
                 num_experts_per_tok=4)  # a layer of real proportions (16 experts: the decision reads no count)
MOE_BUILT = {  # format -> TP size -> the methods vLLM gives layer 0's experts (a rule skips them) and layer 1's (W4)
    # GPTQ / AWQ leave Marlin's MoE kernel for MoeWNA16 where a rank's share (512 / 8 = 64) splits a group of 128
    "gptq": {1: ("UnquantizedFusedMoEMethod", "AutoGPTQMoEMethod"), 8: ("MoeWNA16Method", "MoeWNA16Method")},
    "awq": {1: ("UnquantizedFusedMoEMethod", "AutoAWQMoEMethod"), 8: ("UnquantizedFusedMoEMethod", "MoeWNA16Method")},
    "compressed-tensors": {1: ("UnquantizedFusedMoEMethod", "CompressedTensorsWNA16MoEMethod"),
                           8: ("UnquantizedFusedMoEMethod", "refused")},
}
# the schemes (no rules: both layers alike) at every TP size: one method, one kernel (MOE_METHODS; block FP8's
# Fp8MoEMethod and Triton's kernel too), none refused; per-channel and per-tensor scales need no whole group, NVFP4's
# groups of 16 divide a share of 64
MOE_BUILT.update({scheme: {tp: (method, method) for tp in (1, 8)} for scheme, method in
                  [("FP8_BLOCK", "Fp8MoEMethod")] + [(s, MOE_METHODS[s][0]) for s in MOE_SCHEMES if "+" not in s]})
MOE_REFUSED_AT = {"gptq": {8}, "awq": set(), "compressed-tensors": {8},
                  **{s: set() for s in MOE_BUILT if s not in FORMATS}}
MOE_KERNELS = {**{s: MOE_METHODS[s][1] for s in MOE_SCHEMES}, "FP8_BLOCK": "TritonExperts"}
# block FP8: the blocks vLLM builds a rank's experts with. A share of 64 (512 / 8) is no whole 128-block: its
# Fp8MoEMethod refines the blocks to 64 x 64 (the largest common divisor of 128, the share and the hidden size; 32
# at least), which only Triton's kernel reads, and its loader spreads each checkpoint scale over the finer blocks
MOE_BLOCKS = {1: [128, 128], 2: [128, 128], 4: [128, 128], 8: [64, 64]}


def _scheme_config(scheme, family):
    """The ``quantization_config`` ``--scheme`` writes (FP8_BLOCK: the family's not-converted names only)."""
    from qvlquant.checkpoint.export import nvfp4_quantization_config, w8a8_quantization_config
    from qvlquant.quant.formats import SCHEMES

    fmt = SCHEMES[scheme]
    if isinstance(fmt, Fp8Format):
        from qvlquant.checkpoint.export import fp8_quantization_config

        return fp8_quantization_config(fmt, family, family.not_converted_names())
    return w8a8_quantization_config(fmt, family) if isinstance(fmt, Int8Format) else \
        nvfp4_quantization_config(fmt, family)


@pytest.mark.parametrize("fmt", list(MOE_BUILT))
def test_which_tp_sizes_vllm_serves_an_moe_layer_at(tmp_path, fmt):
    """MoE layers of 512-wide experts at g128, layer 0's experts skipped by a rule, from config.json only (vLLM
    allocates on the meta device). TP 1, 2, 4: each format's MoE method, the skip honoured. TP 8 (a rank holds 64 of
    each expert's intermediate size, half a group): compressed-tensors refuses; GPTQ and AWQ fall back to MoeWNA16,
    which halves the group and serves it, but reads GPTQ's skip nowhere (it builds the skipped layer W4 over plain
    weights: refused) while AWQ's ``modules_to_not_convert`` keeps it, by the name ``layers.0.mlp.experts`` the
    export writes (no expert's name is in the layer's). The schemes (FP8_BLOCK, FP8_DYNAMIC, W8A8, NVFP4A16, FP8,
    NVFP4; no rule) are served at every TP size by one method and kernel, block FP8 at TP 8 with its blocks refined
    to 64 x 64. The copied rules refuse the same TP sizes."""
    from tiny_models import qwen3_5_moe_config

    from qvlquant.checkpoint.vllm import (
        build_vllm_experts,
        build_vllm_layer,
        checkpoint_linears,
        marlin_problems,
        pretend_gpu,
        vllm_model_classes,
        vllm_names,
        vllm_quant_config,
    )
    from qvlquant.engine.loop import fused_groups
    from qvlquant.quant.rules import ModulePlan, parse_rule

    config = qwen3_5_moe_config(layers=4, experts=MOE_SIZES["num_experts"], top_k=MOE_SIZES["num_experts_per_tok"])
    for key, value in MOE_SIZES.items():
        setattr(config.text_config, key, value)
    family = family_for("qwen3_5_moe").bind(config)
    if fmt in FORMATS:
        pack, spec, _, _ = FORMATS[fmt]
        qcfg = QuantConfig("awq" if fmt == "awq" else "rtn", QuantSpec(4, 128, spec.sym))
        names = [f"{family.decoder_layers}.{i}.{n}" for i in range(4) for n in family.at(i).linears]
        modules = ModulePlan.resolve([parse_rule(_moe_rule("qwen3_5_moe", 0, "skip"))], qcfg, names,
                                     fused_groups(family, 4))
        config.quantization_config = quantization_config(qcfg, pack, family, 4, modules)
    else:
        config.quantization_config = _scheme_config(fmt, family)
    config.save_pretrained(tmp_path)
    if fmt == "awq":
        assert "layers.0.mlp.experts" in config.quantization_config["modules_to_not_convert"]
    linears = checkpoint_linears(tmp_path)
    built, kernels, blocks = {}, {}, {}
    for tp in TP_SIZES:
        with pretend_gpu(tp):
            _, quant = vllm_quant_config(tmp_path, "qwen3_5_moe")
            vnames = vllm_names(linears, family, vllm_model_classes("qwen3_5_moe")[0], quant)
            methods = []
            for i in (0, 1):
                vname = f"language_model.model.layers.{i}.mlp.experts"
                try:
                    runner = build_vllm_experts(vnames[vname], linears, family, quant, vname, torch.bfloat16)
                    method = runner.routed_experts.quant_method
                    methods.append(type(method).__name__)
                    kernels[tp] = getattr(getattr(method, "experts_cls", None), "__name__", None)
                    blocks[tp] = getattr(method, "moe_block_shape", None)
                except ValueError:
                    methods.append("refused")
            built[tp] = tuple(methods)
    assert built == {1: MOE_BUILT[fmt][1], 2: MOE_BUILT[fmt][1], 4: MOE_BUILT[fmt][1], 8: MOE_BUILT[fmt][8]}
    if fmt in MOE_KERNELS:
        assert kernels == dict.fromkeys(TP_SIZES, MOE_KERNELS[fmt])
    if fmt == "FP8_BLOCK":  # and the shared expert (512 wide): its down_proj's 64 input columns at TP 8 are refused
        assert blocks == MOE_BLOCKS
        shared = f"{family.decoder_layers}.0.mlp.shared_expert.down_proj"
        refused = set()
        for tp in TP_SIZES:
            with pretend_gpu(tp):
                _, quant = vllm_quant_config(tmp_path, "qwen3_5_moe")
                try:
                    build_vllm_layer([linears[shared]], "row", None, quant, "language_model.model.layers.0.mlp."
                                     "shared_expert.down_proj", torch.bfloat16)
                except ValueError as e:
                    assert "input_size_per_partition = 64 is not divisible by weight quantization block_k" in str(e)
                    refused.add(tp)
        copied = read_quantization_config(json.loads((tmp_path / "config.json").read_text())["quantization_config"],
                                          "config.json")
        assert refused == {8} == {tp for tp in TP_SIZES if marlin_problems(copied, {shared: linears[shared]}, tp,
                                                                             family)}
    saved = json.loads((tmp_path / "config.json").read_text())
    quant = read_quantization_config(saved["quantization_config"], "config.json")
    moe = {n: s for n, s in linears.items() if ".mlp.experts." in n}
    assert {tp for tp in TP_SIZES if marlin_problems(quant, moe, tp, family)} == MOE_REFUSED_AT[fmt]


def test_which_blocks_vllm_builds_qwen3_vl_moe_block_fp8_experts_with(tmp_path):
    """Block FP8 experts at Qwen3-VL-30B-A3B's proportions (768 wide, hidden 2048; from config.json): a rank's share
    of 384 at TP 2 holds whole 128-blocks, 192 at TP 4 and 96 at TP 8 do not, and vLLM's Fp8MoEMethod serves them
    with the blocks refined to 64 x 64 and 32 x 32 (Triton's kernel); nothing refused, by the copied rules either."""
    from tiny_models import qwen3_vl_moe_config

    from qvlquant.checkpoint.vllm import (
        build_vllm_experts,
        checkpoint_linears,
        marlin_problems,
        pretend_gpu,
        vllm_model_classes,
        vllm_names,
        vllm_quant_config,
    )

    config = qwen3_vl_moe_config(layers=2, experts=16, top_k=4, mlp_only_layers=())
    config.text_config.hidden_size, config.text_config.moe_intermediate_size = 2048, 768
    family = family_for("qwen3_vl_moe").bind(config)
    config.quantization_config = _scheme_config("FP8_BLOCK", family)
    config.save_pretrained(tmp_path)
    linears = checkpoint_linears(tmp_path)
    vname = "language_model.model.layers.0.mlp.experts"
    built = {}
    for tp in TP_SIZES:
        with pretend_gpu(tp):
            _, quant = vllm_quant_config(tmp_path, "qwen3_vl_moe")
            shards = vllm_names(linears, family, vllm_model_classes("qwen3_vl_moe")[0], quant)[vname]
            experts = build_vllm_experts(shards, linears, family, quant, vname, torch.bfloat16).routed_experts
            method = experts.quant_method
            built[tp] = (type(method).__name__, method.experts_cls.__name__, method.moe_block_shape)
    assert built == {1: ("Fp8MoEMethod", "TritonExperts", [128, 128]), 2: ("Fp8MoEMethod", "TritonExperts", [128, 128]),
                     4: ("Fp8MoEMethod", "TritonExperts", [64, 64]), 8: ("Fp8MoEMethod", "TritonExperts", [32, 32])}
    copied = read_quantization_config(json.loads((tmp_path / "config.json").read_text())["quantization_config"],
                                      "config.json")
    moe = {n: s for n, s in linears.items() if ".mlp.experts." in n}
    assert len(moe) == 2 * 16 * 3 and not any(marlin_problems(copied, moe, tp, family) for tp in TP_SIZES)


def test_block_fp8_of_qwen3_vl_moe_keeps_the_router_vllm_builds_with_the_quantization_config(tmp_path):
    """``--scheme FP8_BLOCK`` of the tiny Qwen3-VL-MoE: vLLM's Fp8Config matches ``modules_to_not_convert`` by exact
    name, and Qwen3-VL-MoE's router is a GateLinear built with the quantization config, so the export names each
    layer's router (transformers' router is no nn.Linear, so nothing else would): vLLM builds every router
    unquantized (else FP8 over the bf16 weight), each MoE layer's experts with Fp8MoEMethod, and loads them at TP 1."""
    import qvlquant
    from vllm.model_executor.layers.fused_moe import GateLinear

    from qvlquant.checkpoint.vllm import pretend_gpu, vllm_quant_config

    _qwen3_vl_moe_base(tmp_path / "base")
    qvlquant.quantize(model=str(tmp_path / "base"), output=str(tmp_path / "fp8"), scheme="FP8_BLOCK")
    vllm = inspect_checkpoint(tmp_path / "fp8")["vllm"]
    assert vllm["method"] == "fp8" and vllm["refused"] is None and vllm["tp"][1] == [], vllm["tp"][1]
    assert {vllm["layers"][v] for v in _moe_layers(vllm, "qwen3_vl_moe")} == {"Fp8MoEMethod"}
    with pretend_gpu(1):
        _, quant = vllm_quant_config(tmp_path / "fp8", "qwen3_vl_moe")
        with torch.device("meta"):
            routers = [GateLinear(128, 8, quant_config=quant, prefix=f"language_model.model.layers.{i}.mlp.gate")
                       for i in MOE["qwen3_vl_moe"]["moe_layers"]]
    assert {type(r.quant_method).__name__ for r in routers} == {"UnquantizedLinearMethod"}


def _with_moe_mtp_head(folder, experts):
    """Adds to the tiny Qwen3.5-MoE checkpoint a whole MTP layer as Qwen3.5-MoE checkpoints hold one (attention,
    router, shared expert and per-expert linears; the tiny base holds three MTP tensors only) -> its matrices'
    module names."""
    from safetensors.torch import load_file, save_file

    mlp = ["gate", "shared_expert_gate"] + [f"shared_expert.{p}_proj" for p in ("gate", "up", "down")] + \
        [f"experts.{e}.{p}_proj" for e in range(experts) for p in ("gate", "up", "down")]
    names = ["mtp.fc"] + [f"mtp.layers.0.self_attn.{p}_proj" for p in "qkvo"] + [f"mtp.layers.0.mlp.{m}" for m in mlp]
    tensors = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(2)
    tensors.update({f"{n}.weight": torch.randn(128, 128, generator=g).to(torch.bfloat16) for n in names})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return names


# block FP8 of the tiny Qwen3.5-MoE (hidden 128, experts and shared expert 128 wide): the vLLM modules each TP size
# refuses. Row-parallel inputs of 64 / 32 / 16 columns are no whole 128-block (vLLM's validate_fp8_block_shape);
# 2 query heads do not split over 4 or 8; the experts' 64 / 32 intermediate columns at TP 2 / 4 are served with
# the blocks refined to 64 / 32 (Fp8MoEMethod, Triton's kernel), their 16 at TP 8 are refused (refined below 32)
BLOCK_MOE_REFUSED = {1: set(), 2: {"0.linear_attn.out_proj", "0.mlp.shared_expert.down_proj", "3.self_attn.o_proj",
                                   "3.mlp.shared_expert.down_proj"}}
BLOCK_MOE_REFUSED[4] = BLOCK_MOE_REFUSED[2] | {"3.self_attn.qkv_proj"}
BLOCK_MOE_REFUSED[8] = BLOCK_MOE_REFUSED[4] | {"0.mlp.experts", "3.mlp.experts"}


def test_block_fp8_of_qwen3_5_moe_as_vllm_builds_it(tmp_path, monkeypatch):
    """``--scheme FP8_BLOCK`` of the tiny Qwen3.5-MoE, asked of vLLM 0.33's own classes: every DeltaNet in_proj_qkvz
    and out_proj, attention o_proj and shared-expert linear Fp8LinearMethod; in_proj_ba (32 rows a part) and the
    attention's qkv_proj (64 KV rows) kept bf16 as the export keeps them (no whole 128-blocks); each layer's
    experts one Fp8MoEMethod layer whose tensors vLLM's own loader takes at TP 1, 2 and 4; the routers
    (``mlp.gate``, ``mlp.shared_expert_gate``) and the vision tower unquantized; what each TP size refuses, and the
    copied rules refusing the same. vLLM's MTP drafter (``Qwen3_5MoeMTP``, built from the same quantization config
    with no name mapper) builds the bf16 MTP head unquantized: the export names its modules."""
    import qvlquant
    from vllm.model_executor.models.qwen3_5_mtp import Qwen3_5MoeMTP

    from qvlquant.checkpoint.vllm import pretend_gpu, vllm_decisions, vllm_quant_config

    _qwen3_5_moe_base(tmp_path / "base")
    mtp = _with_moe_mtp_head(tmp_path / "base", MOE["qwen3_5_moe"]["experts"])
    folder = tmp_path / "fp8"
    qvlquant.quantize(model=str(tmp_path / "base"), output=str(folder), scheme="FP8_BLOCK")
    vllm = inspect_checkpoint(folder)["vllm"]
    assert vllm["method"] == "fp8" and vllm["refused"] is None
    decoder = {v.removeprefix("language_model.model.layers."): m for v, m in vllm["layers"].items()
               if not v.startswith("visual.")}
    fp8, kept = "Fp8LinearMethod", "UnquantizedLinearMethod"
    expected = {**{f"{i}.linear_attn.{n}": m for i in (0, 1, 2)
                   for n, m in (("in_proj_qkvz", fp8), ("in_proj_ba", kept), ("out_proj", fp8))},
                "3.self_attn.qkv_proj": kept, "3.self_attn.o_proj": fp8,
                **{f"{i}.mlp.{n}": m for i in range(4) for n, m in (("experts", "Fp8MoEMethod"),
                                                                     ("shared_expert.gate_up_proj", fp8),
                                                                     ("shared_expert.down_proj", fp8))}}
    assert decoder == expected
    vision = {v: m for v, m in vllm["layers"].items() if v.startswith("visual.")}
    assert len(vision) == MOE["qwen3_5_moe"]["vision_linears"] and set(vision.values()) == {kept}
    assert vllm["vision_quantized"] == []
    refused = {tp: {p.split(":")[0].removeprefix("language_model.model.layers.") for p in problems}
               for tp, problems in vllm["tp"].items()}
    assert refused == BLOCK_MOE_REFUSED, vllm["tp"]
    experts = [f"language_model.model.layers.{i}.mlp.experts" for i in MOE["qwen3_5_moe"]["first_moe_layers"]]
    assert {tp: {vllm["kernels"][tp].get(v) for v in experts} for tp in (1, 2, 4)} == \
        {tp: {"TritonExperts"} for tp in (1, 2, 4)}
    assert f"{experts[0]}: ValueError: The output_size of gate's and up's weight = 16 is not divisible by weight " \
           "quantization block_n = 128." in vllm["tp"][8]
    copied = copied_rules(*copied_inputs(folder, "qwen3_5_moe"))
    assert {tp: not p for tp, p in copied["tp"].items()} == {tp: not p for tp, p in vllm["tp"].items()}
    moe = [p for p in copied["tp"][8] if ".mlp.experts:" in p]
    assert len(moe) == 4 and all("vLLM's Fp8MoEMethod refines the blocks only so far" in p for p in moe)
    assert not any(".mlp.experts:" in p for tp in (1, 2, 4) for p in copied["tp"][tp])
    # the whole MoE block vLLM builds: routers unquantized, the shared expert and the experts FP8
    methods = _vllm_moe_block(folder, "qwen3_5_moe", monkeypatch, tp=1)
    assert {methods[k] for k in MOE["qwen3_5_moe"]["kept"]} == {kept}
    assert methods["experts.routed_experts"] == "Fp8MoEMethod"
    assert {v for n, v in methods.items() if n.startswith("shared_expert.")} == {fp8}
    # the MTP drafter, asked for every MTP matrix of the checkpoint under vLLM's names (q/k/v, the shared expert's
    # gate/up fused; the experts one MoE layer)
    family = family_for("qwen3_5_moe").bind(json.loads((folder / "config.json").read_text()))
    fused = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
             "mlp.shared_expert.gate_up_proj": ("shared_expert.gate_proj", "shared_expert.up_proj")}
    names = {n: [n] for n in mtp if ".experts." not in n and not n.endswith(("q_proj", "k_proj", "v_proj", "gate",
                                                                            "gate_proj", "up_proj"))}
    names.update({f"mtp.layers.0.{f}": [f"mtp.layers.0.{f.split('.')[0]}.{p}" for p in parts]
                  for f, parts in fused.items()})
    names["mtp.layers.0.mlp.experts"] = [n for n in mtp if ".experts." in n]
    with pretend_gpu(1):
        _, quant = vllm_quant_config(folder, "qwen3_5_moe", classes=(Qwen3_5MoeMTP,))
        drafter, _ = vllm_decisions(quant, names, {s: (128, 128) for shards in names.values() for s in shards},
                                    family)
    assert drafter == {**{n: kept for n in names}, "mtp.layers.0.mlp.experts": "UnquantizedFusedMoEMethod"}, drafter
    assert "mtp.fc" in drafter and len(drafter) == 6
    # vLLM's own loader given layer 0's expert tensors at TP 1 and 2 (rank 0): the FP8 codes of rank 0's share byte
    # for byte, and each checkpoint block scale spread over the blocks vLLM built (at TP 2 refined to 64 x 64)
    from safetensors.torch import load_file

    from qvlquant.checkpoint.vllm import build_vllm_experts, checkpoint_linears, vllm_model_classes, vllm_names

    tensors = load_file(str(folder / "model.safetensors"))
    linears = checkpoint_linears(folder)
    disk, vname = "model.language_model.layers.0.mlp.experts.", "language_model.model.layers.0.mlp.experts"
    for tp in (1, 2):
        with pretend_gpu(tp):
            _, quant = vllm_quant_config(folder, "qwen3_5_moe")
            shards = vllm_names(linears, family, vllm_model_classes("qwen3_5_moe")[0], quant)[vname]
            runner = build_vllm_experts(shards, linears, family, quant, vname, torch.bfloat16, device="cpu")
            assert list(runner.load_weights([(k[len(disk):], t) for k, t in tensors.items() if k.startswith(disk)]))
        experts, half = runner.routed_experts, 128 // tp  # a rank's share of the 128-wide intermediate size
        fine = experts.quant_method.moe_block_shape[0]
        assert fine == 128 // tp
        spread = lambda s: s.repeat_interleave(128 // fine, 0).repeat_interleave(128 // fine, 1)  # noqa: E731
        for e in range(MOE["qwen3_5_moe"]["experts"]):
            w = {p: tensors[f"{disk}{e}.{p}_proj.weight"].view(torch.uint8) for p in ("gate", "up", "down")}
            s = {p: spread(tensors[f"{disk}{e}.{p}_proj.weight_scale_inv"]) for p in ("gate", "up", "down")}
            assert torch.equal(experts.w13_weight[e].view(torch.uint8), torch.cat([w["gate"][:half], w["up"][:half]]))
            assert torch.equal(experts.w2_weight[e].view(torch.uint8), w["down"][:, :half])
            assert torch.equal(experts.w13_weight_scale_inv[e], torch.cat([s["gate"][: half // fine],
                                                                           s["up"][: half // fine]]))
            assert torch.equal(experts.w2_weight_scale_inv[e], s["down"][:, : half // fine])
