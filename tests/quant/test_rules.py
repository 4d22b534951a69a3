import re

import pytest

from qvlquant.quant.formats import PackFormat
from qvlquant.quant.rules import (
    ModulePlan,
    Rule,
    config_with,
    describe,
    format_plan,
    packed_bits,
    parse_rule,
    plan_rows,
    plan_total,
    rule_from_mapping,
)
from qvlquant.quant.spec import QuantConfig, QuantSpec

PREFIX = "model.language_model.layers"
NAMES = [f"{PREFIX}.{i}.{n}" for i in range(4) for n in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]
FUSED = [[f"{PREFIX}.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(4)]


def test_rules_parse_from_text_and_mappings():
    rule = parse_rule(r"layers\.(0|3)\.mlp:bits=8,group_size=64,sym=false")
    assert rule == Rule(r"layers\.(0|3)\.mlp", settings=(("bits", 8), ("group_size", 64), ("sym", False)))
    assert parse_rule("a:b:skip") == Rule("a:b", skip=True)  # the last colon separates the action
    assert parse_rule(rule.text()) == rule  # what the plan prints parses back
    assert rule_from_mapping(rule.to_dict(), "r.yaml") == rule
    assert rule_from_mapping({"pattern": "x", "skip": True}, "r.yaml") == Rule("x", skip=True)


@pytest.mark.parametrize("text,message", [
    ("mlp.down_proj", "write PATTERN:skip or PATTERN:bits=8"),
    ("x:bits=eight", "bits must be a whole number"),
    ("x:color=red", "unknown setting 'color'"),
    ("x:sym=maybe", "sym must be true or false"),
    ("x:bits", "'bits' is not key=value"),
    ("[:skip", "not a regular expression"),
    ("x:method=awq", "method must be one of rtn, gptq"),
    (":skip", "write PATTERN:skip"),
])
def test_bad_rules_are_errors_quoting_them(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_rule(text)


def test_a_rule_gives_skip_or_settings_never_both():
    with pytest.raises(ValueError, match="either skip or settings"):
        Rule("x")
    with pytest.raises(ValueError, match="not both"):
        rule_from_mapping({"pattern": "x", "skip": True, "bits": 8}, "r.yaml")
    with pytest.raises(ValueError, match="r.yaml: each rule is a mapping"):
        rule_from_mapping(["x"], "r.yaml")


def test_first_match_wins_and_unmatched_linears_keep_the_job_settings():
    job = QuantConfig("gptq")
    plan = ModulePlan.resolve([parse_rule(r"layers\.0\.:skip"), parse_rule("mlp:bits=8")], job, NAMES)
    assert plan.config_for(f"{PREFIX}.0.mlp.down_proj") is None  # the skip comes first
    assert plan.config_for(f"{PREFIX}.1.mlp.down_proj").spec == QuantSpec(8, 128, True)
    assert plan.config_for(f"{PREFIX}.1.self_attn.o_proj") is job
    rows = {r["setting"]: r["linears"] for r in plan_rows(plan, [(n, 256, 256) for n in NAMES], PackFormat.GPTQ)}
    assert rows == {"skip": 7, "W4g128 gptq": 12, "W8g128 gptq": 9}


def test_a_rule_that_matches_no_linear_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"rule 'vision\.blocks:skip' matches no quantizable linear.*"
                                         r"model\.language_model\.layers\.0\.self_attn\.q_proj"):
        ModulePlan.resolve([parse_rule("self_attn:bits=8"), parse_rule("vision.blocks:skip")], QuantConfig(), NAMES)


def test_fused_linears_need_one_setting():
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn: q_proj: W8g128 rtn, k_proj: W4g128 rtn, "
                                         r"v_proj: W4g128 rtn; vLLM runs these linears as one fused layer"):
        ModulePlan.resolve([parse_rule(r"2\.self_attn\.q_proj:bits=8")], QuantConfig(), NAMES, FUSED)
    with pytest.raises(ValueError, match="k_proj: skip"):
        ModulePlan.resolve([parse_rule(r"2\.self_attn\.k_proj:skip")], QuantConfig(), NAMES, FUSED)
    ModulePlan.resolve([parse_rule(r"2\.self_attn\.[qkv]_proj:bits=8")], QuantConfig(), NAMES, FUSED)


def test_an_moe_layers_experts_need_one_setting():
    """vLLM runs a layer's experts as one MoE layer (the family's fused ``mlp.experts``): a rule reaching some of
    them is refused, the error counting the linears per setting rather than listing every expert."""
    from qvlquant.engine.loop import fused_groups
    from qvlquant.families import family_for

    family = family_for("qwen3_5_moe").bind({"text_config": {"num_experts": 64, "num_experts_per_tok": 2,
                                                             "layer_types": ["full_attention"] * 2}})
    names = [f"{PREFIX}.{i}.{n}" for i in range(2) for n in family.at(i).linears]
    with pytest.raises(ValueError, match=r"^model\.language_model\.layers\.1\.mlp\.experts: 190 linears W4g128 rtn "
                                         r"\(first 0\.gate_proj\), 2 linears skip \(first 5\.up_proj\); vLLM runs"):
        ModulePlan.resolve([parse_rule(r"1\.mlp\.experts\.(5|9)\.up_proj:skip")], QuantConfig(), names,
                           fused_groups(family, 2))
    whole = ModulePlan.resolve([parse_rule(r"1\.mlp\.experts\.:bits=8")], QuantConfig(), names, fused_groups(family, 2))
    assert whole.config_for(f"{PREFIX}.1.mlp.experts.63.down_proj").spec.bits == 8


def test_a_rule_re_resolves_width_dependent_defaults_but_keeps_what_was_given():
    w4 = QuantConfig("gptq")
    assert w4.mse == 0.0 and config_with(w4, parse_rule("x:bits=3")).mse == 2.4  # mse is GPTQ's default below 4 bits
    given = QuantConfig("gptq", mse=3.0)
    assert config_with(given, parse_rule("x:bits=8")).mse == 3.0
    assert config_with(w4, parse_rule("x:bits=8")).damp_percent == w4.damp_percent
    rtn = config_with(w4, parse_rule("x:method=rtn,bits=8"))
    assert rtn.method == "rtn" and rtn.spec.bits == 8 and not rtn.desc_act
    awq = config_with(QuantConfig("awq"), parse_rule("x:bits=3"))
    assert awq.awq_rounding == "rtn" and awq.spec == QuantSpec(3, 128, False)  # the job's rounding, not W3's
    with pytest.raises(ValueError, match="method awq cannot be switched"):
        config_with(QuantConfig("awq"), parse_rule("x:method=gptq"))
    with pytest.raises(ValueError, match=r"rule 'x:bits=5': bits must be 2, 3, 4 or 8"):
        ModulePlan.resolve([Rule("x", settings=(("bits", 5),))], w4)


def test_bits_per_weight_count_scales_zeros_and_indices():
    # W4 g128 GPTQ of a 256 x 256 linear: 4-bit codes, an fp16 scale and a 4-bit zero per 128 weights, a 32-bit
    # g_idx entry per input column shared by 256 rows
    assert packed_bits(PackFormat.GPTQ, QuantSpec(4, 128, True), 256, 256) / 256**2 == 4 + 16 / 128 + 4 / 128 + 32 / 256
    # compressed-tensors, symmetric: codes and scales only, plus its two-int64 shape
    assert packed_bits(PackFormat.COMPRESSED, QuantSpec(8, 64, True), 256, 512) == 8 * 256 * 512 + 16 * 4 * 512 + 128
    plan = ModulePlan.resolve([parse_rule("down:skip")], QuantConfig(), NAMES)
    rows = plan_rows(plan, [(n, 256, 256) for n in NAMES], PackFormat.GPTQ)
    skip = next(r for r in rows if r["setting"] == "skip")
    assert skip["bits_per_weight"] == 16 and skip["bytes"] == 4 * 256 * 256 * 2
    total = plan_total(rows)
    assert total["linears"] == 28 and total["weights"] == 28 * 256**2
    assert total["bits_per_weight"] == pytest.approx((24 * 4.28125 + 4 * 16) / 28, abs=1e-4)
    assert "skip" in format_plan(rows) and describe(None) == "skip" and describe(QuantConfig(spec=QuantSpec(8, -1, False))) == "W8 per-channel asym rtn"
