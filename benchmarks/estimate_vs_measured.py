"""The up-front estimate's seconds per layer against every measured layer loop on this project's CPU machine
(``benchmarks/results/real_size_cpu.json``, ``real_size_qwen3_5_cpu.json``): for each row that ran decoder layers,
the estimate recomputed now at the speed that row's own header measured (its GFLOP/s and, where recorded, its time
per small call; its load average), before and after the routed experts' own costs were counted
(``estimate.expert_work``). Data-free rows run no layer loop and print no estimate: listed as such.

Rows from before the header measured small calls take ``--call-us``; the time of a few-token linear per weight
element was measured by no recorded run: ``--weight-ns`` (``benchmarks/bench_estimate_rates.py`` measures it).

    python benchmarks/estimate_vs_measured.py --weight-ns 0.6
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the sibling script owns the shapes
from make_random_checkpoint import qwen3_5_config, real_config  # noqa: E402

from qvlquant.config import JobConfig  # noqa: E402
from qvlquant.engine import estimate as E  # noqa: E402
from qvlquant.engine.skeleton import build_skeleton  # noqa: E402
from qvlquant.families import family_for  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CONFIGS = {
    "qwen2-vl-2b-random": lambda: real_config("qwen2-vl-2b", layers=1),
    "qwen2-vl-7b-random": lambda: real_config("qwen2-vl-7b", layers=1),
    "qwen3.5-0.8b-random": lambda: qwen3_5_config("qwen3.5-0.8b", layers=4, interval=4),
    "qwen3.5-35b-a3b-random": lambda: qwen3_5_config("qwen3.5-35b-a3b", layers=2, interval=2),
}
SAMPLES = 16  # bench_real_size.py: --num-samples 16, one sample a batch


def layer_seconds(checkpoint: str, row: dict, speed: E.Speed) -> dict[str, tuple[float, float]]:
    """Per layer type: (before, after) seconds, at ``speed`` and the row's load, for the row's settings."""
    config = CONFIGS[checkpoint]()
    family = family_for(config.model_type).bind(config)
    skeleton = build_skeleton(config, family, torch.float32)
    settings = row.get("quant_settings") or {}
    kept = {k: settings[k] for k in ("true_sequential", "awq_grid", "awq_rounding") if k in settings}
    job = JobConfig.from_flat(output="-", method=row["method"], num_samples=SAMPLES, **kept)
    qcfg, tokens = job.quant, row["tokens"]
    load = (row.get("load_average_before") or [0.0])[0]
    slowdown = max(1.0, load / 2)  # the estimate's rule: load over this process's CPU quota (2 here)
    batches = math.ceil(SAMPLES / job.processing.batch_size)
    out = {}
    for i, kind_name in (family.first_layers() or {0: "layer"}).items():
        layer, kind = skeleton.get_submodule(family.decoder_layers)[i], family.at(i)
        before = (E.layer_flops(layer, kind, qcfg.method, tokens, None, 1, qcfg.true_sequential) / speed.flops
                  + E.layer_calls(layer, kind, qcfg, batches) * speed.call_seconds)
        elements, calls = E.expert_work(layer, kind, qcfg, tokens, batches)
        after = before + calls * speed.call_seconds + elements * speed.weight_seconds
        out[kind_name] = (before * slowdown, after * slowdown)
    return out


def measured_by_type(row: dict) -> dict[str, float]:
    """Mean measured seconds per layer type (hybrid models' rows list each layer), else {"layer": the mean}."""
    typed: dict[str, list] = {}
    for layer in row.get("layers") or []:
        typed.setdefault(layer["type"], []).append(layer["seconds"])
    return {t: sum(v) / len(v) for t, v in typed.items()} or {"layer": row["mean_layer_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weight-ns", type=float, required=True, help="a few-token linear's ns per weight element")
    p.add_argument("--call-us", type=float, default=10.3, help="us per small call where a row recorded none")
    p.add_argument("--gflops", type=float, default=174.0, help="GFLOP/s where a row recorded no estimate")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    table = []
    for name in ("real_size_cpu.json", "real_size_qwen3_5_cpu.json"):
        for index, row in enumerate(json.loads((RESULTS / name).read_text())["rows"]):
            where = f"{name}#{index} {row['checkpoint']} {row['method']}{row.get('bits') or ''}"
            if not row.get("mean_layer_s"):
                table.append(dict(row=where, note="no layer loop (data-free / straight from the checkpoint)"))
                continue
            est = row.get("estimate") or {}
            speed = E.Speed(flops=est.get("measured_gflops", args.gflops) * 1e9,
                            call_seconds=est.get("measured_call_us", args.call_us) * 1e-6,
                            weight_seconds=args.weight_ns * 1e-9)
            computed = layer_seconds(row["checkpoint"], row, speed)
            for kind, measured in measured_by_type(row).items():
                before, after = computed[kind]
                table.append(dict(row=where, layer=kind, measured_s=round(measured, 1), before_s=round(before, 1),
                                  after_s=round(after, 1), before_ratio=round(before / measured, 2),
                                  after_ratio=round(after / measured, 2), gflops=round(speed.flops / 1e9, 1),
                                  call_us=round(speed.call_seconds * 1e6, 1),
                                  recorded_estimate=est.get("seconds_per_layer")))
    print("| row | layer | measured s | estimate before s (x) | after s (x) |")
    print("|---|---|---|---|---|")
    for r in table:
        if "note" in r:
            print(f"| {r['row']} | - | - | {r['note']} | - |")
        else:
            print(f"| {r['row']} | {r['layer']} | {r['measured_s']} | {r['before_s']} ({r['before_ratio']}) | "
                  f"{r['after_s']} ({r['after_ratio']}) |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"computed_not_measured": True, "weight_ns": args.weight_ns,
                                                       "call_us_where_unrecorded": args.call_us,
                                                       "gflops_where_unrecorded": args.gflops, "rows": table},
                                                      indent=1) + "\n")


if __name__ == "__main__":
    main()
