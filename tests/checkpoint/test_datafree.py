"""Data-free FP8 exports of the demo: what is written, read back through the one reader, and by compressed-tensors."""

import json

import pytest
import torch

from qvlquant.assets.paths import EMBEDDED_MODELS
from qvlquant.checkpoint.datafree import is_fp8_linear
from qvlquant.checkpoint.export import MANIFEST
from qvlquant.checkpoint.qconfig import read_quantization_config
from qvlquant.families import QWEN2_VL, QWEN3_VL, QWEN_VL_V1
from qvlquant.quant.formats import FP8_SCHEMES, Fp8Format
from qvlquant.storage.shards import EXPORT_DTYPES, ShardReader


@pytest.fixture(scope="session")
def fp8_exports(tmp_path_factory):
    """scheme -> the demo's export folder, each written once."""
    from qvlquant.api import quantize

    root = tmp_path_factory.mktemp("fp8")
    return {scheme: quantize(output=str(root / scheme), scheme=scheme) and root / scheme for scheme in FP8_SCHEMES}


def demo_reader():
    return ShardReader(EMBEDDED_MODELS["demo"])


@pytest.mark.parametrize("family,name,expected", [
    (QWEN2_VL, "model.language_model.layers.3.mlp.up_proj.weight", True),
    (QWEN2_VL, "model.language_model.layers.0.self_attn.q_proj.weight", True),
    (QWEN2_VL, "model.language_model.layers.0.self_attn.q_proj.bias", False),
    (QWEN2_VL, "model.language_model.layers.0.input_layernorm.weight", False),
    (QWEN2_VL, "model.visual.blocks.0.mlp.fc1.weight", False),
    (QWEN2_VL, "lm_head.weight", False),
    (QWEN3_VL, "model.language_model.layers.1.self_attn.q_norm.weight", False),
    (QWEN_VL_V1, "transformer.h.2.attn.c_attn.weight", True),
    (QWEN_VL_V1, "transformer.visual.transformer.resblocks.0.attn.in_proj.weight", False),
])
def test_only_decoder_layer_linears_are_quantized(family, name, expected):
    assert is_fp8_linear(family, name) is expected


@pytest.mark.parametrize("scheme", list(FP8_SCHEMES))
def test_linears_hold_the_fp8_of_the_base_weights_and_the_rest_is_copied_bit_for_bit(fp8_exports, scheme):
    fmt = FP8_SCHEMES[scheme]
    out = ShardReader(fp8_exports[scheme], dtypes=EXPORT_DTYPES)
    base = demo_reader()
    quantized = [k[: -len(".weight")] for k in base.keys() if is_fp8_linear(QWEN2_VL, QWEN2_VL.to_runtime(k))]
    assert len(quantized) == 28
    expected = set(base.keys()) - {m + ".weight" for m in quantized}
    expected |= {f"{m}.{t}" for m in quantized for t in ("weight", fmt.scale_name)}
    assert set(out.keys()) == expected
    for module in quantized:
        packed = fmt.pack(base.get(module + ".weight"), scale_dtype=torch.bfloat16)  # the demo's dtype
        assert torch.equal(out.get(module + ".weight").view(torch.uint8), packed["weight"].view(torch.uint8))
        assert torch.equal(out.get(f"{module}.{fmt.scale_name}"), packed[fmt.scale_name])
    scale_dtype = out.meta(f"{quantized[0]}.{fmt.scale_name}")[0]
    assert scale_dtype == (torch.float32 if fmt is Fp8Format.BLOCK else torch.bfloat16)  # as Qwen / llm-compressor
    for key in set(base.keys()) - {m + ".weight" for m in quantized}:  # vision, embeddings, norms, biases
        assert out.meta(key) == base.meta(key) and torch.equal(out.get(key), base.get(key)), key


@pytest.mark.parametrize("scheme", list(FP8_SCHEMES))
def test_the_config_reads_back_as_its_format_and_the_export_is_verified(fp8_exports, scheme):
    folder = fp8_exports[scheme]
    config = json.loads((folder / "config.json").read_text())
    quant = read_quantization_config(config["quantization_config"], "config.json")
    assert quant.pack_format is FP8_SCHEMES[scheme] and quant.spec.bits == 8
    assert quant.summary()["weights"] == "fp8_e4m3"
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"
    report = json.loads((folder / "quantize_report.json").read_text())
    assert report["scheme"] == scheme and report["calibration"] is None and len(report["layers"]) == 28
    assert report["config"]["calib"]["source"] is None  # nothing was read, nothing recorded
    assert MANIFEST in {p.name for p in folder.iterdir()}
    from qvlquant.storage.manifest import verify_manifest

    verify_manifest(folder)


