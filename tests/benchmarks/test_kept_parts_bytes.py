"""benchmarks/kept_parts_bytes.py against a count by hand of the demo MoE bed's decoder linears (its config.json: hidden
256; DeltaNet key 16 x 16, value 32 x 16; attention 4 heads of 64, gated q, 2 kv heads; 16 experts of 128, top 2, a
shared expert of 128; layers 3 DeltaNet + 1 attention) in GPTQ's W4 g128 layout."""

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("kept_parts_bytes", BENCH / "kept_parts_bytes.py")
kept_parts_bytes = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = kept_parts_bytes
spec.loader.exec_module(kept_parts_bytes)

H, KEY, VALUE, HEADS, E, TOP = 256, 16 * 16, 32 * 16, 32, 16, 2
DELTANET = [(H, 2 * KEY + VALUE), (H, VALUE), (H, HEADS), (H, HEADS), (VALUE, H)]  # (in K, out N)
ATTENTION = [(H, 2 * 4 * 64), (H, 2 * 64), (H, 2 * 64), (4 * 64, H)]
EXPERT = [(H, 128), (H, 128), (128, H)]  # each routed expert's, and the shared expert's


def w4_bits(k: int, n: int) -> int:
    """GPTQ v1, W4 g128: qweight int32 [K/8, N], qzeros int32 [K/128, N/8], scales fp16 [K/128, N], g_idx int32 [K]."""
    return 4 * k * n + 32 * (k // 128) * (n // 8) + 16 * (k // 128) * n + 32 * k


def bits(linears, kept=False) -> int:
    return sum(16 * k * n if kept else w4_bits(k, n) for k, n in linears)


@pytest.fixture(scope="module")
def moe():
    return kept_parts_bytes.row("demo-qwen3.5-moe")


def test_shares_and_added_bytes_match_a_count_by_hand(moe):
    parts = {"linear_attn": 3 * DELTANET, "self_attn": ATTENTION, "shared_expert": 4 * EXPERT}
    routed = 4 * E * EXPERT
    weights = sum(k * n for ls in (*parts.values(), routed) for k, n in ls)
    total = sum(bits(ls) for ls in (*parts.values(), routed))
    token = sum(bits(ls) for ls in parts.values()) + bits(routed) * TOP / E
    assert moe["decoder_linear_weights"] == weights and moe["w4_bytes"] == total // 8
    for part, linears in parts.items():
        added = bits(linears, kept=True) - bits(linears)
        assert moe[part] == {"weight_share": round(sum(k * n for k, n in linears) / weights, 4),
                             "bytes_added": round(added / total, 4),
                             "token_bytes_added": round(added / token, 4)}


def test_a_dense_bed_has_no_shared_expert_and_no_per_token_figure():
    dense = kept_parts_bytes.row("demo-qwen3.5")
    assert "shared_expert" not in dense and "token_bytes_added" not in dense["linear_attn"]
    assert dense["linear_attn"]["weight_share"] == round(3 * sum(k * n for k, n in DELTANET)
                                                         / dense["decoder_linear_weights"], 4)
