"""make_random_checkpoint's Qwen3-VL-MoE shape: the released config's sizes, and each layer's experts written fused and
transposed as the released checkpoints store them (what qvlquant's reader must take one expert at a time)."""

import importlib.util
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "make_random_checkpoint.py"
spec = importlib.util.spec_from_file_location("make_random_checkpoint", SCRIPT)
mrc = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mrc
spec.loader.exec_module(mrc)


def test_qwen3_vl_30b_a3b_config_has_the_released_sizes():
    config = mrc.qwen3_vl_moe_config("qwen3-vl-30b-a3b", layers=2)
    text, vision = config.text_config, config.vision_config
    assert config.model_type == "qwen3_vl_moe" and text.num_hidden_layers == 2  # --layers
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (2048, 32, 4, 128)
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (128, 8, 768)
    assert text.vocab_size == 151936 and not config.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.patch_size) == (27, 1152, 2048, 16)
    assert list(vision.deepstack_visual_indexes) == [8, 16, 24]
    assert mrc.qwen3_vl_moe_config("qwen3-vl-30b-a3b").text_config.num_hidden_layers == 48


def test_experts_are_written_fused_and_transposed():
    shapes = {"model.norm.weight": (8,)}
    for layer in (0, 1):
        for e in range(3):
            p = f"model.language_model.layers.{layer}.mlp.experts.{e}"
            shapes |= {f"{p}.gate_proj.weight": (5, 8), f"{p}.up_proj.weight": (5, 8), f"{p}.down_proj.weight": (8, 5)}
        shapes[f"model.language_model.layers.{layer}.mlp.gate.weight"] = (3, 8)
    out = mrc.fused_transposed(shapes)
    assert out == {"model.norm.weight": (8,),
                   "model.language_model.layers.0.mlp.experts.gate_up_proj": (3, 8, 10),
                   "model.language_model.layers.0.mlp.experts.down_proj": (3, 5, 8),
                   "model.language_model.layers.0.mlp.gate.weight": (3, 8),
                   "model.language_model.layers.1.mlp.experts.gate_up_proj": (3, 8, 10),
                   "model.language_model.layers.1.mlp.experts.down_proj": (3, 5, 8),
                   "model.language_model.layers.1.mlp.gate.weight": (3, 8)}
    assert list(out)[1:4] == ["model.language_model.layers.0.mlp.experts.gate_up_proj",
                              "model.language_model.layers.0.mlp.experts.down_proj",
                              "model.language_model.layers.0.mlp.gate.weight"]  # each layer's tensors together
    shapes["model.language_model.layers.1.mlp.experts.2.down_proj.weight"] = (5, 8)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts: gate \(5, 8\), up \(5, 8\), down \(5, 8\)"):
        mrc.fused_transposed(shapes)
