"""Data-free NVFP4A16 exports of the demo: what is written, read back through the one reader, by compressed-tensors,
and run by ``qvlquant.load``."""

import json

import pytest
import torch

from qvlquant.checkpoint.datafree import fused_siblings, is_fp8_linear
from qvlquant.checkpoint.qconfig import read_quantization_config
from qvlquant.families import QWEN2_VL
from qvlquant.quant import nvfp4
from qvlquant.quant.formats import Nvfp4Format
from qvlquant.storage.shards import EXPORT_DTYPES, ShardReader

FMT = Nvfp4Format.PACKED
TENSORS = ("weight_packed", "weight_scale", "weight_global_scale")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from qvlquant.api import quantize

    out = tmp_path_factory.mktemp("nvfp4") / "NVFP4A16"
    quantize(output=str(out), scheme="NVFP4A16")
    return out


def demo_reader():
    from qvlquant.assets.paths import EMBEDDED_MODELS

    return ShardReader(EMBEDDED_MODELS["demo"])


def stored(out: ShardReader, module: str) -> dict:
    return {t: out.get(f"{module}.{t}") for t in TENSORS}


def test_fused_siblings_are_the_linears_vllm_fuses():
    head = "model.language_model.layers.2."
    assert fused_siblings(QWEN2_VL, head + "self_attn.k_proj.weight") == [
        head + p + ".weight" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    assert fused_siblings(QWEN2_VL, head + "mlp.up_proj.weight") == [head + "mlp.gate_proj.weight",
                                                                     head + "mlp.up_proj.weight"]
    assert fused_siblings(QWEN2_VL, head + "mlp.down_proj.weight") == [head + "mlp.down_proj.weight"]


def test_linears_hold_the_nvfp4_of_the_base_weights_and_the_rest_is_copied_bit_for_bit(export):
    out, base = ShardReader(export, dtypes=EXPORT_DTYPES), demo_reader()
    quantized = [k[: -len(".weight")] for k in base.keys() if is_fp8_linear(QWEN2_VL, QWEN2_VL.to_runtime(k))]
    assert len(quantized) == 28
    expected = set(base.keys()) - {m + ".weight" for m in quantized}
    assert set(out.keys()) == expected | {f"{m}.{t}" for m in quantized for t in TENSORS}
    for module in quantized:
        siblings = fused_siblings(QWEN2_VL, QWEN2_VL.to_runtime(module + ".weight"))
        amax = max(base.get(QWEN2_VL.to_disk(s)).float().abs().max() for s in siblings)
        packed = FMT.pack(base.get(module + ".weight"), module, nvfp4.global_scale(amax))
        got = stored(out, module)
        assert {t: (v.dtype, tuple(v.shape)) for t, v in got.items()} == \
            {t: (dt, s) for t, (s, dt) in FMT.tensor_shapes(*reversed(base.meta(module + ".weight")[1])).items()}
        assert torch.equal(got["weight_packed"], packed["weight_packed"])
        assert torch.equal(got["weight_scale"].view(torch.uint8), packed["weight_scale"].view(torch.uint8))
        assert torch.equal(got["weight_global_scale"], packed["weight_global_scale"])
    for key in expected:  # vision, embeddings, norms, biases
        assert out.meta(key) == base.meta(key) and torch.equal(out.get(key), base.get(key)), key


def test_the_linears_vllm_fuses_share_one_global_scale(export):
    """vLLM keeps the largest global scale of a fused layer's shards for all of them: unequal ones would scale the
    other shards' weights wrongly, so q/k/v and gate/up are written with one."""
    out = ShardReader(export, dtypes=EXPORT_DTYPES)
    for i in range(4):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            scales = {float(out.get(f"model.layers.{i}.{n}.weight_global_scale")) for n in group}
            assert len(scales) == 1, (i, group, scales)
    assert len({float(out.get(f"model.layers.{i}.mlp.down_proj.weight_global_scale")) for i in range(4)}) == 4


def test_the_config_is_compressed_tensors_nvfp4a16_and_reads_back(export):
    config = json.loads((export / "config.json").read_text())
    qc = config["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == "nvfp4-pack-quantized" and group["input_activations"] is None
    w = group["weights"]
    assert (w["type"], w["num_bits"], w["strategy"], w["group_size"], w["symmetric"], w["dynamic"]) == \
        ("float", 4, "tensor_group", 16, True, False)
    assert qc["ignore"] == QWEN2_VL.compressed_ignore() and qc["meta"]["scheme"] == "NVFP4A16"
    quant = read_quantization_config(qc, "config.json")
    assert quant.pack_format is FMT and (quant.spec.bits, quant.spec.group_size) == (4, 16)
    assert quant.summary()["weights"] == "nvfp4_e2m1"
    report = json.loads((export / "quantize_report.json").read_text())
    assert report["scheme"] == "NVFP4A16" and report["calibration"] is None and len(report["layers"]) == 28
    from qvlquant.storage.manifest import verify_manifest

    verify_manifest(export)


@pytest.mark.parametrize("edit,message", [
    (lambda g: g.update(input_activations={"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                           "group_size": 16, "dynamic": True}),
     r"input_activations\.dynamic is True; qvlquant reads nvfp4-pack-quantized NVFP4 \(W4A4\) with dynamic 'local'"),
    (lambda g: g["weights"].update(group_size=32), r"weights\.group_size is 32; qvlquant reads nvfp4-pack-quantized"),
    (lambda g: g["weights"].update(strategy="group"), r"weights\.strategy is 'group'"),
])
def test_nvfp4_configs_qvlquant_does_not_run_are_refused_naming_the_field(export, edit, message):
    qc = json.loads((export / "config.json").read_text())["quantization_config"]
    edit(qc["config_groups"]["group_0"])
    with pytest.raises(ValueError, match=r"config\.json: quantization_config\.config_groups\.group_0\." + message):
        read_quantization_config(qc, "config.json")


def test_compressed_tensors_decompresses_to_qvlquants_weights(export):
    ct = pytest.importorskip("compressed_tensors", reason="the interop extra (compressed-tensors) is not installed")
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme

    group = json.loads((export / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    out = ShardReader(export, dtypes=EXPORT_DTYPES)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.3.mlp.down_proj"):
        theirs = NVFP4PackedCompressor.decompress(stored(out, module), scheme)["weight"]
        # it decompresses to bf16: exactly qvlquant's float32 product, rounded once
        assert theirs.dtype == torch.bfloat16, ct.__version__
        assert torch.equal(theirs, FMT.unpack(stored(out, module)).bfloat16()), (module, ct.__version__)


def test_qvlquant_load_runs_the_export_with_its_dequantized_weights(export):
    from qvlquant.runtime.load import load
    from qvlquant.runtime.nvfp4 import Nvfp4Linear

    model, _ = load(export, dtype=torch.float32)
    layers = model.model.language_model.layers
    assert sum(isinstance(m, Nvfp4Linear) for m in model.modules()) == 28
    assert not any(isinstance(m, Nvfp4Linear) for m in model.model.visual.modules())
    out = ShardReader(export, dtypes=EXPORT_DTYPES)
    ours = FMT.unpack(stored(out, "model.layers.2.mlp.down_proj"))
    assert torch.equal(layers[2].mlp.down_proj.weight_dequantized(), ours)
    x = torch.randn(3, ours.shape[1])
    assert torch.allclose(layers[2].mlp.down_proj(x), x @ ours.t(), atol=1e-5)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[10, 11, 12, 13]])).logits
    assert bool(torch.isfinite(logits).all())


def test_inspect_reads_the_export(export):
    """28 quantized linears ([out, in / 2] uint8), the vision tower's full precision, and vLLM (its own classes
    where installed, else the copied rules) quantizing none of it."""
    from qvlquant.checkpoint.inspection import inspect_checkpoint

    report = inspect_checkpoint(export)
    assert report["verification"]["status"] == "verified" and report["quantized_linears"] == 28
    assert report["module_settings"] == {"FP4 e2m1 g16, 16-bit activations": 28}
    assert report["vision_linears"] == 10 and report["quantization"]["weights"] == "nvfp4_e2m1"
    assert report["vllm"]["vision_quantized"] == [] and report["marlin"][1] == []


def test_the_card_names_the_format_and_the_hardware(export):
    card = (export / "README.md").read_text()
    assert "decoder linears hold NVFP4 weights" in card
    assert "| Quantization | NVFP4 (NVFP4A16), data-free round-to-nearest |" in card
    assert "e2m1 in groups of 16 with e4m3 scales" in card and "Marlin's FP4 kernel" in card
    assert "| Activations | not quantized (weight-only) |" in card


def test_a_rule_with_the_scheme_is_refused():
    from qvlquant.config import JobConfig
    from qvlquant.quant.rules import parse_rule

    with pytest.raises(ValueError, match=r"^--override / --ignore does not apply to --scheme NVFP4A16 \(.*; "
                                         r"data-free: .*\): drop it"):
        JobConfig(output="x", scheme="NVFP4A16", rules=(parse_rule("mlp:skip"),))
