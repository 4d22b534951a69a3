"""How much N processes shorten a decoder layer, computed (not measured) from the loop's own operation counts and
its own solve assignment (``qvlquant.engine.estimate.layer_flops``): each rank runs 1/N of the calibration tokens, and
each linear's solve runs on one rank; with true-sequential GPTQ the groups are solved one after the other, so a
step's largest solve (down_proj: K = 29696 at 72B) does not split.

    python benchmarks/estimate_distributed.py

prints, per shape and method, the fraction of one process's per-layer work that the slowest of N ranks does, and
the 72B at 8 ranks from the per-layer figure of one process measured (2B, 7B) or computed (72B) on this CPU in
benchmarks/results/real_size_cpu.json and the README. Communication (broadcast of packed weights, hidden states
sent to rank 0) and disk reads are left out.
"""

from __future__ import annotations

import torch

from qvlquant.engine.estimate import layer_flops
from qvlquant.families import family_for
from qvlquant.tools.bench import SHAPES

SHAPES_72B = dict(hidden_size=8192, intermediate_size=29696, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8)  # the MLP padded to 29696 (--pad-intermediate-to 1024)
ONE_PROCESS_S_PER_LAYER = {  # this CPU, 2 threads, W4 g128, 641 tokens: measured (2B, 7B) / computed (72B)
    ("qwen2-vl-2b", "gptq"): 15.2, ("qwen2-vl-2b", "awq"): 22.2, ("qwen2-vl-7b", "gptq"): 133.8,
    ("qwen2-vl-7b", "awq"): 168.4, ("qwen2-vl-72b", "gptq"): 610.0, ("qwen2-vl-72b", "awq"): 635.0,
}


def stand_in_layer(text: dict) -> torch.nn.Module:
    """A module with the decoder layer's linears at their real shapes (on the meta device: no memory)."""
    h, i = text["hidden_size"], text["intermediate_size"]
    kv = h // text["num_attention_heads"] * text["num_key_value_heads"]
    layer = torch.nn.Module()
    with torch.device("meta"):
        layer.self_attn = torch.nn.Module()
        for name, (k, n) in dict(q_proj=(h, h), k_proj=(h, kv), v_proj=(h, kv), o_proj=(h, h)).items():
            setattr(layer.self_attn, name, torch.nn.Linear(k, n))
        layer.mlp = torch.nn.Module()
        for name, (k, n) in dict(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h)).items():
            setattr(layer.mlp, name, torch.nn.Linear(k, n))
    return layer


def main() -> None:
    family = family_for("qwen2_vl")
    shapes = {"qwen2-vl-2b": SHAPES["qwen2-vl-2b"], "qwen2-vl-7b": SHAPES["qwen2-vl-7b"], "qwen2-vl-72b": SHAPES_72B}
    runs = [("gptq", True), ("gptq", False), ("awq", True)]
    print("| shape | method | tokens | 2 ranks | 8 ranks |")
    print("|---|---|---|---|---|")
    for shape, text in shapes.items():
        layer = stand_in_layer(text)
        for tokens in (641, 128 * 1024):
            for method, seq in runs:
                one = layer_flops(layer, family, method, tokens, None, 1, seq)
                frac = [layer_flops(layer, family, method, tokens, None, n, seq) / one for n in (2, 8)]
                name = method + ("" if seq else " (no true-sequential)") if method == "gptq" else method
                print(f"| {shape} | {name} | {tokens} | {frac[0]:.2f} | {frac[1]:.2f} |")
    print()
    layer = stand_in_layer(SHAPES_72B)
    for method in ("gptq", "awq"):
        one = layer_flops(layer, family, method, 641, None, 1)
        eight = layer_flops(layer, family, method, 641, None, 8)
        s = ONE_PROCESS_S_PER_LAYER[("qwen2-vl-72b", method)]
        print(f"72B {method}, 641 tokens: one process {s:.0f} s/layer x {eight / one:.2f} = {s * eight / one:.0f} s "
              f"per layer on 8 ranks of this CPU's speed, {80 * s * eight / one / 3600:.1f} h for 80 layers "
              f"(one process: {80 * s / 3600:.1f} h)")


if __name__ == "__main__":
    main()
