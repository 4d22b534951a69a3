"""BF16 vs RTN vs GPTQ vs AWQ on the embedded demo model, one table.

    python benchmarks/bench_methods.py [--limit N] [--num-samples N] [--json benchmarks/results/methods_demo.json]

For each method and setting (W8g128, W4g128, W4g32, W3g128, W2g64) the demo is quantized from the same calibration
batches, in a child process of its own (so peak memory is that run's), and measured against BF16:
easy-vqa test accuracy, mean KL divergence of the answer-token distribution, held-out text perplexity, layer-wise
relative output error per linear type on held-out calibration activations, wall time and peak RSS.
RTN and GPTQ are symmetric (the published GPTQ setting); AWQ uses zero points (its published setting), and RTN
with zero points is listed as its like-for-like baseline. AWQ below 4 bits is measured in memory only (its GEMM
export format is 4-bit).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import multiprocessing
import os
import pathlib
import platform
import resource
import time

SETTINGS = [("W8g128", 8, 128), ("W4g128", 4, 128), ("W4g32", 4, 32), ("W3g128", 3, 128), ("W2g64", 2, 64)]
METHODS = [("rtn", True), ("rtn", False), ("gptq", True), ("awq", False)]
TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(processor, n, seed):
    from qvlquant.calib.dataset import CalibConfig, build_batches
    from qvlquant.calib.sources import load_samples

    samples, names, _ = load_samples("demo", n, seed=seed)
    return build_batches(processor, samples, CalibConfig(), names)


def measure(method: str | None, bits: int, group: int, sym: bool, args) -> dict:
    """One row: quantize (unless method is None: BF16) and measure. Runs in its own process."""
    import torch

    import qvlquant
    from qvlquant.calib.easyvqa import load_split
    from qvlquant.demo.paths import DATA_DIR
    from qvlquant.eval.compare import answer_logits, layer_errors, mean_kl
    from qvlquant.eval.easyvqa import evaluate
    from qvlquant.eval.perplexity import perplexity, token_stream
    from qvlquant.config import QuantConfig
    from qvlquant.families import QWEN2_VL
    from qvlquant.pipeline import LoopPlan, quantize_model
    from qvlquant.quant.rtn import QuantSpec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, processor = qvlquant.load("demo")
    items = load_split("test")[: args.limit]
    model, row = base, {"method": "bf16", "setting": "-", "sym": None}
    if method is not None:
        calib = _batches(processor, args.num_samples, seed=0)
        model = copy.deepcopy(base)
        qcfg = QuantConfig(method, QuantSpec(bits, group, sym))
        t0 = time.time()
        result = quantize_model(model, calib, LoopPlan(QWEN2_VL, qcfg))
        row = {"method": method, "setting": f"W{bits}g{group}", "sym": sym, "quantize_seconds": round(time.time() - t0, 2)}
        row["layer_error"] = layer_errors(base, result.weights, _batches(processor, args.heldout_samples, seed=1))
    row["accuracy"] = evaluate(model, processor, items, desc=row["method"])["accuracy"]
    docs = (DATA_DIR / "heldout.txt").read_text(encoding="utf-8").splitlines()
    row["perplexity"] = perplexity(model, token_stream(processor.tokenizer, docs))
    kl_items = items[: args.kl_limit]
    row["answer_kl"] = 0.0 if method is None else mean_kl(answer_logits(base, processor, kl_items), answer_logits(model, processor, kl_items))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def fmt_table(rows: list[dict]) -> str:
    head = ["method", "setting", "acc %", "ppl", "KL", *[t.replace("_proj", "") for t in TYPES], "time s", "RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["method"] if r["sym"] is None else f"{r['method']}{'' if r['sym'] else '-asym'}"
        errs = [f"{r['layer_error'][t]:.2e}" if "layer_error" in r else "-" for t in TYPES]
        lines.append("| " + " | ".join([
            name, r["setting"], f"{r['accuracy']:.2f}", f"{r['perplexity']:.2f}", f"{r['answer_kl']:.4f}", *errs,
            f"{r.get('quantize_seconds', 0):.1f}", f"{r['peak_rss_mb']:.0f}",
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="easy-vqa test questions (default all 9,673)")
    ap.add_argument("--kl-limit", type=int, default=1000, help="questions for the answer-token KL")
    ap.add_argument("--num-samples", type=int, default=64, help="calibration samples (half images, half text)")
    ap.add_argument("--heldout-samples", type=int, default=32, help="held-out samples for layer errors")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma list of settings to run, e.g. W4g128,W3g128")
    ap.add_argument("--json", default="benchmarks/results/methods_demo.json")
    args = ap.parse_args()
    os.environ.setdefault("QVLQUANT_QUIET", "1")
    settings = [s for s in SETTINGS if args.only is None or s[0] in args.only.split(",")]
    jobs = [(None, 16, -1, True)] + [(m, b, g, sym) for _, b, g in settings for m, sym in METHODS]
    rows = []
    ctx = multiprocessing.get_context("spawn")
    t0 = time.time()
    for job in jobs:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            rows.append(pool.submit(measure, *job, args).result())
        print(f"[{time.time() - t0:6.0f}s] {rows[-1]['method']} {rows[-1]['setting']} done", flush=True)
    table = fmt_table(rows)
    print(table)
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads", "args": vars(args)}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
