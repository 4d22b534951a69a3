"""compressed-tensors ``pack-quantized`` export, checked by decompressing with the compressed-tensors library."""

import copy
import json

import pytest
import torch

pytest.importorskip("compressed_tensors", reason="the interop extra (compressed-tensors) is not installed")

from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import qvlquant  # noqa: E402
from qvlquant.checkpoint.export import export  # noqa: E402
from qvlquant.engine.loop import LoopPlan, quantize_model  # noqa: E402
from qvlquant.families import QWEN2_VL  # noqa: E402
from qvlquant.quant.formats import PackFormat  # noqa: E402
from qvlquant.quant.spec import QuantConfig, QuantSpec  # noqa: E402


def library_dequantize(tensors: dict, prefix: str, weights_args: dict) -> torch.Tensor:
    args = QuantizationArgs(**weights_args)
    shape = torch.Size(tensors[prefix + ".weight_shape"].tolist())
    x_q = unpack_from_int32(tensors[prefix + ".weight_packed"], args.num_bits, shape)
    zp = None
    if not args.symmetric:
        zp_shape = torch.Size([shape[0], tensors[prefix + ".weight_scale"].shape[1]])
        zp = unpack_from_int32(tensors[prefix + ".weight_zero_point"], args.num_bits, zp_shape, packed_dim=0)
    return dequantize(x_q, tensors[prefix + ".weight_scale"].float(), zp, args=args, dtype=torch.float32)


@pytest.mark.parametrize("method,spec", [("gptq", QuantSpec(4, 128, True)), ("rtn", QuantSpec(8, -1, True)),
                                         ("awq", QuantSpec(4, 64, False)), ("gptq", QuantSpec(3, 128, False))])
def test_library_decompresses_to_our_weights(demo, demo_batches, tmp_path, method, spec):
    model, processor = demo
    q = copy.deepcopy(model)
    plan = LoopPlan(family=QWEN2_VL, qcfg=QuantConfig(method, spec), pack_format=PackFormat.COMPRESSED)
    result = quantize_model(q, demo_batches, plan)
    export(q, processor, result, tmp_path / "ct", {})
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert "re:.*visual.*" in config["ignore"] and "lm_head" in config["ignore"]
    weights_args = config["config_groups"]["group_0"]["weights"]
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, qw in result.weights.items():
        prefix = QWEN2_VL.to_disk(name)
        torch.testing.assert_close(library_dequantize(tensors, prefix, weights_args), qw.dequantize(), rtol=0, atol=0)
    assert "visual.blocks.0.attn.qkv.weight" in tensors and "visual.blocks.0.attn.qkv.weight_packed" not in tensors
    loaded, _ = qvlquant.load(tmp_path / "ct")
    batch = next(b for b in demo_batches if "pixel_values" in b)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, q(**batch).logits, rtol=0, atol=1e-5)
