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


def overview(text: str) -> dict[str, str]:
    """The Model overview table: property -> value."""
    rows = [line.split(" | ", 1) for line in section(text, "Model overview").splitlines()[2:]]
    return {key.strip("| "): value.rstrip(" |") for key, value in rows}


CORE_ROWS = ["Architecture", "Quantization", "Weights", "Activations", "Quantized modules", "Kept unquantized",
             "Stored as", "Calibration data", "Tool"]


def test_the_overview_is_the_same_readable_table_for_every_format(export):
    """Qwen's and Red Hat's cards open with a short overview: architecture, scheme, weights, activations, which modules
    in words, calibration, tool. The same rows for GPTQ and compressed-tensors (no flattened config keys), every
    value short, no Python reprs."""
    method, folder = export
    text = (folder / "README.md").read_text()
    rows = overview(text)
    assert [k for k in rows if k in CORE_ROWS] == CORE_ROWS
    assert len(rows) <= 12 and all(len(v) < 200 for v in rows.values()), rows
    assert not re.search(r"\b(True|False|None)\b|\[|\{|'|config_groups|group_0", section(text, "Model overview"))
    assert rows["Architecture"] == "Qwen2VLForConditionalGeneration (`qwen2_vl`), 4 decoder layers"
    assert rows["Weights"] == "INT4, groups of 128, symmetric"
    assert rows["Activations"] == "not quantized (weight-only)"
    assert rows["Tool"] == "qvlquant 0.1.0"
    calibration = json.loads((folder / "quantize_report.json").read_text())["calibration"]  # RTN: None, data-free
    assert rows["Calibration data"] == (f"2 samples from `demo` (seed 0), {calibration['tokens']} tokens, images "
                                        "bounded to 200704 pixels" if method == "gptq"
                                        else "none: round-to-nearest uses the weights alone")
    stored = {"gptq": "GPTQ v1 (`quant_method: gptq`)",
              "compressed-tensors": "compressed-tensors pack-quantized (`quant_method: compressed-tensors`)"}
    assert rows["Stored as"] == stored[method]


def test_quantized_modules_are_said_in_words_not_listed(export):
    """One cell listed every quantized module (28 for the demo, 560 for a 72B): now a sentence."""
    method, folder = export
    rows = overview((folder / "README.md").read_text())
    assert rows["Quantized modules"] == ("the 7 linear layers of each of the 4 decoder layers (self_attn q/k/v/o_proj, "
                                         "mlp gate/up/down_proj), 28 in all")
    assert rows["Kept unquantized"] == "the vision tower, the token embeddings and `lm_head`, in bfloat16"
    assert "layers.0" not in (folder / "README.md").read_text()


def test_a_72b_sized_report_still_fits_one_short_cell():
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
    report = {"layers": {f"model.language_model.layers.{i}.{n}": {} for i in range(80) for n in linears}}
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
              "text_config": {"num_hidden_layers": 80}, "quantization_config": {"quant_method": "awq", "bits": 4}}
    rows = overview(str(model_card(config, report, "me/x")))
    assert rows["Quantized modules"] == ("the 7 linear layers of each of the 80 decoder layers (self_attn "
                                         "q/k/v/o_proj, mlp gate/up/down_proj), 560 in all")


def test_act_order_is_said_when_the_run_used_it(export):
    """The GPTQ config says desc_act: false (static groups keep the stored order), yet act-order ran: the card reads
    the quantize report's config and says so."""
    method, folder = export
    report = json.loads((folder / "quantize_report.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    rows = overview((folder / "README.md").read_text())
    if method == "gptq":
        assert report["config"]["quant"]["desc_act"] and report["config"]["quant"]["static_groups"]
        assert rows["Act-order (static groups)"] == "yes"
        assert rows["Quantization"] == "GPTQ, damping 0.01, block size 128, true-sequential"
        report["config"]["quant"]["desc_act"] = False
        assert overview(str(model_card(config, report, "x")))["Act-order (static groups)"] == "no"
        report["config"]["quant"].update(desc_act=True, static_groups=False)
        assert overview(str(model_card(config, report, "x")))["Act-order (static groups)"] == "yes, dynamic groups (g_idx)"
    else:
        assert "Act-order (static groups)" not in rows  # round-to-nearest orders nothing
        assert rows["Quantization"] == "RTN (round-to-nearest)"


def test_the_evaluation_section_says_how_to_fill_it_when_there_is_none(export):
    method, folder = export
    text = (folder / "README.md").read_text()
    assert section(text, "Evaluation").startswith("Not yet run: `qvlquant eval --model DIR --report eval.json`, then "
                                                  "`qvlquant push DIR --repo OWNER/NAME --eval eval.json`")
    report = json.loads((folder / "quantize_report.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    evaluated = {"task": "easyvqa", "model": "q", "accuracy": 77.5, "n": 100, "perplexity": 34.3,
                 "baseline": {"task": "easyvqa", "model": "demo", "accuracy": 77.9, "n": 100, "perplexity": 34.16}}
    table = section(str(model_card(config, report, "x", evaluated)), "Evaluation")
    assert "| demo | easyvqa | 77.90 | 100 | 34.160 |" in table and "Not yet run" not in table


def test_sections_in_the_order_of_qwens_and_red_hats_cards(export):
    method, folder = export
    titles = re.findall(r"^## (.+)$", (folder / "README.md").read_text(), re.M)
    assert titles == ["Model overview", "Deployment", "Evaluation"]


def test_the_snippets_image_is_one_qvlquants_loader_and_the_processor_accept(export, tmp_path, monkeypatch):
    """The snippet's message is in the Qwen2-VL README format that calibration samples use ({"type": "image",
    "image": path}); its "path" key was refused by qvlquant's sample check."""
    from qvlquant.calib.images import load_image
    from qvlquant.calib.samples import image_source, validate_sample

    method, folder = export
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    messages_code = re.search(r"^messages = .*?^\]\}\]$", code, re.S | re.M).group(0)
    namespace: dict = {}
    exec(messages_code, namespace)
    messages = namespace["messages"]
    validate_sample(messages, "the card's snippet")
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "example.jpg")
    image = next(item for item in messages[0]["content"] if item["type"] == "image")
    assert load_image(image_source(image)).size == (56, 56)


def test_requirements_follow_the_format_and_no_links(export):
    method, folder = export
    usage = section((folder / "README.md").read_text(), "Deployment")
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
    usage = section(str(model_card(config, report, "me/x")), "Deployment")
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


@pytest.mark.slow
def test_the_card_snippet_chats_with_a_default_rtn_export(tmp_path, monkeypatch):
    pytest.importorskip("gptqmodel", reason="the interop extra (gptqmodel, optimum) is not installed")
    out = tmp_path / "demo-rtn"
    assert main(["quantize", "--bits", "4", "--num-samples", "2", "--output", str(out)]) == 0
    ns = run_snippet(out, tmp_path, monkeypatch)
    assert ns["output"].shape[1] > ns["inputs"]["input_ids"].shape[1]
