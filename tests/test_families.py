import pytest
import torch

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


QWEN3_5_TYPES = ["linear_attention"] * 3 + ["full_attention"]


def test_a_hybrid_family_bound_to_its_config_gives_each_layer_its_types_declaration():
    from qvlquant.families import QWEN3_5

    family = family_for("qwen3_5").bind({"text_config": {"layer_types": QWEN3_5_TYPES * 2}})
    assert family.first_layers() == {0: "linear_attention", 3: "full_attention"}
    delta, full = family.at(4), family.at(7)
    assert delta.linears == ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                             "linear_attn.in_proj_a", "linear_attn.out_proj", "mlp.gate_proj", "mlp.up_proj",
                             "mlp.down_proj")
    assert full.linears == QWEN2_VL.linears and full.fused == QWEN2_VL.fused
    from qvlquant.families import PER_LAYER, QWEN3_VL  # its full-attention layers are Qwen3-VL's, field by field

    assert {f: getattr(full, f) for f in PER_LAYER} == {f: getattr(QWEN3_VL, f) for f in PER_LAYER}
    assert delta.fused_name("linear_attn.in_proj_z") == "linear_attn.in_proj_qkvz" and full.fused_name("linear_attn.in_proj_z") is None
    assert (delta.attention, delta.attention_kwargs) == ("linear_attn", ("attention_mask",))
    # no AWQ scale folds into the DeltaNet's out_proj (its gated norm's weight is shared by all heads)
    assert all("linear_attn.out_proj" not in g.linears for g in delta.scaling_groups)
    # the unbound family's fields are the union over layer types (name matching over every layer)
    assert set(QWEN3_5.linears) == set(delta.linears) | set(full.linears) and QWEN3_5.carried == ("mtp.",)


def test_a_hybrid_family_refuses_to_guess_layer_types():
    from qvlquant.families import QWEN3_5

    with pytest.raises(RuntimeError, match="bind it to the model's config"):
        QWEN3_5.at(0)
    with pytest.raises(ValueError, match=r"\['mamba'\].*knows \['linear_attention', 'full_attention'\]"):
        QWEN3_5.bind({"text_config": {"layer_types": ["linear_attention", "mamba"]}})
    with pytest.raises(ValueError, match="name no layer"):
        QWEN3_5.bind({"text_config": {}})


def test_families_whose_layers_are_alike_are_their_own_layer_declaration():
    for family in set(FAMILIES.values()) - {family_for(t) for t in ("qwen3_5", "qwen3_5_moe", "qwen3_vl_moe")}:
        assert family.bind({"text_config": {"layer_types": ["x"]}}) is family
        assert family.at(5) is family and family.first_layers() == {} and family.layer_type(5) is None


