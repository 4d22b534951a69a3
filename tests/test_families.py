import pytest

from qvlquant.families import FAMILIES, QWEN2_VL, family_for


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match="'llama' is not supported.*qwen2_5_vl, qwen2_vl"):
        family_for("llama")
    assert family_for("qwen2_5_vl") is QWEN2_VL and set(FAMILIES) >= {"qwen2_vl", "qwen2_5_vl"}


def test_key_mapping_both_ways():
    runtime = "model.language_model.layers.3.mlp.down_proj.qweight"
    assert QWEN2_VL.to_disk(runtime) == "model.layers.3.mlp.down_proj.qweight"
    assert QWEN2_VL.to_runtime("model.layers.3.mlp.down_proj.qweight") == runtime
    assert QWEN2_VL.to_disk("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert QWEN2_VL.to_disk("lm_head.weight") == "lm_head.weight"


def test_not_converted_names_protect_the_vision_tower_in_both_layouts():
    names = QWEN2_VL.unquantized_disk_names()
    assert "visual" in names and "model.visual" in names and "lm_head" in names
