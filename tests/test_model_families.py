"""Every supported family, as a tiny random model built from its transformers config class: capture + replay
reproduces the HF forward (Qwen3-VL with DeepStack active), and quantize -> export -> load gives the same logits."""

import copy

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import qvlquant
from qvlquant.checkpoint.export import export
from qvlquant.engine.loop import LoopPlan, capture_inputs, quantize_model
from qvlquant.families import family_for
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.layer import next_input
from qvlquant.quant.spec import QuantConfig, QuantSpec
from qvlquant.runtime.load import QuantLinear

TYPES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.mark.parametrize("model_type", TYPES)
def test_replay_reproduces_hf_forward(model_type):
    model = tiny_model(model_type)
    family = family_for(model.config.model_type)
    batch = tiny_batch(model)
    x = capture_inputs(model, family, [batch])[0]
    if model_type == "qwen3_vl":
        assert x.deepstack is not None and len(x.deepstack) == 2 and int(x.visual_pos_masks.sum()) == 8
    for i, layer in enumerate(model.get_submodule(family.decoder_layers)):
        x = next_input(i, layer, x)
    replayed = model.get_submodule(family.language_model).norm(x.hidden)
    with torch.no_grad():
        reference = model.model(**batch, use_cache=False).last_hidden_state
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(replayed[mask], reference[mask], rtol=1e-5, atol=1e-5)


def test_deepstack_matters_for_qwen3_vl():
    """Replay without the DeepStack re-injection does not match: the test above would catch its absence."""
    model = tiny_model("qwen3_vl")
    family = family_for("qwen3_vl")
    batch = tiny_batch(model)
    x = capture_inputs(model, family, [batch])[0]
    x.deepstack = None
    for i, layer in enumerate(model.get_submodule(family.decoder_layers)):
        x = next_input(i, layer, x)
    with torch.no_grad():
        reference = model.model(**batch, use_cache=False).last_hidden_state
    replayed = model.get_submodule(family.language_model).norm(x.hidden)
    assert (replayed - reference).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_export_load(model_type, method, tmp_path):
    model = tiny_model(model_type)
    family = family_for(model.config.model_type)
    batches = [tiny_batch(model, seed=s) for s in range(3)]
    q = copy.deepcopy(model)
    plan = LoopPlan(family=family, qcfg=QuantConfig(method, QuantSpec(4, 64, method == "gptq")),
                    pack_format=PackFormat.for_job(method), storage_dtype=torch.float32)
    result = quantize_model(q, batches, plan)
    assert len(result.weights) == 3 * 7
    export(q, None, result, tmp_path / "q", {})
    loaded, processor = qvlquant.load(tmp_path / "q")
    assert processor is None and sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 21
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, q(**batches[0]).logits, rtol=0, atol=1e-5)


def test_batch_of_four_gives_the_hessians_of_batch_one():
    from qvlquant.quant.apply import collect_hessians
    from qvlquant.quant.gptq import hessian

    model = tiny_model("qwen2_vl")
    family = family_for("qwen2_vl")
    lengths = (20, 14, 17, 11)
    together = capture_inputs(model, family, [tiny_batch(model, lengths)])
    alone = []
    for r, n in enumerate(lengths):
        full = tiny_batch(model, lengths)
        row = {k: full[k][r:r + 1, :n] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        row.update(pixel_values=full["pixel_values"][16 * r:16 * (r + 1)], image_grid_thw=full["image_grid_thw"][r:r + 1])
        alone += capture_inputs(model, family, [row])
    layer = model.get_submodule(family.decoder_layers)[0]
    groups = list(family.linear_groups)
    h4 = collect_hessians(layer, together, groups)
    h1 = collect_hessians(layer, alone, groups)
    for g in groups:
        assert h4[g][1] == h1[g][1] == sum(lengths)
        torch.testing.assert_close(hessian(*h4[g]), hessian(*h1[g]), rtol=1e-4, atol=1e-5)


def test_capture_marks_the_image_tokens(demo, demo_batches):
    from qvlquant.families import QWEN2_VL

    model, _ = demo
    for batch, x in zip(demo_batches, capture_inputs(model, QWEN2_VL, demo_batches)):
        expected = (batch["input_ids"] == model.config.image_token_id)
        assert torch.equal(x.vision_mask, expected)
    assert sum(int(x.vision_mask.sum()) for x in capture_inputs(model, QWEN2_VL, demo_batches)) > 0