def test_a_moe_family_writes_out_each_experts_linears_from_the_config():
    family = family_for("qwen3_5_moe").bind({"text_config": {"num_experts": 4, "num_experts_per_tok": 2, "layer_types": QWEN3_5_TYPES}})
    delta, full = family.at(0), family.at(3)
    expert_groups = [g for g in full.linear_groups if family.expert_of(g[0]) is not None]
    # each expert's gate/up (one input), then each expert's down: 8 groups, named as the checkpoint stores them
    assert expert_groups == [(f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj") for e in range(4)] + [
        (f"mlp.experts.{e}.down_proj",) for e in range(4)]
    assert delta.linear_groups[-8:] == full.linear_groups[-8:] and delta.linears[0] == "linear_attn.in_proj_qkv"
    assert ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj") in full.linear_groups
    # AWQ smooths within each expert only: nothing folds into post_attention_layernorm, which the router reads too
    assert all(g.prev != "post_attention_layernorm" for g in full.scaling_groups)
    assert sum(g.prev.startswith("mlp.experts.") for g in full.scaling_groups) == 4
    assert family.expert_of("mlp.experts.3.down_proj") == 3 and family.expert_of("mlp.shared_expert.up_proj") is None
    assert family.expert_template("mlp.experts.13.up_proj") == "mlp.experts.{e}.up_proj"
    assert "mlp.experts.3.down_proj" in full.row_parallel and family.expert_count == 4
    # vLLM runs a layer's experts as one MoE layer: one fused entry with every expert's linears, in either layer type
    experts = tuple(f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj"))
    assert ("mlp.experts", experts) in delta.fused and ("mlp.experts", experts) in full.fused
    assert family.fused_name("mlp.experts.3.up_proj") == "mlp.experts"
    assert family.compressed_ignore()[2:] == [r"re:.*\.mlp\.gate$", r"re:.*\.mlp\.shared_expert_gate$"]
    with pytest.raises(ValueError, match="num_experts is 0"):
        family_for("qwen3_5_moe").bind({"text_config": {"num_experts": 0, "num_experts_per_tok": 2, "layer_types": QWEN3_5_TYPES}})


def _vl_moe(**text):
    return family_for("qwen3_vl_moe").bind({"text_config": {"num_experts": 3, "num_experts_per_tok": 2,
                                                            "num_hidden_layers": 4, **text}})


def test_qwen3_vl_moe_layer_types_follow_decoder_sparse_step_and_mlp_only_layers():
    from qvlquant.families import QWEN3_VL

    assert _vl_moe().layer_types == ("sparse",) * 4  # transformers' defaults: step 1, no dense layer
    family = _vl_moe(decoder_sparse_step=2, mlp_only_layers=[3])
    assert family.layer_types == ("dense", "sparse", "dense", "dense")
    assert family.first_layers() == {0: "dense", 1: "sparse"}
    dense, sparse = family.at(0), family.at(1)
    assert dense.linears == QWEN3_VL.linears and dense.fused == QWEN3_VL.fused
    # attention, then each expert's gate/up and each expert's down; no shared expert; the router is no linear
    assert sparse.linear_groups == QWEN3_VL.linear_groups[:2] + tuple(
        (f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj") for e in range(3)) + tuple(
        (f"mlp.experts.{e}.down_proj",) for e in range(3))
    # vLLM runs a layer's experts as one FusedMoE layer of one setting: one fused entry of every expert's linears
    every = tuple(f"mlp.experts.{e}.{p}" for e in range(3) for p in ("gate_proj", "up_proj", "down_proj"))
    assert sparse.fused == QWEN3_VL.fused[:1] + (("mlp.experts", every),)
    assert "mlp.experts.2.down_proj" in sparse.row_parallel
    # AWQ smooths within each expert: nothing folds into post_attention_layernorm, which the router reads too
    assert [g.prev for g in sparse.scaling_groups] == ["input_layernorm", "self_attn.v_proj"] + [
        f"mlp.experts.{e}.up_proj" for e in range(3)]
    assert family.deepstack and family.expert_count == 3 and family.routed == 2
    # transformers 5.24 writes the count as num_local_experts into config.json; a config object answers both
    assert family_for("qwen3_vl_moe").bind({"text_config": {"num_local_experts": 5, "num_experts_per_tok": 1,
                                                             "num_hidden_layers": 2}}).expert_count == 5


def test_qwen3_vl_moe_agrees_with_transformers_on_which_layers_hold_experts():
    import transformers as tf
    from tiny_models import qwen3_vl_moe_config

    config = qwen3_vl_moe_config(layers=6, mlp_only_layers=[4], decoder_sparse_step=2)
    family = family_for("qwen3_vl_moe").bind(config)
    with torch.device("meta"):
        model = tf.Qwen3VLMoeForConditionalGeneration(config)
    held = tuple("sparse" if hasattr(layer.mlp, "experts") else "dense" for layer in model.model.language_model.layers)
    assert family.layer_types == held == ("dense", "sparse", "dense", "sparse", "dense", "sparse")


@pytest.mark.parametrize("text, says", [
    ({"decoder_sparse_step": 0}, r"qwen3_vl_moe: config decoder_sparse_step is 0; it must be a whole number"),
    ({"mlp_only_layers": [4]}, r"config mlp_only_layers is \[4\]; it must list layer indices from 0 to 3"),
    ({"mlp_only_layers": "1"}, r"config mlp_only_layers is '1'"),
    ({"num_hidden_layers": None}, r"config num_hidden_layers is None"),
    ({"num_experts": None}, r"config num_experts / num_local_experts is None; a mixture-of-experts model"),
    ({"num_experts_per_tok": 4}, r"config num_experts_per_tok is 4; it must be between 1 and num_experts"),
])
def test_qwen3_vl_moe_refuses_configs_it_cannot_read(text, says):
    with pytest.raises(ValueError, match=says):
        _vl_moe(**text)
