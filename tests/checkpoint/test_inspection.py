import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from qvlquant.checkpoint.export import modules_in_block_to_quantize
from qvlquant.checkpoint.inspection import inspect_checkpoint, transformers_converts
from qvlquant.checkpoint.qconfig import read_quantization_config
from qvlquant.checkpoint.repair import repair_config
from qvlquant.checkpoint.vllm import (
    copied_config_refusals,
    copied_vision_decision,
    marlin_problems,
    vllm_compatibility_warnings,
)
from qvlquant.cli import main
from qvlquant.families import family_for
from qvlquant.storage.manifest import MANIFEST, sha256, verify_manifest, write_manifest

NAMES = ["model.visual.blocks.0.attn.qkv", "model.language_model.layers.0.mlp.up_proj", "lm_head",
         "visual.blocks.0.mlp.fc1", "model.visual.merger.mlp.0"]


@pytest.mark.parametrize("patterns,converted", [
    (["visual"], [True, True, True, False, True]),  # a bare "visual" protects only the on-disk layout
    (["visual", "model.visual"], [False, True, True, False, False]),
    (["lm_head"], [True, True, False, True, True]),
    (["re.*qkv"], [True, True, True, True, True]),
    ([r"model\.visual\..*"], [False, True, True, True, False]),
    (None, [True] * 5),
    ([], [True] * 5),
])
def test_matcher_is_transformers_own(patterns, converted):
    """transformers_converts is transformers' should_convert_module (5.x semantics: anchored at the start up to a
    module boundary, or a suffix), so these are transformers' answers."""
    assert [transformers_converts(n, patterns) for n in NAMES] == converted


def test_bare_visual_does_not_protect_the_runtime_vision_tower():
    assert transformers_converts("model.visual.blocks.0.attn.qkv", ["visual"])
    assert not transformers_converts("model.visual.blocks.0.attn.qkv", ["visual", "model.visual"])


def gptq(**fields):
    """A GPTQ quantization_config (4-bit, group 128, symmetric unless ``fields`` say otherwise), as read."""
    return read_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, **fields}, "t")


def test_marlin_conditions():
    shapes = {"l.0.self_attn.k_proj": (256, 128), "l.0.mlp.down_proj": (29568, 8192)}
    assert marlin_problems(gptq(), {}, 1) == []
    assert "sym=true" in marlin_problems(gptq(sym=False), {}, 1)[0]
    assert "group_size 96" in marlin_problems(gptq(group_size=96), {}, 1)[0]
    problems = marlin_problems(gptq(), shapes, 2)
    assert any("down_proj" in p for p in problems) and not any("k_proj" in p for p in problems)  # 72B's 29568
    padded = {"l.0.mlp.down_proj": (29696, 8192)}
    assert marlin_problems(gptq(), padded, 8) == []
    v1 = {"transformer.h.0.mlp.c_proj": (29568, 8192)}  # the split lists come from the family: Qwen-VL v1's names
    assert marlin_problems(gptq(), v1, 2, family_for("qwen")) and not marlin_problems(gptq(), v1, 2)


@pytest.fixture(scope="module")
def awq_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "awq"
    assert main(["quantize", "--method", "awq", "--bits", "4", "--num-samples", "4", "--output", str(out)]) == 0
    return out


