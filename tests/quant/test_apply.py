"""The per-layer methods read every model-specific name from the family declaration: a stub with Qwen-VL-Chat's
(first generation) module layout and call signature quantizes with GPTQ and AWQ, with no Qwen2 name involved."""

import math

import pytest
import torch
from torch import nn

from qvlquant.engine.loop import LoopPlan, quantize_model
from qvlquant.families import QWEN_VL_V1
from qvlquant.quant import apply
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.spec import METHODS, QuantConfig, QuantSpec

H, I, LAYERS = 64, 128, 2


class RMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(H))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class V1Attention(nn.Module):
    """QWenAttention's signature: it needs rotary_pos_emb_list and attention_mask from its block."""

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(H, 3 * H), nn.Linear(H, H, bias=False)

    def forward(self, hidden_states, rotary_pos_emb_list=None, layer_past=None, attention_mask=None, **kw):
        if rotary_pos_emb_list is None or attention_mask is None:
            raise TypeError("QWenAttention needs rotary_pos_emb_list and attention_mask")
        q, k, v = self.c_attn(hidden_states).split(H, dim=-1)
        q = q * rotary_pos_emb_list[0]
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(H) + attention_mask, dim=-1)
        return self.c_proj(scores @ v), None


class V1MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.c_proj = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.c_proj(self.w1(x) * nn.functional.silu(self.w2(x)))


class V1Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = RMSNorm(), V1Attention(), RMSNorm(), V1MLP()

    def forward(self, hidden_states, rotary_pos_emb_list=None, layer_past=None, attention_mask=None, use_cache=False):
        h = hidden_states + self.attn(self.ln_1(hidden_states), rotary_pos_emb_list=rotary_pos_emb_list,
                                      attention_mask=attention_mask)[0]
        return (h + self.mlp(self.ln_2(h)),)


