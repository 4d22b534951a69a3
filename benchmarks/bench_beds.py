"""BF16 against RTN W8, RTN W4 and GPTQ W4 on the embedded Qwen3.5 demo beds, through qvlquant's own quantize and eval.

    python benchmarks/bench_beds.py [--models demo-qwen3.5,demo-qwen3.5-moe] [--variants bf16,rtn-w8,rtn-w4,gptq-w4]
        [--limit 500] [--threads 1] [--json benchmarks/results/testbeds_qwen3_5_cpu.json]

Each variant but bf16 is quantized by ``qvlquant.quantize`` (group size 128, the demo's 64 calibration chats, the
method's defaults) into a temporary folder, exported, loaded back and scored by ``qvlquant.evaluation.evaluate``:
easy-vqa accuracy on the first ``--limit`` test questions (greedy) and the demo's held-out text perplexity, the
same two figures ``qvlquant eval`` prints. Each row records its quantize and eval seconds; the file records the
machine, thread count and load average, since the project's CPUs are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

VARIANTS = {  # name -> flat quantize settings (None: the checkpoint as shipped)
    "bf16": None,
    "rtn-w8": {"method": "rtn", "bits": 8, "group_size": 128},
    "rtn-w4": {"method": "rtn", "bits": 4, "group_size": 128},
    "gptq-w4": {"method": "gptq", "bits": 4, "group_size": 128, "calib": "demo"},
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo-qwen3.5,demo-qwen3.5-moe")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--limit", type=int, default=500, help="easy-vqa test questions scored (the first N)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=pathlib.Path, default=pathlib.Path("benchmarks/results/testbeds_qwen3_5_cpu.json"))
    args = ap.parse_args(argv)
    import torch

    import qvlquant
    from qvlquant.calib.easyvqa import load_split, majority_baseline
    from qvlquant.evaluation import EvalConfig, evaluate

    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    _, majority = majority_baseline(load_split("train"), load_split("test")[: args.limit])
    loads, rows, t0 = [os.getloadavg()], [], time.time()
    with tempfile.TemporaryDirectory(prefix="bench_beds_") as tmp:
        for model in args.models.split(","):
            for variant in variants:
                row = {"model": model, "variant": variant}
                path = model
                if VARIANTS[variant] is not None:
                    path = str(pathlib.Path(tmp) / f"{model}-{variant}")
                    t = time.time()
                    qvlquant.quantize(model=model, output=path, threads=args.threads, **VARIANTS[variant])
                    row["quantize_seconds"] = round(time.time() - t, 1)
                t = time.time()
                summary = evaluate(path, EvalConfig(limit=args.limit)).summary
                row.update(accuracy=summary["accuracy"], n=summary["n"], perplexity=summary["perplexity"],
                           eval_seconds=round(time.time() - t, 1))
                loads.append(os.getloadavg())
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        "torch": torch.__version__,
        "qvlquant": qvlquant.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "majority_accuracy": round(majority, 2),
        "seconds": round(time.time() - t0, 1),
        "load_average_1min": [round(x[0], 2) for x in loads],  # before the first row, then after each
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
