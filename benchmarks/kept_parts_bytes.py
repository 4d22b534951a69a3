"""What keeping one part of a Qwen3.5 model in 16-bit costs at W4: computed from the shapes, nothing run.

    python benchmarks/kept_parts_bytes.py [--json benchmarks/results/kept_parts_bytes.json]

For the two demo beds and the released shapes of benchmarks/make_random_checkpoint.py (Qwen3.5-0.8B, -2B, -35B-A3B,
-397B-A17B), the decoder linears of a meta-device skeleton (no weights) are counted by ``quantize``'s own plan
(``qvlquant.quant.rules.plan_rows``: GPTQ W4 g128 in the GPTQ layout, scales, zeros and ``g_idx`` counted; a
skipped linear at 16 bits), once with every linear at W4 and once per part kept by a skip rule (``linear_attn\\.``,
``self_attn\\.``, ``shared_expert\\.``). Per row: the part's share of the decoder-linear weights, and what keeping it
adds to the decoder linears' bytes; for an MoE, also to the bytes one token reads (the routed experts counted at
``num_experts_per_tok`` / ``num_experts`` of theirs), which is what bounds decoding speed where the weights are read
from memory. The released shapes are built with 4 decoder layers, one period of their 3 DeltaNet + 1 full-attention
layers (their 24, 40 and 60 layers are whole periods), so every share is the whole model's. Embeddings, lm_head, the
vision tower and the MTP head, never quantized, are not counted.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from make_random_checkpoint import QWEN3_5, qwen3_5_config  # noqa: E402

from qvlquant.assets.paths import EMBEDDED_MODELS  # noqa: E402
from qvlquant.config import JobConfig  # noqa: E402
from qvlquant.engine.loop import decoder_linears  # noqa: E402
from qvlquant.engine.skeleton import build_skeleton, load_config  # noqa: E402
from qvlquant.families import family_for  # noqa: E402
from qvlquant.quant.rules import ModulePlan, plan_rows, plan_total  # noqa: E402

PARTS = ("linear_attn", "self_attn", "shared_expert")
BEDS = ("demo-qwen3.5", "demo-qwen3.5-moe")


def bits(config: JobConfig, linears, counted=None) -> int:
    """Bits of ``counted`` (default: all ``linears``) under ``config``'s plan, its rules checked on ``linears``."""
    plan = ModulePlan.resolve(config.rules, config.loop_quant, [n for n, _, _ in linears])
    return plan_total(plan_rows(plan, linears if counted is None else counted, config.pack_format))["bits"]


def row(shape: str) -> dict:
    if shape in BEDS:
        folder = EMBEDDED_MODELS[shape]
        hf = load_config(folder, family_for(json.loads((folder / "config.json").read_text())["model_type"]))
    else:
        hf = qwen3_5_config(shape, layers=4)
    family = family_for(hf.model_type).bind(hf)
    skeleton = build_skeleton(hf, family, torch.bfloat16)
    linears = decoder_linears(skeleton, family)
    experts = [x for x in linears if ".mlp.experts." in x[0]]
    others = [x for x in linears if ".mlp.experts." not in x[0]]
    read = family.routed / family.expert_count if family.expert_count else None
    out = {"shape": shape, "model_type": hf.model_type, "decoder_layers_built": len(family.layer_types),
           "decoder_linear_weights": sum(k * n for _, k, n in linears)}
    w4 = JobConfig.from_flat(model=shape, method="gptq", bits=4, group_size=128, output="unused", calib="demo")
    total = bits(w4, linears)
    out["w4_bytes"] = total // 8
    if read is not None:
        token = bits(w4, linears, others) + read * bits(w4, linears, experts)
    for part in PARTS:
        names = [x for x in linears if f".{part}." in x[0]]
        if not names:
            continue
        keep = JobConfig.from_flat(model=shape, method="gptq", bits=4, group_size=128, output="unused", calib="demo",
                                   rules=[rf"{part}\.:skip"])
        entry = {"weight_share": round(sum(k * n for _, k, n in names) / out["decoder_linear_weights"], 4),
                 "bytes_added": round(bits(keep, linears) / total - 1, 4)}
        if read is not None:
            kept_token = bits(keep, linears, others) + read * bits(keep, linears, experts)
            entry["token_bytes_added"] = round(kept_token / token - 1, 4)
        out[part] = entry
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=pathlib.Path, default=pathlib.Path("benchmarks/results/kept_parts_bytes.json"))
    args = ap.parse_args(argv)
    rows = [row(shape) for shape in (*BEDS, *QWEN3_5)]
    for r in rows:
        print(json.dumps(r))
    args.json.write_text(json.dumps({"settings": "GPTQ W4 g128, GPTQ layout; skipped linears at 16 bits",
                                     "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