def official_style(src, dst):
    """The same checkpoint with the config of the official Qwen2-VL-*-AWQ releases: modules_to_not_convert = ["visual"]."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["visual"]
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "qvlquant_manifest.json").unlink()
    return dst


@pytest.mark.slow
def test_inspect_flags_and_repair_fixes_official_style_awq_config(awq_export, tmp_path, capsys):
    report = inspect_checkpoint(awq_export)
    assert report["quantized_linears"] == 28 and report["vision_linears"] == 10
    assert report["vision_exposed_in_transformers"] == [] and report["marlin"][1] == []
    bad = official_style(awq_export, tmp_path / "official")
    assert len(inspect_checkpoint(bad)["vision_exposed_in_transformers"]) == 10
    assert main(["inspect", str(bad)]) == 1  # it would load wrongly: not a success
    out = capsys.readouterr()
    assert "PROBLEM: transformers 5 would replace 10 vision linears" in out.out and "would load wrongly" in out.err
    names = repair_config(bad)
    assert {"visual", "model.visual"} <= set(names)
    assert inspect_checkpoint(bad)["vision_exposed_in_transformers"] == []


@pytest.mark.slow
def test_transformers_really_corrupts_then_repair_protects(awq_export, tmp_path):
    """The INTEROP.md finding, checked against transformers itself (needs the interop extra)."""
    pytest.importorskip("gptqmodel")
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    bad = official_style(awq_export, tmp_path / "official")
    hf = Qwen2VLForConditionalGeneration.from_pretrained(bad, device_map="cpu", dtype=torch.float32)
    assert type(hf.model.visual.blocks[0].attn.qkv) is not torch.nn.Linear  # replaced: weights never loaded
    repair_config(bad)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(bad, device_map="cpu", dtype=torch.float32)
    assert type(hf.model.visual.blocks[0].attn.qkv) is torch.nn.Linear


def tiny_export(folder, modules_to_not_convert=None):
    """A hand-made GPTQ export (one quantized linear, one vision linear) with its manifest: no quantization run."""
    folder.mkdir()
    # as qvlquant writes it (vLLM leaves the vision alone); gate_proj listed too, though its tensors are left out
    # here, since vLLM refuses a fused gate_up_proj of one quantized shard (the copied rules too)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
          "modules_in_block_to_quantize": [["mlp.gate_proj", "mlp.up_proj"]]}
    if modules_to_not_convert is not None:
        qc["modules_to_not_convert"] = modules_to_not_convert
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "quantization_config": qc}, indent=2))
    save_file({"model.layers.0.mlp.up_proj.qweight": torch.zeros(16, 64, dtype=torch.int32),
               "model.layers.0.mlp.up_proj.scales": torch.ones(1, 64, dtype=torch.float16),
               "visual.blocks.0.attn.qkv.weight": torch.ones(48, 16)}, str(folder / "model.safetensors"))
    write_manifest(folder)
    return folder


def edit_bits(folder, bits=3):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = bits
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_inspect_verifies_an_intact_export(tmp_path, capsys, monkeypatch):
    # the hand-made export holds up_proj's tensors alone: this test is about the manifest, so the copied rules
    # judge, with or without vLLM in the venv
    monkeypatch.setattr("qvlquant.checkpoint.inspection.vllm_installed", lambda: None)
    q = tiny_export(tmp_path / "q")
    report = inspect_checkpoint(q)
    assert report["verification"] == {"status": "verified", "files": 2, "error": None}
    assert report["quantization"]["bits"] == 4 and report["quantized_linears"] == 1
    assert main(["inspect", str(q)]) == 0
    out = capsys.readouterr().out
    assert "manifest: 2 files verified" in out
    assert "vLLM: judged by " in out and "vLLM at tensor-parallel 1:" in out  # says whose rules, vLLM's or a copy
    first = out.splitlines()[0]
    assert "W4, group " in first and "{" not in first  # a sentence, not a Python dict
    assert "pip install 'qvlquant[vllm]'" not in out  # docs/VLLM.md: vLLM goes in a venv of its own
    assert out.count("COPY of vLLM") <= 1  # who judged is said once, not on every problem line


@pytest.mark.parametrize("edit", ["bits", "shard"])
def test_inspect_fails_an_edited_export(tmp_path, capsys, edit):
    """Issue 13: an export whose config says bits=3 after the fact (or a shard edited) fails, rc != 0."""
    q = tiny_export(tmp_path / "q")
    edit_bits(q) if edit == "bits" else flip_last_byte(q / "model.safetensors")
    changed = "config.json" if edit == "bits" else "model.safetensors"
    assert inspect_checkpoint(q)["verification"]["status"] == "failed"
    assert main(["inspect", str(q)]) == 1
    out = capsys.readouterr()
    assert f"FAILED verification: {q}: {changed} does not match its sha256" in out.out
    assert "fails verification" in out.err
    assert main(["inspect", str(q), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["verification"]["status"] == "failed"


def test_inspect_of_a_folder_without_manifest_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("qvlquant.checkpoint.inspection.vllm_installed", lambda: None)  # as above
    q = tiny_export(tmp_path / "q")
    (q / MANIFEST).unlink()
    assert main(["inspect", str(q)]) == 0
    assert "manifest: none (not a qvlquant export" in capsys.readouterr().out


def test_inspect_names_pickle_weights_and_reads_none(tmp_path, capsys):
    q = tiny_export(tmp_path / "q")
    (q / "model.safetensors").rename(q / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pickle weights \['pytorch_model.bin'\].*safetensors .* only"):
        inspect_checkpoint(q)


def test_repair_keeps_the_export_verified_and_touches_nothing_else(tmp_path):
    q = tiny_export(tmp_path / "q", modules_to_not_convert=["visual"])
    (q / "notes.txt").write_text("the user's")
    shard_entry = json.loads((q / MANIFEST).read_text())["files"]["model.safetensors"]
    names = repair_config(q)
    assert names[0] == "visual" and {"visual", "model.visual"} <= set(names)  # only added, in order
    verify_manifest(q)
    files = json.loads((q / MANIFEST).read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors"]  # the user's file is not taken into the manifest
    assert files["model.safetensors"] == shard_entry and files["config.json"]["sha256"] == sha256(q / "config.json")
    assert (q / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in q.iterdir()) == ["config.json", "model.safetensors", "notes.txt", MANIFEST]
    before = (q / "config.json").read_bytes()
    assert repair_config(q) == names and (q / "config.json").read_bytes() == before  # idempotent


@pytest.mark.parametrize("edit", ["bits", "shard"])
def test_repair_refuses_an_export_that_fails_verification(tmp_path, capsys, edit):
    """A repair must not re-hash (and so bless) an edited config or a corrupted shard."""
    q = tiny_export(tmp_path / "q", modules_to_not_convert=["visual"])
    edit_bits(q) if edit == "bits" else flip_last_byte(q / "model.safetensors")
    before = {p.name: p.read_bytes() for p in q.iterdir()}
    assert main(["inspect", str(q), "--repair"]) == 2
    assert "not repairing" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in q.iterdir()} == before


def test_repair_without_manifest_writes_only_config(tmp_path):
    q = tiny_export(tmp_path / "q", modules_to_not_convert=["visual"])
    (q / MANIFEST).unlink()
    repair_config(q)
    assert sorted(p.name for p in q.iterdir()) == ["config.json", "model.safetensors"]
    qc = json.loads((q / "config.json").read_text())["quantization_config"]
    assert "model.visual" in qc["modules_to_not_convert"]


def test_repair_that_fails_midway_leaves_config_as_it_was(tmp_path, monkeypatch):
    q = tiny_export(tmp_path / "q", modules_to_not_convert=["visual"])
    before = {p.name: p.read_bytes() for p in q.iterdir()}

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("qvlquant.storage.manifest.os.replace", no_space)
    with pytest.raises(OSError, match="No space"):
        repair_config(q)
    assert {p.name: p.read_bytes() for p in q.iterdir()} == before  # config intact, no temporary file left


def compressed(weights=None, **fields):
    """A compressed-tensors pack-quantized quantization_config (4-bit, group 128) as the reader reads it."""
    group = {"weights": {"num_bits": 4, "group_size": 128, **(weights or {})}}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": group}, **fields}
    return read_quantization_config(qc, "t")


def test_copied_rules_of_vllm_0_33_refuse_act_order_and_asymmetric_gptq():
    """The fallback (vLLM absent) copies vLLM 0.33: desc_act=true is refused (with groups), asymmetric GPTQ too."""
    assert marlin_problems(gptq(desc_act=False), {}, 1) == []
    assert "desc_act" in marlin_problems(gptq(desc_act=True), {}, 1)[0]
    assert marlin_problems(gptq(desc_act=True, group_size=-1), {}, 1) == []  # act-order is a no-op per channel
    assert "sym" in copied_config_refusals(gptq(sym=False))[0]
    assert "group_size 96" in copied_config_refusals(compressed({"group_size": 96}))[0]


def test_copied_rules_replicate_kv_heads_and_refuse_only_groups_straddling_shards():
    shapes = {"l.0.self_attn.k_proj": (3584, 512), "l.0.self_attn.o_proj": (3584, 3584), "l.0.mlp.down_proj": (18944, 3584)}
    qc = gptq(desc_act=False)
    for tp in (1, 2, 4):  # Qwen2-VL-7B: 28 heads, 4 KV heads (k_proj's 512 outputs are split by heads, not checked)
        assert marlin_problems(qc, shapes, tp, heads=(28, 4)) == []
    at8 = marlin_problems(qc, shapes, 8, heads=(28, 4))  # 28 heads over 8 ranks; 18944 / 8, 3584 / 8: half groups
    assert len(at8) == 3 and "28 attention heads" in at8[0] and "down_proj" in at8[1] and "o_proj" in at8[2]
    assert marlin_problems(qc, {}, 8, heads=(32, 4)) == []  # 4 KV heads replicated over 8 ranks
    assert marlin_problems(qc, {"l.0.mlp.down_proj": (18944, 3584 + 8)}, 2) == []  # out % 64 != 0: tiles are padded
    assert "down_proj" in marlin_problems(qc, {"l.0.mlp.down_proj": (18944 + 128, 3584)}, 2)[0]  # a group straddles
    assert "KV heads" in marlin_problems(qc, {}, 4, heads=(12, 3))[0]  # 3 KV heads over 4 ranks: no


def test_copied_vision_decision_flags_short_gptq_names_and_missing_bare_visual():
    vision = ["model.visual.blocks.0.mlp.gate_proj", "model.visual.blocks.0.attn.qkv"]  # Qwen2.5-VL's vision MLP
    short = gptq(modules_in_block_to_quantize=[["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]])
    assert copied_vision_decision(short, vision) == ["visual.blocks.0.mlp.gate_proj"]
    ours = gptq(modules_in_block_to_quantize=modules_in_block_to_quantize(family_for("qwen2_5_vl"), 28))
    assert copied_vision_decision(ours, vision) == []
    assert copied_vision_decision(gptq(), vision) == [n.removeprefix("model.") for n in vision]  # no list: every one

    def awq(names):
        return read_quantization_config({"quant_method": "awq", "modules_to_not_convert": names}, "t")

    assert copied_vision_decision(awq(["model.visual", "lm_head"]), vision) == [
        n.removeprefix("model.") for n in vision]  # vLLM's mapper leaves "model.visual" (no dot) as it is
    assert copied_vision_decision(awq(["model.visual", "visual"]), vision) == []
    assert copied_vision_decision(compressed(ignore=["lm_head", "re:.*visual.*"]), vision) == []
    assert len(copied_vision_decision(compressed(ignore=[]), vision)) == 2


def test_without_vllm_inspect_says_its_rules_are_a_copy(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("qvlquant.checkpoint.inspection.vllm_installed", lambda: None)
    q = tiny_export(tmp_path / "q")
    report = inspect_checkpoint(q)
    assert report["vllm"]["checked_by"].startswith("a COPY of vLLM 0.33.0's rules")
    edit = json.loads((q / "config.json").read_text())
    edit["quantization_config"]["desc_act"] = True
    (q / "config.json").write_text(json.dumps(edit))
    report = inspect_checkpoint(q)
    assert "desc_act" in report["vllm"]["refused"] and any("desc_act" in p for p in report["marlin"][1])
    assert main(["inspect", str(q)]) == 1  # vLLM would refuse it at tensor-parallel 1
    assert "desc_act" in vllm_compatibility_warnings(edit["quantization_config"], family_for("qwen2_vl"))[0]


def test_not_converted_names_protect_the_vision_tower_in_transformers_and_vllm():
    """Both checkpoint layouts for transformers, and the bare leaf vLLM's mapper leaves (Qwen3-VL's checkpoint
    layout is the runtime one, so without it vLLM would quantize its whole vision tower: the conformance test)."""
    assert family_for("qwen2_vl").not_converted_names() == ["visual", "model.visual", "lm_head"]
    assert family_for("qwen3_vl").not_converted_names() == ["model.visual", "lm_head", "visual"]
    for name in ("model.visual.blocks.0.attn.qkv", "model.visual.merger.linear_fc1"):
        assert not transformers_converts(name, family_for("qwen3_vl").not_converted_names())


def with_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    changed = edit(config)
    (folder / "config.json").write_text(json.dumps(config if changed is None else changed))


ODD_CONFIGS = {  # config.json edit -> what the one line says (inspect, then inspect --repair)
    "config.json a list": (lambda c: [1], r"config\.json: not a JSON object"),
    "quantization_config a list": (lambda c: c.update(quantization_config=[1]),
                                   r"config\.json: quantization_config must be a JSON object, got \[1\]"),
    "bits a list": (lambda c: c["quantization_config"].update(bits=[4]),
                    r"config\.json: quantization_config\.bits must be a whole number, got \[4\]"),
    "bits 0": (lambda c: c["quantization_config"].update(bits=0), r"quantization_config: bits must be 2, 3, 4 or 8, got 0"),
    "group_size a string": (lambda c: c["quantization_config"].update(group_size="128"),
                            r"quantization_config\.group_size must be a whole number, got \'128\'"),
    "model_type a list": (lambda c: c.update(model_type=["qwen2_vl"]), r"config\.json: model_type must be a string"),
    "unknown model_type": (lambda c: c.update(model_type="llama"), r"model_type 'llama' is not supported"),
    "modules_to_not_convert a number": (lambda c: c["quantization_config"].update(modules_to_not_convert=3),
                                        r"quantization_config\.modules_to_not_convert must be a list of module names"),
    "config_groups a list": (lambda c: c["quantization_config"].update(quant_method="compressed-tensors",
                                                                        config_groups=[1]),
                             r"quantization_config\.config_groups must be a JSON object"),
    "text_config a list": (lambda c: c.update(text_config=[1]), r"config\.json: text_config must be an object"),
    "heads a string": (lambda c: c.update(text_config={"num_attention_heads": "4", "num_key_value_heads": 2}),
                       r"text_config\.num_attention_heads must be a whole number of at least 1"),
}


@pytest.mark.parametrize("odd", list(ODD_CONFIGS))
def test_inspect_and_repair_of_odd_configs_are_one_line(tmp_path, capsys, odd):
    """config.json of the wrong shape where inspect and repair read it: one line naming the file and the field,
    exit 2, config.json untouched (never an AttributeError or TypeError traceback)."""
    q = tiny_export(tmp_path / "q")
    (q / MANIFEST).unlink()  # not ours: read as it is, nothing verified first
    edit, message = ODD_CONFIGS[odd]
    with_config(q, edit)
    before = (q / "config.json").read_bytes()
    for argv in (["inspect", str(q)], ["inspect", "--repair", str(q)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert (q / "config.json").read_bytes() == before


def test_inspect_of_a_config_without_quantization_config_reports_it_unquantized(tmp_path, capsys):
    q = tiny_export(tmp_path / "q")
    (q / MANIFEST).unlink()
    with_config(q, lambda c: c.pop("quantization_config") and None)
    assert main(["inspect", str(q)]) == 0
    assert main(["inspect", "--repair", str(q)]) == 2
    assert "is not quantized: nothing to repair" in capsys.readouterr().err


def test_a_qweight_without_scales_is_named(tmp_path, capsys):
    q = tiny_export(tmp_path / "q")
    (q / MANIFEST).unlink()
    save_file({"model.layers.0.mlp.up_proj.qweight": torch.zeros(16, 64, dtype=torch.int32)},
              str(q / "model.safetensors"))
    assert main(["inspect", str(q)]) == 2
    assert "model.layers.0.mlp.up_proj.qweight has no model.layers.0.mlp.up_proj.scales" in capsys.readouterr().err


INSPECTED_MOE = {  # format -> (--format, --method, vLLM's method for a layer's experts, for the other decoder linears)
    "gptq": ("auto", "rtn", "AutoGPTQMoEMethod", "AutoGPTQLinearMethod"),
    "awq": ("auto", "awq", "AutoAWQMoEMethod", "AutoAWQMarlinLinearMethod"),
    "compressed-tensors": ("compressed-tensors", "rtn", "CompressedTensorsWNA16MoEMethod",
                           "CompressedTensorsLinearMethod(CompressedTensorsWNA16)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(INSPECTED_MOE))
def test_inspect_names_vllms_methods_and_kernels_for_a_qwen3_vl_moe_export(tmp_path, capsys, fmt):
    """``qvlquant inspect`` of a tiny Qwen3-VL-MoE export (experts fused and transposed in the base, one layer dense)
    where vLLM is installed: the MoE method vLLM gives each layer's experts, the linear method of the rest, the
    kernels it picks at TP 1 (sm_90, faked), and no problem at TP 1."""
    pytest.importorskip("vllm", reason="vLLM's own classes name the methods (docs/VLLM.md: its own venv)")
    from tiny_models import qwen3_vl_moe_checkpoint

    qwen3_vl_moe_checkpoint(tmp_path / "base", layers=3)
    export_format, method, experts, linears = INSPECTED_MOE[fmt]
    out = tmp_path / fmt
    calibration = ["--calib", "demo", "--num-samples", "2"] if method == "awq" else []
    assert main(["quantize", "--model", str(tmp_path / "base"), "--method", method, "--bits", "4", "--group-size",
                 "64", "--format", export_format, *calibration, "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
             if ":" in line}
    assert lines["vLLM methods (language model)"] == ", ".join(sorted((experts, linears)))
    assert lines["vLLM kernels at tensor-parallel 1"] == "HummingIndexedExperts, HummingLinearKernel"
    assert lines["vLLM at tensor-parallel 1"] == "ok"
