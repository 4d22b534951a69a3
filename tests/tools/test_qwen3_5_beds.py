"""The Qwen3.5 demo beds (``qvlquant.tools.demo.train --family qwen3_5 / qwen3_5_moe``): each is a --model name like
'demo', loads through qvlquant.load with a tokenizer that splits text as its tokenizer.json does, answers easy-vqa
questions clearly better than the majority answer (scored here, not read from its report), and is the model its
report describes; the MoE's routing is uneven on the calibration text."""

import json

import pytest

from qvlquant.assets.paths import EMBEDDED_MODELS, MODEL_DIR
from qvlquant.tools.demo.train import BEDS

NAMES = {"demo-qwen3.5": "qwen3_5", "demo-qwen3.5-moe": "qwen3_5_moe"}
QUESTIONS = 64  # the first test questions; the majority answer ('yes') gets 35.9 % of them


def report(name: str) -> dict:
    return json.loads((EMBEDDED_MODELS[name] / "train_report.json").read_text())


@pytest.mark.parametrize("name, family", NAMES.items())
def test_bed_is_a_model_name_with_the_demos_image_processor(name, family):
    from qvlquant.engine.skeleton import read_model_type, resolve_model_path

    folder = resolve_model_path(name)
    assert folder == EMBEDDED_MODELS[name] == BEDS[family].output
    assert read_model_type(folder) == family
    assert (folder / "model.safetensors").stat().st_size < 24e6
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["image_processor"] == json.loads((MODEL_DIR / "processor_config.json").read_text())["image_processor"]
    assert (folder / "chat_template.jinja").read_bytes() == (MODEL_DIR / "chat_template.jinja").read_bytes()
    beds = [EMBEDDED_MODELS[n] / "tokenizer.json" for n in NAMES]
    assert beds[0].read_bytes() == beds[1].read_bytes()  # one tokenizer for both


@pytest.mark.parametrize("name", NAMES)
def test_the_tokenizer_transformers_loads_is_the_one_saved(name):
    """transformers rebuilds a Qwen3.5 folder's tokenizer (Qwen3_5Tokenizer: Qwen's regex, byte-level, NFC) from
    tokenizer.json's vocabulary alone; the beds' tokenizer is made in that form, so both split text alike (the
    demo's word-level tokenizer in such a folder turns every word into byte pieces the model never saw)."""
    import tokenizers
    from transformers import AutoTokenizer

    folder = EMBEDDED_MODELS[name]
    loaded, saved = AutoTokenizer.from_pretrained(folder), tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is the shape?<|im_end|>\n"
            "<|im_start|>assistant\nyes<|im_end|>\nReturn the value of X (or None), 42 times: Ünïcode \u00e9t\u00e9.")
    ids = loaded(text)["input_ids"]
    assert ids == saved.encode(text).ids and loaded.decode(ids) == text
    assert len(ids) < 60  # whole words, not bytes


@pytest.mark.parametrize("name, family", NAMES.items())
def test_bed_answers_better_than_the_majority_answer(name, family):
    import qvlquant
    from qvlquant.calib.easyvqa import load_split, majority_baseline
    from qvlquant.eval.easyvqa import evaluate

    model, processor = qvlquant.load(name)
    text = model.config.text_config
    assert model.config.model_type == family
    assert text.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    items = load_split("test")[:QUESTIONS]
    accuracy = evaluate(model, processor, items)["accuracy"]
    _, majority = majority_baseline(load_split("train"), items)
    assert accuracy > majority + 10, f"{name}: {accuracy:.1f} % of {QUESTIONS}, majority answer {majority:.1f} %"
    rec = report(name)
    assert rec["family"] == family and rec["easyvqa_test_accuracy"] > rec["majority_accuracy"] + 10
    assert rec["parameters"] == sum(p.numel() for p in model.parameters())
    assert rec["heldout_perplexity"] < 200  # of 2,048 BPE tokens (uniform: 2048)


def test_moe_bed_routes_unevenly():
    rec = report("demo-qwen3.5-moe")
    config = json.loads((EMBEDDED_MODELS["demo-qwen3.5-moe"] / "config.json").read_text())["text_config"]
    shares = rec["expert_token_share"]
    experts = config["num_experts"]
    assert len(shares) == config["num_hidden_layers"] and all(len(row) == experts for row in shares)
    assert all(abs(sum(row) - 100) < 0.1 for row in shares)
    even = 100 / experts
    assert max(max(row) for row in shares) > 2 * even  # some expert takes over twice its even share
    assert min(min(row) for row in shares) < even / 2  # and some gets under half of it: coverage matters
