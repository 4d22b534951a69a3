"""demo/testbed.py: the outlier injection leaves the model's function unchanged and makes the chosen channels'
activations alpha times larger; the shipped test bed is the one its report describes."""

import copy
import json

import torch

from qvlquant.assets.paths import DATA_DIR, TESTBED_DIR
from qvlquant.eval.perplexity import token_stream
from qvlquant.tools.demo import testbed


def test_injection_preserves_the_function_and_scales_the_channels(demo, demo_batches):
    model, processor = demo
    cfg = model.config.text_config
    layers = lambda m: m.model.language_model.layers  # noqa: E731
    shared, inter = testbed.outlier_channels(cfg.hidden_size, cfg.intermediate_size, len(layers(model)), 4, 8)
    assert len(set(shared.tolist())) == 4 and all(len(set(c.tolist())) == 8 for c in inter)
    injected = copy.deepcopy(model)
    testbed.inject_outliers(layers(injected), 16.0, shared, inter)
    with torch.no_grad():
        for b in demo_batches:
            torch.testing.assert_close(injected(**b).logits, model(**b).logits, atol=2e-4, rtol=1e-4)
    stream = token_stream(processor.tokenizer, (DATA_DIR / "heldout.txt").read_text().splitlines()[:20])
    before = testbed.activation_ratio(model, stream, shared)
    after = testbed.activation_ratio(injected, stream, shared)
    assert abs(after / before - 16.0) < 1e-3 * 16  # the q_proj inputs of those channels: exactly 16x


def test_shipped_testbed_matches_its_report():
    report = json.loads((TESTBED_DIR / "testbed_report.json").read_text())
    config = json.loads((TESTBED_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and report["steps"] > 0
    rtn = {(r["bits"], r["group_size"]): r["perplexity"] for r in report["rtn"]}
    demo_rtn = {(r["bits"], r["group_size"]): r["perplexity"] for r in report["demo"]["rtn"]}
    w4 = rtn[(4, 128)] / report["perplexity"] - 1
    assert w4 > 2 * (demo_rtn[(4, 128)] / report["demo"]["perplexity"] - 1)  # more sensitive than the demo
    assert rtn[(8, 128)] < rtn[(4, 128)] < rtn[(3, 128)] < rtn[(2, 64)]


def test_testbed_is_a_model_name_like_demo():
    from qvlquant.engine.skeleton import resolve_model_path

    assert resolve_model_path("testbed") == TESTBED_DIR and (TESTBED_DIR / "model.safetensors").stat().st_size < 16e6
