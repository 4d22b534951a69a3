"""The calibrated schemes on the demo (``--scheme FP8``: per-tensor e4m3 weights and static input scales; ``--scheme
NVFP4``: W4A4, NVFP4A16's weights and an input global scale): what is written, read back through the one reader, by
compressed-tensors, and run by ``qvlquant.load`` with the served numerics."""

import json

import pytest
import torch
import torch.nn.functional as F

from qvlquant.assets.paths import EMBEDDED_MODELS
from qvlquant.checkpoint.datafree import fused_siblings, is_fp8_linear
from qvlquant.checkpoint.qconfig import read_quantization_config
from qvlquant.families import QWEN2_VL
from qvlquant.quant import fp8, nvfp4
from qvlquant.quant.formats import CALIBRATED_SCHEMES, Fp8Format, Nvfp4Format
from qvlquant.storage.shards import EXPORT_DTYPES, ShardReader

SCHEMES = list(CALIBRATED_SCHEMES)
INPUTS = {"FP8": "input_scale", "NVFP4": "input_global_scale"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """scheme -> the demo's export, calibrated on 8 of the demo's chats; NVFP4 without its default SmoothQuant, so
    that its weights and norms are the checkpoint's (the smoothed export: test_nvfp4_smoothing.py)."""
    from qvlquant.api import quantize

    root = tmp_path_factory.mktemp("calibrated")
    for scheme in SCHEMES:
        quantize(output=str(root / scheme), scheme=scheme, num_samples=8,
                 **({"smoothing_strength": "off"} if scheme == "NVFP4" else {}))
    return {scheme: root / scheme for scheme in SCHEMES}


def report_of(folder) -> dict:
    return json.loads((folder / "quantize_report.json").read_text())


def fused_input_amax(report: dict, module: str) -> float:
    """The largest calibration input among the linears vLLM fuses with ``module`` (a checkpoint name)."""
    siblings = fused_siblings(QWEN2_VL, QWEN2_VL.to_runtime(module + ".weight"))
    return max(report["layers"][s[: -len(".weight")]]["input_amax"] for s in siblings)


def base_amax(base: ShardReader, module: str) -> float:
    siblings = fused_siblings(QWEN2_VL, QWEN2_VL.to_runtime(module + ".weight"))
    return max(float(base.get(QWEN2_VL.to_disk(s)).float().abs().max()) for s in siblings)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_linears_hold_the_schemes_weights_and_input_scales_and_the_rest_is_copied_bit_for_bit(exports, scheme):
    fmt = CALIBRATED_SCHEMES[scheme]
    out, base = ShardReader(exports[scheme], dtypes=EXPORT_DTYPES), ShardReader(EMBEDDED_MODELS["demo"])
    report = report_of(exports[scheme])
    quantized = [k[: -len(".weight")] for k in base.keys() if is_fp8_linear(QWEN2_VL, QWEN2_VL.to_runtime(k))]
    assert len(quantized) == 28 and len(report["layers"]) == 28
    names = (["weight", "weight_scale"] if fmt is Fp8Format.TENSOR else
             ["weight_packed", "weight_scale", "weight_global_scale"]) + [INPUTS[scheme]]
    expected = set(base.keys()) - {m + ".weight" for m in quantized}
    assert set(out.keys()) == expected | {f"{m}.{t}" for m in quantized for t in names}
    for module in quantized:
        w, amax = base.get(module + ".weight"), fused_input_amax(report, module)
        got = {t: out.get(f"{module}.{t}") for t in names}
        if fmt is Fp8Format.TENSOR:  # the weight scale shared by the fused linears, both scales in the model's dtype
            packed = fmt.pack(w, module, torch.bfloat16, fp8.tensor_scale(base_amax(base, module), torch.bfloat16))
            assert torch.equal(got["weight"].view(torch.uint8), packed["weight"].view(torch.uint8))
            assert torch.equal(got["weight_scale"], packed["weight_scale"])
            assert got["input_scale"].dtype == torch.bfloat16
            assert torch.equal(got["input_scale"], fp8.tensor_scale(amax, torch.bfloat16))
        else:
            packed = fmt.pack(w, module, nvfp4.global_scale(base_amax(base, module)))
            assert torch.equal(got["weight_packed"], packed["weight_packed"])
            assert torch.equal(got["weight_scale"].view(torch.uint8), packed["weight_scale"].view(torch.uint8))
            assert torch.equal(got["weight_global_scale"], packed["weight_global_scale"])
            assert got["input_global_scale"].tolist() == [pytest.approx(448 * 6 / amax, rel=1e-6)]
    for key in expected:  # vision, embeddings, norms, biases
        assert out.meta(key) == base.meta(key) and torch.equal(out.get(key), base.get(key)), key


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_linears_vllm_fuses_share_their_scales(exports, scheme):
    """vLLM keeps one weight scale (FP8: it requantizes the shards to the largest; NVFP4: the largest global) and
    one input scale per fused layer: q/k/v and gate/up are written with one of each."""
    out = ShardReader(exports[scheme], dtypes=EXPORT_DTYPES)
    weight = "weight_scale" if scheme == "FP8" else "weight_global_scale"
    for i in range(4):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            for tensor in (weight, INPUTS[scheme]):
                values = {float(out.get(f"model.layers.{i}.{n}.{tensor}")) for n in group}
                assert len(values) == 1, (i, group, tensor, values)
    inputs = {float(out.get(f"model.layers.{i}.{n}.{INPUTS[scheme]}")) for i in range(4)
              for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    assert len(inputs) == 16  # every other one its own


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_config_is_llm_compressors_preset_and_reads_back(exports, scheme):
    folder = exports[scheme]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    layout = "float-quantized" if scheme == "FP8" else "nvfp4-pack-quantized"
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == group["format"] == layout
    assert group["targets"] == ["Linear"] and qc["ignore"] == QWEN2_VL.compressed_ignore()
    assert qc["meta"]["scheme"] == scheme
    w, a = group["weights"], group["input_activations"]
    if scheme == "FP8":
        assert (w["strategy"], w["dynamic"], a["strategy"], a["dynamic"]) == ("tensor", False, "tensor", False)
    else:
        assert (w["strategy"], a["strategy"], a["group_size"], a["dynamic"]) == ("tensor_group",) * 2 + (16, "local")
    quant = read_quantization_config(qc, str(folder / "config.json"))
    assert quant.pack_format is CALIBRATED_SCHEMES[scheme] and quant.spec_for("model.visual.blocks.0.mlp.fc1") is None
    assert quant.summary()["activations"]
    ct = pytest.importorskip("compressed_tensors", reason="the interop extra (compressed-tensors) is not installed")
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    preset = {k: v.model_dump(mode="json") for k, v in PRESET_SCHEMES[scheme].items()}
    assert (w, a) == (preset["weights"], preset["input_activations"]), ct.__version__


@pytest.mark.parametrize("edit,message", [
    (lambda g: g["weights"].update(strategy="channel"), r"input_activations\.strategy is 'tensor'; qvlquant reads "
                                                         r"float-quantized FP8_DYNAMIC \(strategy 'token'\)"),
    (lambda g: g["weights"].update(strategy="block"), r"weights\.strategy is 'block'; qvlquant reads float-quantized "
                                                       r"FP8_DYNAMIC \(strategy 'channel'\) and FP8 \(strategy 'tensor'\)"),
    (lambda g: g["input_activations"].update(dynamic=True), r"input_activations\.dynamic is True; qvlquant reads "
                                                             r"float-quantized FP8 \(dynamic False\)"),
])
def test_float_quantized_configs_qvlquant_does_not_run_are_refused_naming_the_field(exports, edit, message):
    qc = json.loads((exports["FP8"] / "config.json").read_text())["quantization_config"]
    edit(qc["config_groups"]["group_0"])
    with pytest.raises(ValueError, match=r"config\.json: quantization_config\.config_groups\.group_0\." + message):
        read_quantization_config(qc, "config.json")


@pytest.mark.parametrize("edit,message", [
    (lambda g: g["input_activations"].update(dynamic=True), r"input_activations\.dynamic is True; qvlquant reads "
                                                             r"nvfp4-pack-quantized NVFP4 \(W4A4\) with dynamic 'local'"),
    (lambda g: g["input_activations"].update(group_size=32), r"input_activations\.group_size is 32; qvlquant reads "
                                                              r"nvfp4-pack-quantized NVFP4 \(group_size 16\)"),
])
def test_nvfp4_w4a4_configs_qvlquant_does_not_run_are_refused_naming_the_field(exports, edit, message):
    qc = json.loads((exports["NVFP4"] / "config.json").read_text())["quantization_config"]
    edit(qc["config_groups"]["group_0"])
    with pytest.raises(ValueError, match=r"config\.json: quantization_config\.config_groups\.group_0\." + message):
        read_quantization_config(qc, "config.json")


def test_compressed_tensors_decompresses_to_qvlquants_weights(exports):
    ct = pytest.importorskip("compressed_tensors", reason="the interop extra (compressed-tensors) is not installed")
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme

    for scheme, compressor, fmt in (("FP8", FloatQuantizationCompressor, Fp8Format.TENSOR),
                                    ("NVFP4", NVFP4PackedCompressor, Nvfp4Format.W4A4)):
        folder = exports[scheme]
        group = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
        spec = QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                  input_activations=group["input_activations"])
        out = ShardReader(folder, dtypes=EXPORT_DTYPES)
        for module in ("model.layers.0.self_attn.k_proj", "model.layers.3.mlp.down_proj"):
            stored = {t: out.get(f"{module}.{t}") for t in fmt.tensor_shapes(16, 1)}
            theirs = compressor.decompress(stored, spec)["weight"]
            assert theirs.dtype == torch.bfloat16, (scheme, ct.__version__)  # exactly ours, rounded once
            assert torch.equal(theirs, fmt.unpack(stored).bfloat16()), (scheme, module, ct.__version__)


def test_qvlquant_load_runs_the_served_numerics(exports, demo, demo_batches, monkeypatch):
    """Each loaded linear computes quantize(x) with its stored activation scale times its dequantized weight
    (static e4m3 per tensor; NVFP4 per 16 inputs under the input global scale); the model stays close to BF16, and
    without the activation rounding its logits move (the runtime is W8A8 / W4A4, not weight-only)."""
    import qvlquant
    from qvlquant.runtime.fp8 import Fp8Linear
    from qvlquant.runtime.nvfp4 import Nvfp4Linear

    base, _ = demo
    batch = next(b for b in demo_batches if "pixel_values" in b)
    mask = batch["attention_mask"].bool()
    # (mean KL to BF16, relative logit gap) bounds; measured on this batch: FP8 2.7e-3 and 1.7 %, NVFP4 0.036 and 6.0 %
    kinds = {"FP8": (Fp8Linear, "qvlquant.runtime.fp8.fake_quantize_static", lambda x, s: x, (1e-2, 0.03)),
             "NVFP4": (Nvfp4Linear, "qvlquant.runtime.nvfp4.fake_quantize_activations", lambda x, s: x, (0.1, 0.1))}
    with torch.no_grad():
        ref = base(**batch, use_cache=False).logits
    for scheme, (cls, patched, identity, (kl_max, gap_max)) in kinds.items():
        model, _ = qvlquant.load(exports[scheme])
        linears = {n: m for n, m in model.named_modules() if isinstance(m, cls)}
        assert len(linears) == 28 and not any(n.startswith("model.visual") for n in linears)
        down = model.model.language_model.layers[2].mlp.down_proj
        x = torch.randn(3, down.in_features) * 4
        weight = down.weight_dequantized()
        if scheme == "FP8":
            xq = fp8.fake_quantize_static(x, down.input_scale)
        else:
            xq = nvfp4.fake_quantize_activations(x, down.input_global_scale)
        torch.testing.assert_close(down(x), F.linear(xq, weight, down.bias), rtol=0, atol=0)
        with torch.no_grad():
            served = model(**batch, use_cache=False).logits
            monkeypatch.setattr(patched, identity)
            weight_only = model(**batch, use_cache=False).logits
            monkeypatch.undo()
        p, q = torch.log_softmax(ref[mask], -1), torch.log_softmax(served[mask], -1)
        kl = float((p.exp() * (p - q)).sum(-1).mean())
        gap = float((ref - served)[mask].abs().mean() / ref[mask].abs().mean())
        assert kl < kl_max and gap < gap_max, (scheme, kl, gap)
        assert (served - weight_only).abs().max() > 1e-3, scheme


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_report_card_and_inspect_name_the_calibration(exports, scheme):
    from qvlquant.checkpoint.inspection import inspect_checkpoint

    folder = exports[scheme]
    report = report_of(folder)
    calib = report["calibration"]
    assert report["scheme"] == scheme and (calib["source"], calib["num_samples"]) == ("demo", 8)
    assert calib["tokens"] > 100 and all(v["input_amax"] > 0 for v in report["layers"].values())
    card = (folder / "README.md").read_text()
    kind = "FP8" if scheme == "FP8" else "NVFP4"
    assert f"| Quantization | {kind} ({scheme}), round-to-nearest weights, activation scales from calibration |" in card
    assert "8 samples from `demo` (seed 0)" in card and "(for the activation scales only)" in card
    assert ("static: one scale per linear" in card) if scheme == "FP8" else ("Blackwell" in card)
    inspected = inspect_checkpoint(folder)
    assert inspected["verification"]["status"] == "verified" and inspected["quantized_linears"] == 28
    assert inspected["vision_linears"] == 10 and inspected["vllm"]["vision_quantized"] == []
    assert inspected["quantization"]["activations"] == ("fp8_e4m3 static per tensor" if scheme == "FP8" else
                                                        "nvfp4_e2m1 per 16, calibrated global scale")
    assert inspected["module_settings"] == {("FP8 e4m3 per-tensor, static per-tensor activations" if scheme == "FP8"
                                             else "FP4 e2m1 g16, NVFP4 activations"): 28}