def test_block_config_is_qwens_with_every_vision_linear_named(fp8_exports):
    qc = json.loads((fp8_exports["FP8_BLOCK"] / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    names = qc["modules_to_not_convert"]
    assert {"visual", "model.visual", "lm_head"} <= set(names)
    assert {"visual.blocks.1.mlp.fc2", "model.visual.merger.mlp.2"} <= set(names)  # vLLM matches exact names
    assert not any(".layers." in n for n in names)


def test_block_fp8_keeps_a_fused_layer_of_parts_in_partial_blocks_in_the_checkpoint_dtype(tmp_path):
    """Qwen3.5 (a tiny one): in_proj_b / in_proj_a have 32 rows, one per value head, and vLLM fuses them (in_proj_ba),
    so their block scales cannot be loaded (``block_refused``; shown with vLLM's own loader in the vLLM venv's
    conformance tests). They are copied bit for bit and named whole in modules_to_not_convert in both layouts, as
    Qwen's FP8 checkpoints name them; the tiny model's full-attention q/k/v (a 64-row k) too; every other decoder
    linear is FP8. ``qvlquant.load`` reads them as plain linears. The MTP head (bf16) is named too."""
    import qvlquant
    from tiny_models import MTP_KEYS, qwen3_5_checkpoint

    from qvlquant.storage.shards import read_checkpoint_header

    qwen3_5_checkpoint(tmp_path / "base")
    out = tmp_path / "fp8"
    qvlquant.quantize(model=str(tmp_path / "base"), output=str(out), scheme="FP8_BLOCK")
    names = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    decoder = sorted(n for n in names if ".layers." in n and not n.startswith(("model.visual", "mtp.")))
    want = [f"model.language_model.layers.{i}.linear_attn.in_proj_{x}" for i in (0, 1, 2) for x in "ab"] + \
           [f"model.language_model.layers.3.self_attn.{x}_proj" for x in "qkv"]
    assert decoder == sorted(want)
    # the MTP head's matrices, copied bf16: named as vLLM's MTP drafter builds them (exact names, no mapper)
    assert {n for n in names if n.startswith("mtp.")} == {k[: -len(".weight")] for k, (shape, _) in MTP_KEYS.items()
                                                         if len(shape) == 2}
    from safetensors.torch import load_file

    header, base, export = read_checkpoint_header(out), ShardReader(tmp_path / "base"), load_file(out / "model.safetensors")
    for name in want:
        assert f"{name}.weight_scale_inv" not in header and header[f"{name}.weight"][1] == "BF16"
        assert torch.equal(export[f"{name}.weight"], base.get(f"{name}.weight"))
    assert header["model.language_model.layers.0.linear_attn.in_proj_z.weight"][1] == "F8_E4M3"
    model, _ = qvlquant.load(out)
    layers = model.model.language_model.layers
    assert type(layers[0].linear_attn.in_proj_a) is torch.nn.Linear
    assert type(layers[0].linear_attn.in_proj_z) is not torch.nn.Linear


def test_dynamic_config_is_compressed_tensors_fp8_dynamic(fp8_exports):
    qc = json.loads((fp8_exports["FP8_DYNAMIC"] / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == "float-quantized"
    w, a = group["weights"], group["input_activations"]
    assert (w["type"], w["num_bits"], w["strategy"], w["symmetric"], w["dynamic"]) == ("float", 8, "channel", True, False)
    assert (a["type"], a["num_bits"], a["strategy"], a["dynamic"]) == ("float", 8, "token", True)
    assert qc["ignore"] == QWEN2_VL.compressed_ignore()


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     r"activation_scheme 'static' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, r"weight_block_size None is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, r"activation_scheme is missing"),
    ({"quant_method": "fp8", "fmt": "e5m2", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
     r"fmt 'e5m2' is not supported"),
])
def test_fp8_configs_qvlquant_does_not_run_are_refused_naming_the_field(qc, message):
    with pytest.raises(ValueError, match=r"x/config.json: quantization_config\." + message):
        read_quantization_config(qc, "x/config.json")


def test_static_or_weight_only_float_quantized_is_refused(fp8_exports):
    qc = json.loads((fp8_exports["FP8_DYNAMIC"] / "config.json").read_text())["quantization_config"]
    qc["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    with pytest.raises(ValueError, match=r"input_activations\.dynamic is False; qvlquant reads float-quantized"):
        read_quantization_config(qc, "config.json")
    qc["config_groups"]["group_0"]["input_activations"] = None
    with pytest.raises(ValueError, match=r"input_activations is missing"):
        read_quantization_config(qc, "config.json")


def test_compressed_tensors_decompresses_to_qvlquants_weights(fp8_exports):
    ct = pytest.importorskip("compressed_tensors", reason="the interop extra (compressed-tensors) is not installed")
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    folder = fp8_exports["FP8_DYNAMIC"]
    group = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                input_activations=group["input_activations"])
    out = ShardReader(folder, dtypes=EXPORT_DTYPES)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        stored = {"weight": out.get(module + ".weight"), "weight_scale": out.get(module + ".weight_scale")}
        theirs = FloatQuantizationCompressor.decompress(stored, scheme)["weight"]
        # it decompresses into the scale's dtype (the model's, bf16): exactly qvlquant's product, rounded once
        assert theirs.dtype == torch.bfloat16, ct.__version__
        assert torch.equal(theirs, Fp8Format.CHANNEL.unpack(stored).bfloat16()), (module, ct.__version__)


@pytest.mark.parametrize("scheme", list(FP8_SCHEMES))
def test_transformers_loads_both_exports_on_a_cpu_with_qvlquants_weights(fp8_exports, scheme):
    """transformers 5.24 on a CPU: the block format through its fine-grained FP8 integration, which (no GPU or XPU)
    dequantizes to bf16 at load; FP8_DYNAMIC through compressed-tensors, which keeps e4m3 + its bf16 scale."""
    from transformers import AutoModelForImageTextToText

    fmt = FP8_SCHEMES[scheme]
    model = AutoModelForImageTextToText.from_pretrained(fp8_exports[scheme], device_map="cpu")
    state = model.model.language_model.layers[2].mlp.down_proj.state_dict()
    out = ShardReader(fp8_exports[scheme], dtypes=EXPORT_DTYPES)
    key = "model.layers.2.mlp.down_proj"
    ours = fmt.unpack({t: out.get(f"{key}.{t}") for t in ("weight", fmt.scale_name)})
    theirs = fmt.unpack(state) if fmt.scale_name in state else state["weight"]
    assert torch.equal(theirs.bfloat16(), ours.bfloat16())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[10, 11, 12, 13]])).logits
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("scheme", list(FP8_SCHEMES))
def test_inspect_reads_fp8_exports(fp8_exports, scheme):
    """28 quantized linears (e4m3 weight beside its scale), the vision tower's full precision, and vLLM (its own
    classes where installed, else the copied rules) quantizing none of it."""
    from qvlquant.checkpoint.inspection import inspect_checkpoint

    report = inspect_checkpoint(fp8_exports[scheme])
    assert report["verification"]["status"] == "verified" and report["quantized_linears"] == 28
    assert report["vision_linears"] == 10 and report["vision_exposed_in_transformers"] == []
    assert report["quantization"]["weights"] == "fp8_e4m3"
    assert report["module_settings"] == {{"FP8_BLOCK": "FP8 e4m3 128x128 blocks, dynamic activations",
                                          "FP8_DYNAMIC": "FP8 e4m3 per-channel, dynamic activations"}[scheme]: 28}
    assert report["vllm"]["vision_quantized"] == [] and report["marlin"][1] == []


