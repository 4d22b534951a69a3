"""Loading checkpoints: straight from the shards into the requested dtype, packed tensors kept packed, pickle
refused for quantized and full-precision folders alike."""

import json

import pytest
import torch

import qvlquant
from qvlquant.cli import main
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
