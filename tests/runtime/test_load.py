"""Loading checkpoints: straight from the shards into the requested dtype, packed tensors kept packed, pickle
refused for quantized and full-precision folders alike."""

import json
import re
import shutil

import pytest
import torch

import qvlquant
from qvlquant.cli import main
from qvlquant.quant.spec import QuantSpec
from qvlquant.runtime.load import QuantLinear


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    out = tmp_path_factory.mktemp("w4") / "q"
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--num-samples", "2", "--output", str(out)]) == 0
    return out


def test_quantized_model_holds_packed_tensors_in_the_dtype_asked(w4):
    model, processor = qvlquant.load(w4, dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 28 and processor is not None
    assert all(m.qweight.dtype == torch.int32 and m.scales.dtype == torch.float16 for m in linears)
    assert all(not hasattr(m, "weight") for m in linears)  # no float copy of any quantized weight
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())


def test_full_precision_load_equals_from_pretrained():
    from transformers import Qwen2VLForConditionalGeneration

    from qvlquant.assets.paths import MODEL_DIR

    model, _ = qvlquant.load("demo")
    reference = Qwen2VLForConditionalGeneration.from_pretrained(MODEL_DIR, dtype=torch.float32)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as the config says


@pytest.mark.parametrize("quantized", [False, True])
def test_pickle_checkpoints_are_refused_everywhere(tmp_path, capsys, quantized):
    from qvlquant.assets.paths import MODEL_DIR

    folder = tmp_path / "m"
    folder.mkdir()
    config = json.loads((MODEL_DIR / "config.json").read_text())
    if quantized:
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*pickle checkpoints are refused"):
        qvlquant.load(folder)
    assert main(["eval", "--model", str(folder), "--base", "none", "--limit", "1"]) == 2
    assert "pickle checkpoints are refused" in capsys.readouterr().err


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "gptq", "group_size": 128}, "quantization_config.bits is missing"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "config_groups holds 0 groups"),
])
def test_a_malformed_quantization_config_is_refused_naming_the_file_and_field(tmp_path, capsys, qc, message):
    """Read by checkpoint.qconfig, the one reader: a ValueError naming config.json (it was a KeyError for these),
    and a one-line error from the CLI."""
    from qvlquant.assets.paths import MODEL_DIR

    folder = tmp_path / "m"
    folder.mkdir()
    config = json.loads((MODEL_DIR / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    (folder / "model.safetensors").symlink_to(MODEL_DIR / "model.safetensors")
    with pytest.raises(ValueError, match=f"^{folder / 'config.json'}: quantization_config") as error:
        qvlquant.load(folder)
    assert message in str(error.value)
    assert main(["eval", "--model", str(folder), "--base", "none", "--limit", "1"]) == 2
    assert message in capsys.readouterr().err


# --- mixed precision: each linear built with its own setting ---------------------------------------------------------
EIGHT = QuantSpec(8, -1, True)
QKV0 = r".*\.layers\.0\.self_attn\.(?:q_proj|k_proj|v_proj{})$"
DOWN3 = r".*\.layers\.3\.mlp\.down_proj$"


@pytest.fixture(scope="module")
def ct4(tmp_path_factory):
    out = tmp_path_factory.mktemp("ct4") / "q"
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--num-samples", "2", "--format", "compressed-tensors",
                 "--output", str(out)]) == 0
    return out


