"""BF16 against RTN, GPTQ and AWQ on the embedded Qwen3.5 demo beds, through qvlquant's own quantize and eval, with
spreads over calibration draws.

    python benchmarks/bench_beds.py [--models demo-qwen3.5,demo-qwen3.5-moe] [--variants bf16,rtn-w8,...]
        [--seeds 0,1,2] [--min-expert-tokens 128] [--limit 500] [--threads 1]
        [--json benchmarks/results/testbeds_qwen3_5_cpu.json]

Each variant but bf16 is quantized by ``qvlquant.quantize`` (group size 128, the method's defaults otherwise) into a
temporary folder, exported, loaded back and scored by ``qvlquant.evaluation.evaluate``: easy-vqa accuracy on the
first ``--limit`` test questions (greedy) and the demo's held-out text perplexity, the same two figures
``qvlquant eval`` prints. A calibrated variant (GPTQ, AWQ) runs once per ``--seeds`` draw: the seed of
``quantize``'s calibration draw (64 samples of the demo source, as ``qvlquant quantize --seed`` draws them, and as
benchmarks/bench_methods.py draws its seeds); BF16 and RTN read no calibration data and run once.

Variants beyond the plain methods:
- ``gptq-w4-rare-rtn`` / ``gptq-w4-rare-all`` (MoE models only): experts the router sent fewer than
  ``--min-expert-tokens`` calibration tokens are rounded to nearest, or calibrated on all tokens of their layer
  (``rare_experts``); each row records how many experts that was.
- ``gptq-w4-keep-*``: GPTQ W4 with one part left in 16-bit (``--ignore PATTERN``); each row records the export's
  size, so the scores can be read against it.

Each row records its quantize and eval seconds, the export's bytes and the 1-minute load average before and after it;
the file also holds each run's settings and machine (``runs``; ``--append`` adds a run to an earlier file) and
per-(model, variant) mean +- sample standard deviation over the draws. It is rewritten after every row, so an
interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

W4 = {"bits": 4, "group_size": 128}
GPTQ_W4 = {"method": "gptq", **W4}
VARIANTS = {  # name -> flat quantize settings (None: the checkpoint as shipped)
    "bf16": None,
    "rtn-w8": {"method": "rtn", "bits": 8, "group_size": 128},
    "rtn-w4": {"method": "rtn", **W4},
    "gptq-w4": GPTQ_W4,
    "awq-w4": {"method": "awq", **W4},
    "gptq-w4-rare-rtn": {**GPTQ_W4, "rare_experts": "rtn"},  # min_expert_tokens from --min-expert-tokens
    "gptq-w4-rare-all": {**GPTQ_W4, "rare_experts": "all_tokens"},
    "gptq-w4-keep-linear_attn": {**GPTQ_W4, "rules": [r"linear_attn\.:skip"]},
    "gptq-w4-keep-self_attn": {**GPTQ_W4, "rules": [r"self_attn\.:skip"]},
    "gptq-w4-keep-shared_expert": {**GPTQ_W4, "rules": [r"shared_expert\.:skip"]},
}
MOE_ONLY = ("gptq-w4-rare-rtn", "gptq-w4-rare-all", "gptq-w4-keep-shared_expert")
DEFAULT_VARIANTS = ("bf16", "rtn-w8", "rtn-w4", "gptq-w4", "awq-w4")


def settings_of(variant: str, min_expert_tokens: int) -> dict | None:
    """The flat quantize settings of ``variant``; the rare-expert variants get the threshold."""
    settings = VARIANTS[variant]
    if settings is not None and "rare_experts" in settings:
        settings = {**settings, "min_expert_tokens": min_expert_tokens}
    return settings


def jobs(models: list[str], variants: list[str], seeds: list[int]):
    """(model, variant, seed) in run order: each calibrated variant once per seed, the others once (seed None);
    the MoE-only variants on the MoE models only."""
    for model in models:
        for variant in variants:
            if variant in MOE_ONLY and "moe" not in model:
                continue
            settings = VARIANTS[variant]
            calibrated = settings is not None and settings["method"] != "rtn"
            for seed in seeds if calibrated else [None]:
                yield model, variant, seed


def export_bytes(folder: pathlib.Path) -> int:
    """Bytes of the exported weights (the .safetensors files)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def rare_expert_count(report: dict) -> int | None:
    """Distinct experts the quantize report names as rarely reached (rounded, or calibrated on all tokens)."""
    experts = report.get("experts")
    if not experts:
        return None
    linears = experts["rounded_to_nearest"] + experts["calibrated_on_all_tokens"]
    return len({name.rpartition(".")[0] for name in linears})


