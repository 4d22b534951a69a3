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
    for family in set(FAMILIES.values()) - {family_for("qwen3_5"), family_for("qwen3_5_moe")}:
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
