"""Calibrated INT8 W8A8 on the demo (``--scheme W8A8 --method gptq|rtn --smoothing-strength``): SmoothQuant then GPTQ
or round-to-nearest, written in the data-free W8A8's layout and config, run by ``qvlquant.load`` with the served
numerics (int8 activations per token), and no worse than data-free W8A8."""

import json

import pytest
import torch

from qvlquant.assets.paths import EMBEDDED_MODELS
from qvlquant.checkpoint.qconfig import read_quantization_config
from qvlquant.families import QWEN2_VL
from qvlquant.quant.formats import Int8Format
from qvlquant.storage.manifest import verify_manifest
from qvlquant.storage.shards import ShardReader

RUNS = {"datafree": {},
        "rtn_off": {"method": "rtn", "smoothing_strength": "off"},
        "gptq_auto": {"method": "gptq", "smoothing_strength": "auto"}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """run -> the demo's W8A8 export (the calibrated ones on 8 of the demo's chats)."""
    from qvlquant.api import quantize

    root = tmp_path_factory.mktemp("w8a8_calibrated")
    for name, settings in RUNS.items():
        quantize(output=str(root / name), scheme="W8A8", **(dict(settings, num_samples=8) if settings else {}))
    return {name: root / name for name in RUNS}


def report_of(folder) -> dict:
    return json.loads((folder / "quantize_report.json").read_text())


def test_no_smoothing_and_round_to_nearest_writes_the_data_free_tensors(exports):
    """The calibrated path with nothing to calibrate is the data-free export, tensor for tensor: the same layout
    (int8 weight, bf16 weight_scale per channel), codes, scales and copied tensors, through the layer loop."""
    ours, free = ShardReader(exports["rtn_off"]), ShardReader(exports["datafree"])
    assert set(ours.keys()) == set(free.keys())
    for key in free.keys():
        assert ours.meta(key) == free.meta(key) and torch.equal(ours.get(key), free.get(key)), key


def test_smoothed_gptq_export_has_the_data_free_layout_and_config(exports):
    out, free = ShardReader(exports["gptq_auto"]), ShardReader(exports["datafree"])
    base = ShardReader(EMBEDDED_MODELS["demo"])
    assert set(out.keys()) == set(free.keys())
    for key in free.keys():
        assert out.meta(key) == free.meta(key), key
    qc = json.loads((exports["gptq_auto"] / "config.json").read_text())["quantization_config"]
    free_qc = json.loads((exports["datafree"] / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in qc.items() if k != "meta"} == {k: v for k, v in free_qc.items() if k != "meta"}
    assert qc["meta"]["method"] == "gptq" and qc["meta"]["smoothing_strength"] == "auto"
    quant = read_quantization_config(qc, "config.json")
    assert quant.pack_format is Int8Format.CHANNEL and quant.summary()["weights"] == "int8_w8a8"
    report = report_of(exports["gptq_auto"])
    groups = report["smoothing"]["groups"]
    assert report["scheme"] == "W8A8" and report["rounding"] == "gptq" and report["smoothing"]["strength"] == "auto"
    assert len(groups) == 4 * 3  # per layer: input_layernorm, post_attention_layernorm, up_proj (v -> o: GQA)
    assert all(a == "off" or 0.0 <= a <= 1.0 for a in groups.values()) and any(a != "off" for a in groups.values())
    for group, alpha in groups.items():  # a smoothed norm is stored smoothed; vision, embeddings stay the base's
        if group.endswith("layernorm"):
            key = QWEN2_VL.to_disk(group + ".weight")
            assert torch.equal(out.get(key), base.get(key)) == (alpha == "off"), group
    assert torch.equal(out.get("model.embed_tokens.weight"), base.get("model.embed_tokens.weight"))
    layer = report["layers"]["model.language_model.layers.0.self_attn.q_proj"]
    assert layer["smoothed_by"] == "input_layernorm" and layer["tokens"] > 0 and "smoothing_loss" in layer
    assert report["calibration"]["num_samples"] == 8
    verify_manifest(exports["gptq_auto"])


def test_loads_with_the_served_numerics_and_is_no_worse_than_data_free(exports, demo, demo_batches):
    """qvlquant.load runs W8A8Linear (int8 per token, then int8 codes times both scales); the mean KL to the BF16
    demo over the batches is at most data-free W8A8's (measured on these batches: 2.3e-4 data-free, 1.6e-4
    SmoothQuant auto + GPTQ)."""
    import qvlquant
    from qvlquant.quant.int8 import w8a8_linear
    from qvlquant.runtime.w8a8 import W8A8Linear

    base, _ = demo
    with torch.no_grad():
        refs = [base(**b, use_cache=False).logits for b in demo_batches]

    def mean_kl(model) -> float:
        total, n = 0.0, 0
        with torch.no_grad():
            for b, ref in zip(demo_batches, refs):
                m = b["attention_mask"].bool()
                p, q = torch.log_softmax(ref[m].float(), -1), torch.log_softmax(model(**b, use_cache=False).logits[m].float(), -1)
                total, n = total + float((p.exp() * (p - q)).sum()), n + int(m.sum())
        return total / n

    kl = {}
    for name in ("datafree", "gptq_auto"):
        model, _ = qvlquant.load(exports[name])
        linears = {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
        assert len(linears) == 28 and not any(n.startswith("model.visual") for n in linears)
        down = model.model.language_model.layers[2].mlp.down_proj
        x = torch.randn(3, down.in_features) * 4
        torch.testing.assert_close(down(x), w8a8_linear(x, down.weight, down.weight_scale, down.bias), rtol=0, atol=0)
        kl[name] = mean_kl(model)
    assert kl["gptq_auto"] < 1e-3 and kl["gptq_auto"] <= kl["datafree"], kl


def test_the_card_names_smoothquant_and_the_rounding(exports):
    card = (exports["gptq_auto"] / "README.md").read_text()
    assert "| Quantization | INT8 W8A8 (W8A8), SmoothQuant (strength auto) and gptq on calibration data |" in card
    assert "8 samples from `demo`" in card


def test_a_run_stopped_by_max_layers_resumes_to_the_same_export(exports, tmp_path):
    """--max-layers leaves a partial run (smoothed, quantized layers on disk); the rerun finishes it and writes
    what one uninterrupted run writes."""
    from qvlquant.api import quantize

    out, settings = tmp_path / "resumed", dict(RUNS["gptq_auto"], num_samples=8)
    partial = quantize(output=str(out), scheme="W8A8", max_layers=2, **settings)
    assert not partial["complete"] and not out.exists() and len(partial["layer_seconds"]) == 2
    quantize(output=str(out), scheme="W8A8", **settings)
    ours, straight = ShardReader(out), ShardReader(exports["gptq_auto"])
    assert set(ours.keys()) == set(straight.keys())
    for key in straight.keys():
        assert torch.equal(ours.get(key), straight.get(key)), key
    assert report_of(out)["smoothing"] == report_of(exports["gptq_auto"])["smoothing"]


def test_moe_experts_that_some_batches_never_reach_are_smoothed_from_the_ones_that_do(tmp_path):
    """demo-qwen3.5-moe: each routed expert sees only some batches (none for some experts); SmoothQuant smooths each
    expert's up -> down from the tokens routed to it, and the export holds every decoder linear in int8."""
    import qvlquant
    from qvlquant.runtime.w8a8 import W8A8Linear

    out = tmp_path / "moe"
    report = qvlquant.quantize(output=str(out), model="demo-qwen3.5-moe", scheme="W8A8", method="rtn",
                               smoothing_strength="0.8", num_samples=4)
    groups = report["smoothing"]["groups"]
    assert any(".mlp.experts." in g for g in groups) and any(".shared_expert." in g for g in groups)
    model, _ = qvlquant.load(out)
    int8 = [n for n, m in model.named_modules() if isinstance(m, W8A8Linear)]
    assert len(int8) == len(report["layers"]) and any(".experts." in n for n in int8)
