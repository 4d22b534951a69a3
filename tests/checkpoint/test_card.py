"""The model card every export carries (issue 14 item 3): a standard hub card (parsed by huggingface_hub), the right
requirements per format, no links, and a chat-and-generate snippet that runs against the export."""

import json
import re

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image

from qvlquant.checkpoint.card import (
    base_card,
    calibration_dataset,
    cell,
    looks_like_hub_id,
    model_card,
)
from qvlquant.cli import main
from qvlquant.storage.manifest import read_manifest, verify_manifest

FORMATS = {  # quantize flags -> the export's quant_method
    "gptq": ["--method", "gptq"],
    "compressed-tensors": ["--format", "compressed-tensors"],
}


@pytest.fixture(scope="module", params=list(FORMATS))
def export(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / f"demo-{request.param}"
    assert main(["quantize", *FORMATS[request.param], "--bits", "4", "--num-samples", "2", "--output", str(out)]) == 0
    return request.param, out


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip() + "\n"


def test_every_export_carries_a_standard_card(export):
    method, folder = export
    text = (folder / "README.md").read_text(encoding="utf-8")
    verify_manifest(folder)
    assert "README.md" in read_manifest(folder)  # written before the manifest, so it is covered
    data = ModelCard(text).data.to_dict()  # huggingface_hub parses the metadata
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    assert {"qvlquant", method, "4-bit", "qwen2_vl"} <= set(data["tags"])
    assert "base_model" not in data and "base_model_relation" not in data  # 'demo' is no hub id
    assert ModelCardData(**data).to_dict() == data  # a round trip through the hub's own data class


def test_settings_are_a_table_in_json_spelling(export):
    method, folder = export
    settings = section((folder / "README.md").read_text(), "Quantization settings")
    rows = [line for line in settings.splitlines() if line.startswith("| `")]
    assert settings.startswith("| setting | value |\n|---|---|\n") and len(rows) >= 6
    assert not re.search(r"\b(True|False|None)\b|\[|\{|'", settings)  # no Python reprs
    if method == "gptq":
        assert "| `bits` | 4 |" in rows and "| `desc_act` | false |" in rows
        assert "| `modules_to_not_convert` | visual, model.visual, lm_head |" in rows
    else:
        assert "| `config_groups.group_0.weights.num_bits` | 4 |" in rows and "| `format` | pack-quantized |" in rows


def test_requirements_follow_the_format_and_no_links(export):
    method, folder = export
    usage = section((folder / "README.md").read_text(), "Usage")
    needs = re.search(r"`pip install ([^`]+)`", usage).group(1).split()
    assert {"transformers", "accelerate"} <= set(needs)
    if method == "gptq":
        assert {"optimum", "gptqmodel"} <= set(needs) and "compressed-tensors" not in needs
    else:
        assert "compressed-tensors" in needs and "gptqmodel" not in needs and "optimum" not in needs
    assert re.findall(r"https?://|www\.", (folder / "README.md").read_text()) == []  # no speculative links


def run_snippet(folder, workdir, monkeypatch) -> dict:
    """The card's python block, run as written against the export (its id replaced by the folder, 4 new tokens)."""
    text = (folder / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert f'model_id = "{folder.name}"' in code and "max_new_tokens=64" in code
    code = code.replace(f'model_id = "{folder.name}"', f"model_id = {str(folder)!r}")
    monkeypatch.chdir(workdir)
    Image.new("RGB", (56, 56), (200, 30, 30)).save(workdir / "example.jpg")  # the snippet's local image
    namespace: dict = {}
    exec(compile(code.replace("max_new_tokens=64", "max_new_tokens=4"), "README.md", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_the_card_snippet_chats_with_the_export(export, tmp_path, monkeypatch):
    pytest.importorskip("gptqmodel", reason="the interop extra (gptqmodel, optimum) is not installed")
    method, folder = export
    ns = run_snippet(folder, tmp_path, monkeypatch)
    prompt = ns["inputs"]["input_ids"].shape[1]
    assert ns["inputs"]["pixel_values"].numel() > 0  # the image went in
    assert ns["output"].shape[1] - prompt in range(1, 5)  # and it generated (up to 4 tokens, eos may stop it)
    visual = [m for m in ns["model"].model.visual.modules() if isinstance(m, torch.nn.Linear)]
    assert visual and all(type(m) is torch.nn.Linear for m in visual)  # the vision tower stays full precision


def test_local_base_names_the_hub_id_its_config_records(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2-VL-2B-Instruct"}))
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tongyi-qianwen\n---\n# base\n")
    config = {"model_type": "qwen2_vl", "quantization_config": {"quant_method": "awq", "bits": 4}}
    report = {"base_model": str(base), "calibration": {"source": "hf:lmms-lab/flickr30k", "num_samples": 8}}
    data = ModelCard(str(model_card(config, report, "me/x"))).data.to_dict()
    assert data["base_model"] == "Qwen/Qwen2-VL-2B-Instruct" and data["base_model_relation"] == "quantized"
    assert data["license"] == "other" and data["license_name"] == "tongyi-qianwen"
    assert data["datasets"] == ["lmms-lab/flickr30k"]
    usage = section(str(model_card(config, report, "me/x")), "Usage")
    assert "`pip install transformers accelerate gptqmodel`" in usage  # AWQ: gptqmodel, no optimum


def test_local_base_falls_back_to_its_cards_base_model_and_omits_paths(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/checkpoints/run3"}))  # a path
    (base / "README.md").write_text("---\nbase_model: Qwen/Qwen2.5-VL-7B-Instruct\nlicense: apache-2.0\n---\n")
    assert base_card(str(base)) == ("Qwen/Qwen2.5-VL-7B-Instruct", {"base_model": "Qwen/Qwen2.5-VL-7B-Instruct",
                                                                    "license": "apache-2.0"})
    (base / "README.md").write_text("no card metadata here\n")
    assert base_card(str(base)) == (None, {})
    assert base_card("demo") == (None, {}) and base_card("") == (None, {})


@pytest.mark.parametrize("name,hub", [("Qwen/Qwen2-VL-2B-Instruct", True), ("a/b.c-d_e", True), ("demo", False),
                                      ("/abs/path", False), ("./x/y", False), ("a/../b", False), ("a/b/c", False),
                                      (None, False)])
def test_hub_ids(name, hub):
    assert looks_like_hub_id(name) is hub


def test_calibration_dataset_only_for_hub_sources():
    assert calibration_dataset("hf:lmms-lab/flickr30k") == "lmms-lab/flickr30k"
    assert calibration_dataset("hf:./local/data") is None and calibration_dataset("demo") is None


def test_cells_are_json_spelled():
    assert cell(True) == "true" and cell(None) == "null" and cell(0.1) == "0.1" and cell("a|b") == "a\\|b"
    assert cell([["q", "k"], ["o"]]) == "q, k / o" and cell([]) == "(none)"


@pytest.mark.slow
def test_the_card_snippet_chats_with_a_default_rtn_export(tmp_path, monkeypatch):
    pytest.importorskip("gptqmodel", reason="the interop extra (gptqmodel, optimum) is not installed")
    out = tmp_path / "demo-rtn"
    assert main(["quantize", "--bits", "4", "--num-samples", "2", "--output", str(out)]) == 0
    ns = run_snippet(out, tmp_path, monkeypatch)
    assert ns["output"].shape[1] > ns["inputs"]["input_ids"].shape[1]
