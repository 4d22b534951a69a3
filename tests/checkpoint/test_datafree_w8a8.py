"""Data-free INT8 W8A8 export of the demo: what is written, read back through the one reader, by compressed-tensors
and by transformers."""

import json

import pytest
import torch

from qvlquant.assets.paths import EMBEDDED_MODELS
from qvlquant.checkpoint.datafree import is_fp8_linear
from qvlquant.checkpoint.qconfig import read_quantization_config
from qvlquant.families import QWEN2_VL
from qvlquant.quant.formats import Int8Format
from qvlquant.storage.manifest import verify_manifest
from qvlquant.storage.shards import ShardReader


@pytest.fixture(scope="module")
def w8a8_export(tmp_path_factory):
    from qvlquant.api import quantize

    out = tmp_path_factory.mktemp("w8a8") / "W8A8"
    quantize(output=str(out), scheme="W8A8")
    return out


def test_linears_hold_the_int8_of_the_base_weights_and_the_rest_is_copied_bit_for_bit(w8a8_export):
    out, base = ShardReader(w8a8_export), ShardReader(EMBEDDED_MODELS["demo"])
    quantized = [k[: -len(".weight")] for k in base.keys() if is_fp8_linear(QWEN2_VL, QWEN2_VL.to_runtime(k))]
    assert len(quantized) == 28
    assert set(out.keys()) == set(base.keys()) | {m + ".weight_scale" for m in quantized}
    for module in quantized:
        packed = Int8Format.CHANNEL.pack(base.get(module + ".weight"), scale_dtype=torch.bfloat16)  # the demo's
        assert out.meta(module + ".weight") == (torch.int8, base.meta(module + ".weight")[1])
        assert torch.equal(out.get(module + ".weight"), packed["weight"])
        assert torch.equal(out.get(module + ".weight_scale"), packed["weight_scale"])
        assert out.meta(module + ".weight_scale")[0] == torch.bfloat16  # as llm-compressor stores it
    for key in set(base.keys()) - {m + ".weight" for m in quantized}:  # vision, embeddings, norms, biases
        assert out.meta(key) == base.meta(key) and torch.equal(out.get(key), base.get(key)), key


def test_config_is_compressed_tensors_w8a8_and_reads_back(w8a8_export):
    config = json.loads((w8a8_export / "config.json").read_text())
    qc = config["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == group["format"] == "int-quantized"
    w, a = group["weights"], group["input_activations"]
    assert (w["type"], w["num_bits"], w["strategy"], w["symmetric"], w["dynamic"]) == ("int", 8, "channel", True, False)
    assert (a["type"], a["num_bits"], a["strategy"], a["symmetric"], a["dynamic"]) == ("int", 8, "token", True, True)
    assert group["targets"] == ["Linear"] and qc["ignore"] == QWEN2_VL.compressed_ignore()
    quant = read_quantization_config(qc, "config.json")
    assert quant.pack_format is Int8Format.CHANNEL and quant.checkpoint_format == "int-quantized"
    assert quant.summary()["weights"] == "int8_w8a8" and quant.spec.bits == 8 and quant.spec.group_size == -1
    assert quant.spec_for("model.visual.blocks.0.mlp.fc1") is None
    report = json.loads((w8a8_export / "quantize_report.json").read_text())
    assert report["scheme"] == "W8A8" and report["method"] == "int8" and report["calibration"] is None
    assert len(report["layers"]) == 28 and config["dtype"] == "bfloat16"
    verify_manifest(w8a8_export)


@pytest.mark.parametrize("field,value,message", [
    ("input_activations.dynamic", False, r"input_activations\.dynamic is False; qvlquant reads int-quantized W8A8"),
    ("input_activations.symmetric", False, r"input_activations\.symmetric is False"),
    ("input_activations.strategy", "tensor", r"input_activations\.strategy is 'tensor'"),
    ("weights.strategy", "tensor", r"weights\.strategy is 'tensor'"),
    ("input_activations", None, r"input_activations is missing"),
])
def test_int_quantized_configs_qvlquant_does_not_run_are_refused_naming_the_field(w8a8_export, field, value, message):
    qc = json.loads((w8a8_export / "config.json").read_text())["quantization_config"]
    where, _, key = field.rpartition(".")
    target = qc["config_groups"]["group_0"]
    (target[where] if where else target)[key] = value
    with pytest.raises(ValueError, match=r"config.json: quantization_config\.config_groups\.group_0\." + message):
        read_quantization_config(qc, "config.json")


def test_compressed_tensors_decompresses_to_qvlquants_weights(w8a8_export):
    ct = pytest.importorskip("compressed_tensors", reason="the interop extra (compressed-tensors) is not installed")
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    group = json.loads((w8a8_export / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                input_activations=group["input_activations"])
    assert IntQuantizationCompressor.can_compress(torch.nn.Linear, scheme)  # the compressor it picks for W8A8
    out = ShardReader(w8a8_export)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        stored = {"weight": out.get(module + ".weight"), "weight_scale": out.get(module + ".weight_scale")}
        theirs = IntQuantizationCompressor.decompress(stored, scheme)["weight"]
        # it decompresses into the scale's dtype (the model's, bf16): exactly qvlquant's product, rounded once
        assert theirs.dtype == torch.bfloat16, ct.__version__
        assert torch.equal(theirs, Int8Format.CHANNEL.unpack(stored).bfloat16()), (module, ct.__version__)


def test_transformers_loads_the_export_on_a_cpu_with_qvlquants_weights(w8a8_export):
    """transformers 5.24 on a CPU through compressed-tensors: the layer's weight (decompressed, or int8 beside its
    scale when it keeps the compressed form) is qvlquant's, and the model runs."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(w8a8_export, device_map="cpu")
    state = model.model.language_model.layers[2].mlp.down_proj.state_dict()
    out = ShardReader(w8a8_export)
    key = "model.layers.2.mlp.down_proj"
    ours = Int8Format.CHANNEL.unpack({t: out.get(f"{key}.{t}") for t in ("weight", "weight_scale")})
    theirs = Int8Format.CHANNEL.unpack(state) if state["weight"].dtype == torch.int8 else state["weight"]
    assert torch.equal(theirs.bfloat16(), ours.bfloat16())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[10, 11, 12, 13]])).logits
    assert bool(torch.isfinite(logits).all())


def test_inspect_reads_the_export(w8a8_export):
    """28 quantized linears (int8 weight beside its scale), none misdescribed, the vision tower's full precision,
    and vLLM (its own classes where installed, else the copied rules) quantizing none of it."""
    from qvlquant.checkpoint.inspection import inspect_checkpoint

    report = inspect_checkpoint(w8a8_export)
    assert report["verification"]["status"] == "verified" and report["quantized_linears"] == 28
    assert report["module_settings"] == {"INT8 per-channel, dynamic per-token int8 activations": 28}
    assert report["vision_linears"] == 10 and report["vision_exposed_in_transformers"] == []
    assert report["quantization"]["weights"] == "int8_w8a8"
    assert report["vllm"]["vision_quantized"] == [] and report["marlin"][1] == []


def test_the_card_names_the_format_and_the_hardware(w8a8_export):
    card = (w8a8_export / "README.md").read_text()
    assert "| Quantization | INT8 W8A8 (W8A8), data-free round-to-nearest |" in card
    assert "| Activations | INT8, symmetric, dynamic" in card
    assert "INT8 tensor cores (Ampere and newer" in card and "CUTLASS int8" in card
    assert "compressed-tensors int-quantized" in card