RTN_CASES = {
    "gptq-w4": ["--bits", "4"],
    "ct-w3-asym": ["--bits", "3", "--asym", "--format", "compressed-tensors"],
    "w8-per-channel": ["--bits", "8", "--group-size", "-1"],
    "rules": ["--format", "compressed-tensors", "--ignore", r"layers\.1\.mlp", "--override", r"self_attn:bits=8"],
}


@pytest.mark.parametrize("case", list(RTN_CASES))
def test_rtn_from_the_checkpoint_writes_the_layer_loops_bytes(tmp_path, case):
    """RTN reads no activations, so quantize rounds it straight from the checkpoint (no capture, no replay); its
    safetensors and config.json are byte for byte those of the layer loop (forced here by --max-layers past the
    last layer), for both layouts, odd widths, per-channel and per-module rules."""
    from qvlquant.cli import main

    args = ["quantize", "--method", "rtn", "--num-samples", "2", *RTN_CASES[case]]
    assert main([*args, "--output", str(tmp_path / "free")]) == 0
    assert main([*args, "--max-layers", "1000", "--output", str(tmp_path / "loop")]) == 0
    free = json.loads((tmp_path / "free" / "quantize_report.json").read_text())
    loop = json.loads((tmp_path / "loop" / "quantize_report.json").read_text())
    assert free["data_free"] is True and "phase_seconds" not in free and "capture" in loop["phase_seconds"]
    assert sorted(free["layers"]) == sorted(loop["layers"])
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "free" / name).read_bytes() == (tmp_path / "loop" / name).read_bytes(), name
    config = json.loads((tmp_path / "loop" / "config.json").read_text())  # the stored dtype, not the compute dtype
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_rtn_from_the_checkpoint_keeps_nothing_waiting_once_written(tmp_path, monkeypatch, fmt):
    """Every packed tensor ``plan_rtn`` computes is written and let go: once the shards are written nothing is left
    in its ``waiting`` dict (read from the closure of the function its fetchers call). The group index / shape
    tensors, written from the shape alone, had stayed: K x 4 bytes a linear, about 1.5 GB over Qwen3.5-397B-A17B's
    92,000 expert linears."""
    import qvlquant
    from qvlquant.checkpoint import datafree

    seen = []
    write = datafree.write_shards

    def checked(entries, fetch, folder, max_shard_bytes):
        names = write(entries, fetch, folder, max_shard_bytes)
        rounded = next(f for k, f in fetch.items() if k.endswith((".qweight", ".weight_packed")))
        packed = next(c.cell_contents for c in rounded.__closure__ if getattr(c.cell_contents, "__name__", "") == "packed")
        seen.append(next(c.cell_contents for c in packed.__closure__ if isinstance(c.cell_contents, dict)))
        return names

    monkeypatch.setattr(datafree, "write_shards", checked)
    qvlquant.quantize(output=str(tmp_path / "out"), method="rtn", bits=4,
                      export_format="compressed-tensors" if fmt == "compressed-tensors" else "auto")
    assert seen == [{}]


