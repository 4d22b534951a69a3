import json
import shutil

import pytest

from qvlquant.cli import main
from qvlquant.inspect import inspect_checkpoint, marlin_problems, repair_config, transformers_converts


@pytest.mark.parametrize("name", ["model.visual.blocks.0.attn.qkv", "model.language_model.layers.0.mlp.up_proj",
                                  "lm_head", "visual.blocks.0.mlp.fc1", "model.visual.merger.mlp.0"])
@pytest.mark.parametrize("patterns", [["visual"], ["visual", "model.visual"], ["lm_head"], ["re.*qkv"], [r"model\.visual\..*"], None])
def test_matcher_agrees_with_transformers(name, patterns):
    from transformers.quantizers.quantizers_utils import should_convert_module

    assert transformers_converts(name, patterns) == should_convert_module(name, patterns)


def test_bare_visual_does_not_protect_the_runtime_vision_tower():
    assert transformers_converts("model.visual.blocks.0.attn.qkv", ["visual"])
    assert not transformers_converts("model.visual.blocks.0.attn.qkv", ["visual", "model.visual"])


def test_marlin_conditions():
    shapes = {"l.0.self_attn.k_proj": (256, 128), "l.0.mlp.down_proj": (29568, 8192)}
    assert marlin_problems({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}, {}, 1) == []
    assert "sym=true" in marlin_problems({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False}, {}, 1)[0]
    assert "group_size 96" in marlin_problems({"quant_method": "gptq", "bits": 4, "group_size": 96, "sym": True}, {}, 1)[0]
    problems = marlin_problems({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}, shapes, 2)
    assert any("down_proj" in p for p in problems) and not any("k_proj" in p for p in problems)  # 72B's 29568
    padded = {"l.0.mlp.down_proj": (29696, 8192)}
    assert marlin_problems({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}, padded, 8) == []


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
    assert main(["inspect", str(bad)]) == 0
    assert "WARNING: transformers 5 would replace 10 vision linears" in capsys.readouterr().out
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
