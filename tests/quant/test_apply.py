"""The per-layer methods read every model-specific name from the family declaration: a stub with Qwen-VL-Chat's
(first generation) module layout and call signature quantizes with GPTQ and AWQ, with no Qwen2 name involved."""

import math

import pytest
import torch
from torch import nn

from qvlquant.config import QuantConfig
from qvlquant.families import QWEN_VL_V1
from qvlquant.pipeline import LoopPlan, quantize_model
from qvlquant.quant import apply
from qvlquant.quant.rtn import QuantSpec

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
    result = quantize_model(model, data, LoopPlan(QWEN_VL_V1, QuantConfig(method, QuantSpec(4, 32, method == "gptq"))))
    assert sorted(result.weights) == sorted(f"transformer.h.{i}.{n}" for i in range(LAYERS) for n in QWEN_VL_V1.linears)
    if method == "awq":  # c_attn (q, k, v fused) is declared clip-skipped; c_proj, w1, w2, mlp.c_proj are clipped
        assert (3 * H, H) not in clipped and len(clipped) == 4 * LAYERS
        assert all(result.layer_info[f"transformer.h.0.{n}"]["scaled_by"] for n in ("attn.c_attn", "mlp.w1"))
    assert type(model.transformer.visual) is nn.Linear  # the vision tower is never touched
    with torch.no_grad():
        after = [model(**b) for b in data]
    err = sum((a - b).pow(2).sum() for a, b in zip(after, before)) / sum(b.pow(2).sum() for b in before)
    assert err < 0.05  # 4-bit g128 of a random 64-wide stub: the function is kept, not destroyed