class V1Model(nn.Module):
    """transformer.{wte, h, ln_f, visual} and lm_head, as Qwen-VL-Chat's remote code names them."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(100, H)
        self.transformer.h = nn.ModuleList(V1Block() for _ in range(LAYERS))
        self.transformer.ln_f = RMSNorm()
        self.transformer.visual = nn.Linear(8, H)
        self.lm_head = nn.Linear(H, 100, bias=False)

    def forward(self, input_ids, attention_mask, use_cache=False):
        x = self.transformer.wte(input_ids)
        s = input_ids.shape[1]
        causal = torch.full((s, s), float("-inf")).triu(1)
        rot = [torch.linspace(0.5, 1.5, H)]
        for block in self.transformer.h:
            x = block(x, rotary_pos_emb_list=rot, attention_mask=causal, use_cache=use_cache)[0]
        return self.lm_head(self.transformer.ln_f(x))


def batches():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 100, (2, 24), generator=g), "attention_mask": torch.ones(2, 24)}
            for _ in range(3)]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_qwen_vl_v1_layout_quantizes_from_its_declaration(method, monkeypatch):
    torch.manual_seed(0)
    model = V1Model().eval()
    data = batches()
    with torch.no_grad():
        before = [model(**b) for b in data]
    clipped = []
    clip_from_gram = apply.clip_from_gram
    monkeypatch.setattr(apply, "clip_from_gram",
                        lambda w, gram, spec: (clipped.append(w.shape), clip_from_gram(w, gram, spec))[1])
    qcfg = QuantConfig(method, QuantSpec(4, 32, method == "gptq"))
    result = quantize_model(model, data, LoopPlan(family=QWEN_VL_V1, qcfg=qcfg, pack_format=PackFormat.for_job(method)))
    assert sorted(result.weights) == sorted(f"transformer.h.{i}.{n}" for i in range(LAYERS) for n in QWEN_VL_V1.linears)
    if method == "awq":  # c_attn (q, k, v fused) is declared clip-skipped; c_proj, w1, w2, mlp.c_proj are clipped
        assert (3 * H, H) not in clipped and len(clipped) == 4 * LAYERS
        assert all(result.layer_info[f"transformer.h.0.{n}"]["scaled_by"] for n in ("attn.c_attn", "mlp.w1"))
    assert type(model.transformer.visual) is nn.Linear  # the vision tower is never touched
    with torch.no_grad():
        after = [model(**b) for b in data]
    err = sum((a - b).pow(2).sum() for a, b in zip(after, before)) / sum(b.pow(2).sum() for b in before)
    assert err < 0.05  # 4-bit g128 of a random 64-wide stub: the function is kept, not destroyed


def _output_error(config):
    torch.manual_seed(0)
    model = V1Model().eval()
    data = batches()
    with torch.no_grad():
        before = [model(**b) for b in data]
    plan = LoopPlan(family=QWEN_VL_V1, qcfg=config, pack_format=PackFormat.GPTQ)  # any width; nothing exported
    result = quantize_model(model, data, plan)
    with torch.no_grad():
        after = [model(**b) for b in data]
    return result, float(sum((a - b).pow(2).sum() for a, b in zip(after, before)) / sum(b.pow(2).sum() for b in before))


def test_awq_scales_then_gptq_rounding(monkeypatch):
    clipped = []
    monkeypatch.setattr(apply, "clip_from_gram", lambda *a, **k: clipped.append(1))
    spec = QuantSpec(3, 32, False)
    result, err = _output_error(QuantConfig("awq", spec, awq_rounding="gptq", damp_percent=0.01))
    _, err_rtn = _output_error(QuantConfig("awq", spec, awq_rounding="rtn", awq_clip=False))
    assert not clipped  # GPTQ rounds instead of the clipping search
    info = result.layer_info["transformer.h.0.attn.c_attn"]
    assert info["scaled_by"] == "ln_1" and info["damp_percent"] == 0.01 and "gptq_loss" in info and "ratio" in info
    w = result.weights["transformer.h.0.mlp.w1"]
    assert w.input_scale is not None and w.zero.min() >= 0  # AWQ's folded scale kept, zero points (AWQ layout)
    assert err < 0.8 * err_rtn  # the same scales, rounded by GPTQ against the calibration inputs: a lower error


class _OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, hidden, use_cache=False):
        return (self.lin(hidden),)


def test_vision_weight_counts_vision_tokens_that_many_times():
    from qvlquant.quant.layer import LayerInput

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    vision = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)  # [0, 4] is padding: never counted
    layer = _OneLinear().double()
    inputs = [LayerInput(x[i:i + 1], {}, mask[i:i + 1], vision_mask=vision[i:i + 1]) for i in range(2)]
    (S1, n1), = apply.collect_hessians(layer, inputs, [("lin",)]).values()
    (S3, n3), = apply.collect_hessians(layer, inputs, [("lin",)], vision_weight=3.0).values()
    seen = x[mask & vision]
    assert n1 == n3 == 9 and seen.shape[0] == 3
    torch.testing.assert_close(S3, S1 + 2 * seen.T @ seen)


def test_the_dispatch_holds_exactly_the_method_names():
    """spec.METHODS (what the config, recipes and CLI accept) and the layer functions are checked at import."""
    assert set(apply.LAYER_METHODS) == set(METHODS)
    apply.check_dispatch(apply.LAYER_METHODS, METHODS)
    with pytest.raises(RuntimeError, match=r"dispatches \['awq', 'gptq', 'rtn'\] but .* lists \['awq', 'gptq', 'rtn', 'smooth'\]"):
        apply.check_dispatch(apply.LAYER_METHODS, METHODS + ("smooth",))
    with pytest.raises(RuntimeError, match="add the method to both"):
        apply.check_dispatch({k: v for k, v in apply.LAYER_METHODS.items() if k != "awq"}, METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_rules_skip_override_and_switch_method_per_linear(method, demo, demo_batches):
    """Per-module rules: layer 1's MLP skipped (left exactly as it was: nothing quantized, nothing folded into
    it), layer 0's attention at 8 bits, and for GPTQ layer 2's down_proj rounded to nearest without a Hessian."""
    import copy

    from qvlquant.families import QWEN2_VL
    from qvlquant.quant.rtn import rtn_quantize
    from qvlquant.quant.rules import ModulePlan, parse_rule

    model, _ = demo
    q = copy.deepcopy(model)
    sym = method != "awq"
    qcfg = QuantConfig(method, QuantSpec(4, 128, sym))
    rules = [parse_rule(r"layers\.1\.mlp:skip"), parse_rule(r"layers\.0\.self_attn\.[qkvo]_proj:bits=8")]
    if method == "gptq":
        rules.append(parse_rule(r"layers\.2\.mlp\.down_proj:method=rtn"))
    plan = LoopPlan(family=QWEN2_VL, qcfg=qcfg, pack_format=PackFormat.COMPRESSED,
                    modules=ModulePlan.resolve(rules, qcfg))
    result = quantize_model(q, demo_batches, plan)
    prefix = "model.language_model.layers"
    before, after = model.get_submodule(f"{prefix}.1"), q.get_submodule(f"{prefix}.1")
    for name, t in before.state_dict().items():
        if name.startswith("mlp.") or name == "post_attention_layernorm.weight":
            assert torch.equal(after.state_dict()[name], t), name  # skipped: bit for bit
    record = result.store.load(1)
    assert "model.layers.1.mlp.down_proj.weight" in record.tensors
    assert not any(k.startswith("model.layers.1.mlp.") and "packed" in k for k in record.tensors)
    weights = result.weights
    assert len(weights) == 28 - 3 and f"{prefix}.1.mlp.up_proj" not in weights
    w8, w4 = weights[f"{prefix}.0.self_attn.o_proj"], weights[f"{prefix}.3.self_attn.o_proj"]
    assert (w8.spec.bits, w4.spec.bits) == (8, 4)
    err = lambda w, layer: float((w.effective_weight() - model.get_submodule(f"{prefix}.{layer}.self_attn.o_proj").weight).norm())  # noqa: E731
    scale = lambda layer: float(model.get_submodule(f"{prefix}.{layer}.self_attn.o_proj").weight.norm())  # noqa: E731
    assert err(w8, 0) / scale(0) < 0.1 * err(w4, 3) / scale(3)
    if method == "gptq":
        down = f"{prefix}.2.mlp.down_proj"
        q_codes, scale_, zero = rtn_quantize(model.get_submodule(down).weight.data, QuantSpec(4, 128, True))
        assert torch.equal(weights[down].q, q_codes) and "tokens" not in result.layer_info[down]
        assert "tokens" in result.layer_info[f"{prefix}.2.mlp.up_proj"]


def test_gptq_collects_the_experts_hessians_in_replays_bounded_in_memory(monkeypatch):
    """The copies of one group in every expert share a replay (they read no output of each other), in chunks of at
    most EXPERT_HESSIAN_BYTES of float64 sums; dense groups keep their own replays (true-sequential)."""
    from qvlquant.engine.experts import ExpertLinears
    from qvlquant.families import family_for
    from qvlquant.quant import apply

    family = family_for("qwen3_5_moe").bind({"text_config": {"num_experts": 5, "num_experts_per_tok": 2,
                                                             "layer_types": ["full_attention"]}})
    layer = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    layer.mlp.experts = ExpertLinears(5, family.expert_linears, 64, 32, torch.nn.SiLU(), torch.float32, "meta")
    layer.mlp.shared_expert = torch.nn.Module()
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer.mlp.shared_expert.add_module(name, torch.nn.Linear(64, 64, device="meta"))
    groups = [g for g in family.at(0).linear_groups if g[0].startswith("mlp.")]
    family = family.at(0)
    gate_up = 8 * 64 * 64  # one expert's gate/up sum: K = 64
    monkeypatch.setattr(apply, "EXPERT_HESSIAN_BYTES", 2 * gate_up)
    steps = apply.gptq_steps(layer, groups, family)
    assert [len(s) for s in steps] == [1, 1, 2, 2, 1, 5]  # shared gate/up, shared down, 5 gate/up in 3, 5 downs
    assert steps[2] == [("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"),
                        ("mlp.experts.1.gate_proj", "mlp.experts.1.up_proj")]
    assert steps[5] == [(f"mlp.experts.{e}.down_proj",) for e in range(5)]  # K = 32: 5 sums fit in 4 of K = 64
    monkeypatch.setattr(apply, "EXPERT_HESSIAN_BYTES", 1)  # one expert per replay at the least
    assert [len(s) for s in apply.gptq_steps(layer, groups, family)] == [1, 1] + [1] * 10
    one = apply.gptq_steps(layer, groups, family, true_sequential=False)
    assert one[0][:2] == groups[:2] and sum(map(len, one)) == len(groups) and len(one) == 10