@pytest.mark.parametrize("shard_bytes", [None, 1 << 20])
def test_rtn_from_the_checkpoint_reads_each_weight_once_one_ahead(tmp_path, monkeypatch, shard_bytes):
    """The RTN export reads its linears' weights in a background thread one ahead (``read_ahead`` with
    ``rounding_order``): every weight it rounds was read there, exactly once, and in the order the export asked for
    them, in one file and across shards of 1 MiB; the export is the one read without read-ahead, byte for byte."""
    import threading

    import qvlquant
    from qvlquant.checkpoint.export import CheckpointTensors

    reads, asked = [], []
    read, get = CheckpointTensors._read, CheckpointTensors.get

    def recording_read(self, name):
        reads.append((name, threading.current_thread().name.startswith("read-ahead")))
        return read(self, name)

    def recording_get(self, name):
        asked.append(name)
        return get(self, name)

    settings = dict(method="rtn", bits=4, **({"max_shard_bytes": shard_bytes} if shard_bytes else {}))
    qvlquant.quantize(output=str(tmp_path / "plain"), **settings)
    monkeypatch.setattr(CheckpointTensors, "_read", recording_read)
    monkeypatch.setattr(CheckpointTensors, "get", recording_get)
    qvlquant.quantize(output=str(tmp_path / "ahead"), **settings)
    ahead = [name for name, background in reads if background]
    linears = [name for name in asked if ".layers." in name and name.endswith("proj.weight")]
    report = json.loads((tmp_path / "ahead" / "quantize_report.json").read_text())
    assert len(linears) == len(set(linears)) == len(report["layers"]) > 0  # each rounded linear asked for once
    assert ahead == linears
    assert not [name for name, background in reads if not background and name in set(linears)]
    files = sorted(p.name for p in (tmp_path / "plain").glob("*.safetensors"))
    assert (len(files) == 1) == (shard_bytes is None)
    for name in files:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "ahead" / name).read_bytes(), name
