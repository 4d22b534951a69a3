"""bitsandbytes baselines (issue 14 item 4): bnb-nf4 / bnb-int8 load a base through transformers'
BitsAndBytesConfig, keep the vision tower and lm_head in full precision, score beside the base, and say what to
install when bitsandbytes is missing."""

import sys

import pytest
import torch

from qvlquant.cli import main
from qvlquant.evaluation import (
    EvalConfig,
    evaluate_with_baseline,
    quantization_summary,
    recorded_base,
    weights_label,
)
from qvlquant.runtime.bnb import load_bnb, parse_bnb


@pytest.mark.parametrize("spec,parsed", [("bnb-nf4", ("bnb-nf4", "demo")), ("bnb-int8:/m/base", ("bnb-int8", "/m/base")),
                                         ("bnb-nf4:Qwen/Qwen2-VL-2B-Instruct", ("bnb-nf4", "Qwen/Qwen2-VL-2B-Instruct")),
                                         ("demo", None), ("out/bnb-nf4", None), ("bnb-nf8:demo", None)])
def test_specs(spec, parsed):
    assert parse_bnb(spec) == parsed


def test_a_spec_without_its_base_is_refused():
    with pytest.raises(ValueError, match="name the base after the colon"):
        parse_bnb("bnb-nf4:")


def test_the_base_of_a_bnb_model_is_its_baseline():
    assert recorded_base("bnb-int8:/m/base") == "/m/base" and recorded_base("bnb-nf4") == "demo"


def test_missing_bitsandbytes_is_one_line_naming_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    assert main(["eval", "--model", "bnb-nf4", "--base", "none", "--limit", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bnb-nf4 / bnb-int8 need bitsandbytes: pip install 'qvlquant[bnb]'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("kind,linear,label", [("bnb-nf4", "Linear4bit", "bnb NF4 (no calib)"),
                                               ("bnb-int8", "Linear8bitLt", "bnb int8 (no calib)")])
def test_loads_through_bitsandbytes_with_the_vision_tower_in_full_precision(kind, linear, label):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    model, processor = load_bnb(kind, "demo")
    assert type(model.model.language_model.layers[0].mlp.down_proj).__name__ == linear
    visual = [m for m in model.model.visual.modules() if isinstance(m, torch.nn.Linear)]
    assert len(visual) == 10 and all(type(m) is torch.nn.Linear for m in visual)
    assert type(model.lm_head) is torch.nn.Linear and processor is not None
    q = quantization_summary(model)
    assert q["quant_method"] == "bitsandbytes" and weights_label({"quantization": q}) == label


@pytest.mark.slow
def test_nf4_scores_beside_its_base():
    """Measured here (CPU, 64 questions): both 81.25 %; perplexity 34.163 (base) vs 34.26 (NF4)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    result = evaluate_with_baseline("bnb-nf4", EvalConfig(limit=64))
    s = result.summary
    assert s["baseline"]["model"] == "demo" and s["n"] == s["baseline"]["n"] == 64
    assert abs(s["delta_accuracy"]) <= 5.0
    assert s["baseline"]["perplexity"] < s["perplexity"] < 1.02 * s["baseline"]["perplexity"]