def mixed_export(src, dst):
    """A copy of the demo export ``src`` made mixed by hand: layer 0's q/k/v re-packed from the base weights at 8 bits
    per channel, layer 3's down_proj stored as the base's plain bf16 weight; config.json says so in the format's
    own terms (GPTQ dynamic + modules_in_block_to_quantize; compressed-tensors config group + ignore), manifest
    rewritten. -> {disk module: the weight [N, K] load must reproduce}."""
    from safetensors.torch import load_file, save_file

    from qvlquant.assets.paths import MODEL_DIR
    from qvlquant.quant.formats import PackFormat, QuantizedWeight
    from qvlquant.quant.rtn import default_g_idx, rtn_quantize
    from qvlquant.storage.manifest import write_manifest

    shutil.copytree(src, dst)
    base = load_file(str(MODEL_DIR / "model.safetensors"))
    tensors = load_file(str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    fmt = PackFormat.COMPRESSED if qc["quant_method"] == "compressed-tensors" else PackFormat.GPTQ
    expected = {}
    for module in [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")] + ["model.layers.3.mlp.down_proj"]:
        w = base[module + ".weight"].float()  # [N, K]
        for name in fmt.tensor_shapes(w.shape[1], w.shape[0], QuantSpec(4, 128, False)):
            tensors.pop(f"{module}.{name}", None)
        if module.endswith("down_proj"):
            tensors[module + ".weight"], expected[module] = base[module + ".weight"], w
            continue
        q, scale, zero = rtn_quantize(w, EIGHT)
        packed = QuantizedWeight(q, scale, zero, default_g_idx(w.shape[1], EIGHT), EIGHT)
        tensors.update({f"{module}.{k}": v for k, v in fmt.pack(packed).items()})
        expected[module] = packed.dequantize()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if fmt is PackFormat.GPTQ:
        qc["dynamic"] = {"-:" + DOWN3: {}, "+:" + QKV0.format("|qkv_proj"): {"bits": 8, "group_size": -1}}
        qc["modules_in_block_to_quantize"] = [[n for n in g if n != "layers.3.mlp.down_proj"]
                                              for g in qc["modules_in_block_to_quantize"]]
    else:
        weights = {**qc["config_groups"]["group_0"]["weights"], "num_bits": 8, "strategy": "channel", "group_size": None}
        qc["config_groups"]["group_1"] = {"targets": ["re:" + QKV0.format("")], "weights": weights,
                                          "format": "pack-quantized"}
        qc["ignore"] = qc["ignore"] + ["re:" + DOWN3]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    write_manifest(dst)
    return expected


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_a_mixed_export_loads_each_linear_with_its_own_setting(w4, ct4, tmp_path, fmt):
    expected = mixed_export(w4 if fmt == "gptq" else ct4, tmp_path / "mixed")
    model, _ = qvlquant.load(tmp_path / "mixed")
    layers = model.model.language_model.layers
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 27 and isinstance(layers[3].mlp.down_proj, torch.nn.Linear)
    assert torch.equal(layers[3].mlp.down_proj.weight, expected["model.layers.3.mlp.down_proj"])  # bf16 -> fp32 exact
    for p in ("q_proj", "k_proj", "v_proj"):
        module = getattr(layers[0].self_attn, p)
        assert module.spec == EIGHT and module.extra_repr().endswith("bits=8, group=-1, " + module.fmt.value)
        assert torch.equal(module.quantized_weight().dequantize(), expected[f"model.layers.0.self_attn.{p}"])
    others = {m.spec for name, m in quantized.items() if ".layers.0.self_attn." not in name or "o_proj" in name}
    assert others == {QuantSpec(4, 128, True)}
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model.model.language_model(input_ids=ids).last_hidden_state).all()


@pytest.mark.parametrize("drop,message", [("skip", "layers.3.mlp.down_proj.weight is a plain weight, but"),
                                          ("eight", "q_proj.qweight has shape [64, 256], the model expects [32, 256]")])
def test_a_config_that_does_not_describe_the_mixed_tensors_is_refused_naming_the_tensor(w4, tmp_path, drop, message):
    from qvlquant.storage.manifest import write_manifest

    mixed_export(w4, tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())
    dynamic = config["quantization_config"]["dynamic"]
    config["quantization_config"]["dynamic"] = {k: v for k, v in dynamic.items() if k.startswith("+:" if drop == "skip" else "-:")}
    if drop == "skip":  # its absence from modules_in_block_to_quantize alone leaves it unquantized too
        del config["quantization_config"]["modules_in_block_to_quantize"]
    (tmp_path / "mixed" / "config.json").write_text(json.dumps(config))
    write_manifest(tmp_path / "mixed")
    with pytest.raises(ValueError, match=re.escape(message)):
        qvlquant.load(tmp_path / "mixed")