def run_row(model: str, variant: str, seed: int | None, args, tmp: str) -> dict:
    """Quantize (unless bf16), export, load back and score one row."""
    import qvlquant
    from qvlquant.evaluation import EvalConfig, evaluate

    row = {"model": model, "variant": variant, "seed": seed, "load_before": round(os.getloadavg()[0], 2)}
    path = model
    settings = settings_of(variant, args.min_expert_tokens)
    if settings is not None:
        path = pathlib.Path(tmp) / f"{model}-{variant}-{seed}"
        extra = {} if seed is None else {"seed": seed}
        t = time.time()
        report = qvlquant.quantize(model=model, output=str(path), threads=args.threads, **settings, **extra)
        row["quantize_seconds"] = round(time.time() - t, 1)
        row["export_bytes"] = export_bytes(path)
        if "rare_experts" in settings:
            row["min_expert_tokens"] = settings["min_expert_tokens"]
            row["rare_experts_affected"] = rare_expert_count(report)
    t = time.time()
    summary = evaluate(str(path), EvalConfig(limit=args.limit)).summary
    row.update(accuracy=summary["accuracy"], n=summary["n"], perplexity=summary["perplexity"],
               eval_seconds=round(time.time() - t, 1), load_after=round(os.getloadavg()[0], 2))
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, variant): mean and sample standard deviation of accuracy and perplexity over its rows (std None
    for a single row), with the rows' seeds and the other recorded figures' means."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["variant"]), []).append(row)
    table = []
    for (model, variant), rs in groups.items():
        entry = {"model": model, "variant": variant, "seeds": [r["seed"] for r in rs]}
        for key in ("accuracy", "perplexity"):
            values = [r[key] for r in rs]
            entry[key] = round(statistics.mean(values), 3)
            entry[f"{key}_std"] = round(statistics.stdev(values), 3) if len(values) > 1 else None
        for key in ("export_bytes", "rare_experts_affected", "quantize_seconds", "eval_seconds"):
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                entry[key] = round(statistics.mean(values), 1)
        table.append(entry)
    return table


def earlier(path: pathlib.Path, append: bool) -> tuple[list[dict], list[dict]]:
    """(runs' meta, rows) already in ``path`` under ``--append``; nothing otherwise."""
    if not append or not path.exists():
        return [], []
    data = json.loads(path.read_text())
    return data["runs"], data["rows"]


def write(path: pathlib.Path, runs: list[dict], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs, "summary": summarize(rows), "rows": rows}, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo-qwen3.5,demo-qwen3.5-moe")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2", help="calibration draws of the calibrated variants, comma-separated")
    ap.add_argument("--min-expert-tokens", type=int, default=128, help="the rare-expert variants' threshold")
    ap.add_argument("--limit", type=int, default=500, help="easy-vqa test questions scored (the first N)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=pathlib.Path, default=pathlib.Path("benchmarks/results/testbeds_qwen3_5_cpu.json"))
    ap.add_argument("--append", action="store_true", help="keep the runs and rows already in --json, add this run's")
    args = ap.parse_args(argv)
    import torch

    import qvlquant
    from qvlquant.calib.easyvqa import load_split, majority_baseline

    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    _, majority = majority_baseline(load_split("train"), load_split("test")[: args.limit])
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        "torch": torch.__version__,
        "qvlquant": qvlquant.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "majority_accuracy": round(majority, 2),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }
    runs, rows = earlier(args.json, args.append)
    runs, t0 = [*runs, meta], time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_beds_") as tmp:
        for model, variant, seed in jobs(args.models.split(","), variants, seeds):
            rows.append(run_row(model, variant, seed, args, tmp))
            print(json.dumps(rows[-1]), flush=True)
            meta["seconds"] = round(time.time() - t0, 1)
            write(args.json, runs, rows)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
