"""engine/sensitivity.py: the streamed pass and the search on the demo (named apart from tests/quant/test_sensitivity.py:
pytest imports test modules by their base name)."""

import pytest
import torch

from qvlquant.config import SKIP_BITS
from qvlquant.engine.loop import InMemoryLayers, decoder_linears, fused_groups
from qvlquant.engine.sensitivity import (
    SensitivityPlan,
    group_rule,
    measure_model,
    search,
)
from qvlquant.families import QWEN2_VL
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.rules import ModulePlan, parse_rule, plan_rows, plan_total
from qvlquant.quant.spec import QuantConfig, QuantSpec

JOB = QuantConfig("gptq", QuantSpec(4, 128))


def plan_for(measure="layer", fixed=None, fmt=PackFormat.GPTQ, candidates=(3, 4, 8, SKIP_BITS)):
    return SensitivityPlan(family=QWEN2_VL, qcfg=JOB, pack_format=fmt, candidates=candidates, measure=measure,
                           fixed=fixed)


@pytest.fixture(scope="module", params=["layer", "output"])
def measured(request, demo, demo_batches):
    model, _ = demo
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = measure_model(model, demo_batches, plan_for(request.param))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every trial weight put back, bit for bit
    return request.param, table


def linears_of(demo):
    return decoder_linears(demo[0], QWEN2_VL)


def test_every_group_is_measured_and_more_bits_mean_less_error(measured):
    measure, table = measured
    assert [(r.layer, r.names[0].rsplit(".", 2)[-2:]) for r in table[:4]] == [
        (0, ["self_attn", "q_proj"]), (0, ["self_attn", "o_proj"]), (0, ["mlp", "gate_proj"]), (0, ["mlp", "down_proj"])]
    assert len(table) == 4 * 4
    for row in table:
        e = dict(row.errors)
        assert e[SKIP_BITS] == 0.0 < e[8] < e[4] < e[3], (measure, row)
        assert e[3] < 0.2  # relative errors: a fraction of the output's energy
        assert e[4] > 10 * e[8]


def test_the_two_measures_agree_on_the_most_sensitive_groups(demo, demo_batches):
    """Both rank groups by W3 error alike at the top (not identical: q/k errors pass a softmax before the layer
    output, which the linear's own output error cannot see)."""
    layer = {(r.layer, r.names): dict(r.errors)[3] for r in measure_model(demo[0], demo_batches, plan_for("layer"))}
    output = {(r.layer, r.names): dict(r.errors)[3] for r in measure_model(demo[0], demo_batches, plan_for("output"))}
    top = lambda d: set(sorted(d, key=d.get)[-4:])  # noqa: E731
    assert len(top(layer) & top(output)) >= 2


@pytest.mark.parametrize("target", [3.6, 4.25, 4.4, 5.0, 7.0])
def test_the_choice_meets_the_target_and_plan_rows_agrees_on_its_size(measured, demo, target):
    _, table = measured
    linears = linears_of(demo)
    plan = plan_for()
    result = search(table, plan, linears, target)
    modules = ModulePlan.resolve(result.rules, JOB, [n for n, _, _ in linears], fused_groups(QWEN2_VL, 4))
    total = plan_total(plan_rows(modules, linears, PackFormat.GPTQ))
    assert total["bits"] == result.bits and total["weights"] == result.weights
    assert result.bits_per_weight <= target
    # within one step: what is left of the budget buys no group its next wider candidate
    left = target * result.weights - result.bits
    steps = [min(sizes[w] - sizes[b] for w in plan.candidates if w > b)
             for sizes, b in zip(result.sizes, result.chosen) if b < max(plan.candidates)]
    assert all(step > left for step in steps)


def test_the_choice_is_never_worse_than_uniform_and_spends_extra_bits(measured, demo):
    """At uniform W4's own size the choice errs no more than uniform W4 (which is one of its options); a quarter
    bit more buys a mix with strictly less error."""
    measure, table = measured
    linears = linears_of(demo)
    uniform = plan_total(plan_rows(ModulePlan(JOB), linears, PackFormat.GPTQ))
    at_uniform = search(table, plan_for(measure), linears, uniform["bits"] / uniform["weights"])
    w4 = sum(dict(r.errors)[4] for r in table)
    assert at_uniform.error() <= w4 and at_uniform.bits <= uniform["bits"]
    more = search(table, plan_for(measure), linears, uniform["bits"] / uniform["weights"] + 0.25)
    assert more.rules and more.error() < 0.9 * w4


def test_rules_given_alongside_fix_their_linears_and_count_in_the_budget(demo, demo_batches):
    linears = linears_of(demo)
    names = [n for n, _, _ in linears]
    fixed = ModulePlan.resolve((parse_rule(r"layers\.0\.mlp\.down_proj:bits=8"), parse_rule(r"layers\.3\.mlp:skip")),
                               JOB, names)
    plan = plan_for("output", fixed=fixed)
    table = measure_model(demo[0], demo_batches, plan)
    searched = {n for r in table for n in r.names}
    assert not any("layers.0.mlp.down_proj" in n or "layers.3.mlp" in n for n in searched)
    assert len(table) == 16 - 3
    result = search(table, plan, linears, 7.0)
    modules = ModulePlan.resolve(tuple(r for r, _ in fixed.rules) + result.rules, JOB, names, fused_groups(QWEN2_VL, 4))
    total = plan_total(plan_rows(modules, linears, PackFormat.GPTQ))
    assert total["bits"] == result.bits and total["bits_per_weight"] <= 7.0
    assert modules.config_for("model.language_model.layers.3.mlp.up_proj") is None
    assert modules.config_for("model.language_model.layers.0.mlp.down_proj").spec.bits == 8
    with pytest.raises(ValueError, match=r"target_bits 5.5 is below the smallest candidate, W3 at 5\.\d+ .*fixed by rules"):
        search(table, plan, linears, 5.5)  # the skipped MLP lifts the floor above 5.5


