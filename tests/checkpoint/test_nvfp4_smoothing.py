"""NVFP4 W4A4 with SmoothQuant (``--scheme NVFP4``, its default ``--smoothing-strength``): the calibration pass folds
the calibrated W8A8's smoothing (``quant.apply.smooth_layer``) into each decoder layer before observing it
(``engine.calibration.Smoothing``), and the export replays the same fold onto the checkpoint's tensors as it streams
them (``checkpoint.datafree.SmoothedTensors``)."""

import copy
import json

import pytest
import torch

from qvlquant.assets.paths import EMBEDDED_MODELS
from qvlquant.checkpoint.datafree import SmoothedTensors, quantized_linears
from qvlquant.checkpoint.export import CheckpointTensors
from qvlquant.config import DEFAULT_NVFP4_SMOOTHING
from qvlquant.engine.calibration import Smoothing, input_ranges
from qvlquant.families import QWEN2_VL
from qvlquant.storage.shards import EXPORT_DTYPES, ShardReader

LAYERS = "model.language_model.layers"
# the groups SmoothQuant folds in each of the demo's layers: v_proj -> o_proj is left out (GQA: no per-channel fold)
FOLDED_INTO = ("input_layernorm", "post_attention_layernorm", "mlp.up_proj")


def logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b, use_cache=False).logits[b["attention_mask"].bool()] for b in batches])


@pytest.fixture(scope="module")
def smoothed(demo, demo_batches):
    """(the demo smoothed in place by the calibration pass at strength 0.5, its Smoothing record, its ranges)."""
    model = copy.deepcopy(demo[0])
    smoothing = Smoothing(0.5, torch.bfloat16)
    ranges = input_ranges(model, demo_batches, QWEN2_VL, quantized_linears(model, QWEN2_VL), prepare=smoothing)
    return model, smoothing, ranges


def test_the_fold_moves_the_outliers_and_leaves_the_float_model_unchanged(demo, demo_batches, smoothed):
    base, _ = demo
    model, smoothing, ranges = smoothed
    assert smoothing.groups == {f"{LAYERS}.{i}.{name}": 0.5 for i in range(4) for name in FOLDED_INTO}
    plain = input_ranges(base, demo_batches, QWEN2_VL, quantized_linears(base, QWEN2_VL))
    for i in range(4):  # each smoothed input's largest value shrinks (what W4A4's activation grid has to cover)
        for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
            key = f"{LAYERS}.{i}.{name}"
            assert ranges.amax[key] < plain.amax[key], key
        norm = f"{LAYERS}.{i}.input_layernorm.weight"
        assert not torch.equal(model.get_parameter(norm), base.get_parameter(norm))
    want, got = logits(base, demo_batches), logits(model, demo_batches)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()  # the same function to float rounding


def test_the_export_reads_the_checkpoint_with_the_very_fold_the_layers_got(smoothed):
    """Every decoder-layer tensor the export reads equals the smoothed layer's: a scaled linear's weight exactly
    in float32 (columns, then a previous linear's rows, in the order they were folded), a norm as stored; the
    rest of the checkpoint unchanged."""
    model, smoothing, _ = smoothed
    base = CheckpointTensors(ShardReader(EMBEDDED_MODELS["demo"]), QWEN2_VL, torch.bfloat16)
    tensors = SmoothedTensors(base, smoothing)
    scaled = 0
    for name, held in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings: not in the checkpoint
            continue
        got = tensors.get(name)
        if name in smoothing.scales:
            scaled += 1
            assert got.dtype == torch.float32 and torch.equal(got, held), name
        else:
            assert got.dtype == torch.bfloat16 and torch.equal(got, held.to(torch.bfloat16)), name
            assert torch.equal(got, base.get(name)) == (name not in smoothing.replaced), name
    assert scaled == 4 * 6  # q, k, v, gate, up (columns; up also its rows) and down per layer; o_proj not


@pytest.fixture(scope="module")
def testbed_exports(tmp_path_factory):
    """--scheme NVFP4 on the test bed (outlier channels) with its default smoothing and with it off."""
    from qvlquant.api import quantize

    root = tmp_path_factory.mktemp("nvfp4-smoothing")
    for strength in (None, "off"):
        out = root / str(strength)
        quantize(output=str(out), model="testbed", scheme="NVFP4", num_samples=16,
                 **({} if strength is None else {"smoothing_strength": strength}))
    return {"default": root / "None", "off": root / "off"}


def test_smoothing_cuts_the_served_w4a4_error_on_outlier_channels(testbed_exports, demo_batches):
    """The served numerics (NVFP4 activations per 16 inputs) of the smoothed export stay closer to the BF16 test bed
    than those of the unsmoothed one: the norms written are the smoothed ones and the weights were quantized
    smoothed. The report names the strength and the groups."""
    import qvlquant

    base, _ = qvlquant.load("testbed")
    want = logits(base, demo_batches)
    errors = {}
    for kind, folder in testbed_exports.items():
        model, _ = qvlquant.load(folder)
        errors[kind] = float((logits(model, demo_batches) - want).pow(2).mean())
    assert errors["default"] < 0.5 * errors["off"], errors
    reader, plain = ShardReader(testbed_exports["default"], dtypes=EXPORT_DTYPES), ShardReader(EMBEDDED_MODELS["testbed"])
    off = ShardReader(testbed_exports["off"], dtypes=EXPORT_DTYPES)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(off.get(norm), plain.get(norm)) and not torch.equal(reader.get(norm), plain.get(norm))
    report = json.loads((testbed_exports["default"] / "quantize_report.json").read_text())
    assert report["smoothing"]["strength"] == DEFAULT_NVFP4_SMOOTHING
    assert len(report["smoothing"]["groups"]) == 4 * len(FOLDED_INTO)
    assert json.loads((testbed_exports["off"] / "quantize_report.json").read_text())["smoothing"] == {
        "strength": "off", "groups": {}}
    cards = {kind: (folder / "README.md").read_text() for kind, folder in testbed_exports.items()}
    assert (f"| Quantization | NVFP4 (NVFP4), SmoothQuant (strength {DEFAULT_NVFP4_SMOOTHING}) then round-to-nearest "
            "weights, activation scales from calibration |") in cards["default"]
    assert "| Quantization | NVFP4 (NVFP4), round-to-nearest weights, activation scales from calibration |" in cards["off"]