def test_a_target_out_of_reach_names_it_and_the_candidates_size(measured, demo):
    _, table = measured
    with pytest.raises(ValueError, match=r"target_bits 3 is below the smallest candidate, W3 at 3\.2\d+ bits per weight"):
        search(table, plan_for(), linears_of(demo), 3.0)
    with pytest.raises(ValueError, match=r"target_bits 17 is above the largest candidate, 16 \(kept\) at 16\.0000"):
        search(table, plan_for(), linears_of(demo), 17.0)


def test_group_rules_match_exactly_their_group():
    names = ("model.language_model.layers.1.self_attn.q_proj", "model.language_model.layers.1.self_attn.k_proj",
             "model.language_model.layers.1.self_attn.v_proj")
    rule = group_rule(names, 8)
    assert all(rule.matches(n) for n in names) and rule.settings == (("bits", 8),)
    for other in ("model.language_model.layers.11.self_attn.q_proj", "model.language_model.layers.1.self_attn.o_proj",
                  "xmodel.language_model.layers.1.self_attn.q_proj", "model.language_model.layers.1.self_attn.q_proj2"):
        assert not rule.matches(other)
    assert group_rule(names[:1], SKIP_BITS).skip


class RecordingLayers(InMemoryLayers):
    def __init__(self, model, family):
        super().__init__(model, family)
        self.events = []

    def after_capture(self):
        self.events.append("capture done")

    def load(self, i):
        self.events.append(("load", i))
        return super().load(i)

    def release(self, i):
        self.events.append(("release", i))


def test_the_pass_holds_one_layer_at_a_time_after_the_capture(demo, demo_batches):
    source = RecordingLayers(demo[0], QWEN2_VL)
    measure_model(demo[0], demo_batches, plan_for("output"), source)
    assert source.events == ["capture done"] + [e for i in range(4) for e in (("load", i), ("release", i))]


class ToyLayer(torch.nn.Module):
    """A residual layer x + W2 relu(W1 x): what a decoder layer's error measures need (a forward over the
    captured hidden states, named linears)."""

    def __init__(self, w1, w2):
        super().__init__()
        self.up, self.down = torch.nn.Linear(128, 256, bias=False), torch.nn.Linear(256, 128, bias=False)
        self.up.weight.data, self.down.weight.data = w1.clone(), w2.clone()

    def forward(self, hidden, use_cache=False):
        return hidden + self.down(torch.relu(self.up(hidden)))


@pytest.mark.parametrize("measure", ["layer", "output"])
def test_errors_of_a_loud_layer_and_a_quiet_one_compare(measure):
    """Layers are weighed alike whatever their scale: the same layer fed inputs 8x larger (a deeper residual
    stream) measures the same relative errors, where absolute errors would differ 64x."""
    from qvlquant.engine.sensitivity import measure_layer
    from qvlquant.quant.layer import LayerInput

    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(256, 128, generator=g) / 11, torch.randn(128, 256, generator=g) / 16
    hidden = torch.randn(2, 16, 128, generator=g)
    mask = torch.ones(2, 16, dtype=torch.bool)
    plan = plan_for(measure, candidates=(3, 4, 8))
    groups = [("up",), ("down",)]

    def errors(scale):
        return measure_layer(ToyLayer(w1, w2), [LayerInput(scale * hidden, {}, mask)], groups, plan)

    quiet, loud = errors(1.0), errors(8.0)
    for group in groups:
        for bits in (3, 4, 8):
            assert loud[group][bits] == pytest.approx(quiet[group][bits], rel=1e-3), (group, bits)
        assert quiet[group][8] < quiet[group][4] < quiet[group][3] < 0.5


def test_every_fused_layer_lies_inside_one_search_unit():
    """The search gives one width per unit: a unit that split one of vLLM's fused layers would be refused. The dense
    families' fused layers lie inside one linear group (a unit each, as before); an MoE layer's experts, one group per
    expert, are joined into one unit."""
    from qvlquant.engine.sensitivity import search_units
    from qvlquant.families import FAMILIES

    config = {"text_config": {"num_experts": 3, "num_experts_per_tok": 2, "num_hidden_layers": 2,
                              "layer_types": ["linear_attention", "full_attention"]}}
    for family in FAMILIES.values():
        bound = family.bind(config)
        for i in range(2):
            layout = bound.at(i)
            units = search_units(layout, list(layout.linear_groups))
            assert sorted(g for u in units for g in u) == sorted(layout.linear_groups)
            for _, parts in layout.fused:
                assert any(set(parts) <= {n for g in u for n in g} for u in units), (family.name, parts)
            if not family.experts:
                assert units == [(g,) for g in layout.linear_groups]
    moe = FAMILIES["qwen3_5_moe"].bind(config).at(1)
    experts = [u for u in search_units(moe, list(moe.linear_groups)) if len(u) > 1]
    assert experts == [tuple(g for g in moe.linear_groups if g[0].startswith("mlp.experts."))]
    rule = group_rule([f"model.language_model.layers.1.{n}" for g in experts[0] for n in g], 8)
    assert rule.pattern == r"^model\.language_model\.layers\.1\.mlp\.experts\.(?:\d+\.(?:gate_proj|up_proj|down_proj))$"
    assert rule.matches("model.language_model.layers.1.mlp.experts.2.down_proj")
    assert not rule.matches("model.language_model.layers.1.mlp.shared_expert.down_proj")
