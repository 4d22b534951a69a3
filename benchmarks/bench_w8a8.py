"""INT8 W8A8 on an embedded model: data-free round-to-nearest against the calibrated path (SmoothQuant off / 0.8 /
auto, then GPTQ), each export reloaded with ``qvlquant.load`` (int8 activations per token, the served numerics).

    python benchmarks/bench_w8a8.py [--model demo] [--seeds 0,1,2] [--num-samples 32] [--threads 1]
        [--json benchmarks/results/w8a8_demo.json]

Every export is written by ``qvlquant.quantize`` (the CLI's path) and scored by ``bench_methods.Scorer``, the
evaluation every other method row gets: held-out text perplexity, KL of the easy-vqa answer tokens and of the
held-out photographs' answers to the BF16 model, decoder-layer error (accuracy is skipped: greedy generation adds
minutes and no resolution at 8 bits). The calibrated rows are drawn ``--num-samples`` from the demo source per seed;
each cell is mean +- sample standard deviation over the seeds (the data-free row has no draw: one run).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_methods  # noqa: E402  (the scorer and the summary every method row gets)

VARIANTS = {  # name -> quantize settings beyond scheme W8A8 (None: data-free)
    "datafree-rtn": None,
    "smoothquant-off+gptq": {"method": "gptq", "smoothing_strength": "off"},
    "smoothquant-0.8+gptq": {"method": "gptq", "smoothing_strength": "0.8"},
    "smoothquant-auto+gptq": {"method": "gptq", "smoothing_strength": "auto"},
}


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (platform.processor() is empty on Linux)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--kl-limit", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="default benchmarks/results/w8a8_MODEL.json")
    args = ap.parse_args()
    os.environ.setdefault("QVLQUANT_QUIET", "1")
    torch.set_num_threads(args.threads)
    import qvlquant
    from qvlquant.families import family_for

    base, processor = qvlquant.load(args.model)
    family = family_for(base.config.model_type)
    t0 = time.time()
    scorer = bench_methods.Scorer(base, processor, family, args.kl_limit, acc_limit=0)
    rows = [dict(scorer.base_row(), setting="W8A8", variant="bf16", seed=None)]
    with tempfile.TemporaryDirectory() as tmp:
        for variant, settings in VARIANTS.items():
            for seed in ([None] if settings is None else [int(s) for s in args.seeds.split(",")]):
                out = pathlib.Path(tmp) / f"{variant}-{seed}"
                calib = {} if settings is None else dict(settings, num_samples=args.num_samples, seed=seed)
                started = time.time()
                report = qvlquant.quantize(output=str(out), model=args.model, scheme="W8A8", threads=args.threads,
                                           **calib)
                seconds = time.time() - started
                model, _ = qvlquant.load(out)
                row = dict(scorer.score(model), setting="W8A8", variant=variant, seed=seed,
                           quantize_seconds=round(seconds, 2))
                if settings and settings["smoothing_strength"] == "auto":
                    row["strengths"] = report["smoothing"]["groups"]
                rows.append(row)
                print(f"[{time.time() - t0:6.0f}s] {variant} seed {seed}: ppl {row['perplexity']:.4f} KL "
                      f"{row['answer_kl']:.5f} photo KL {row['photo_kl']:.5f} layer {row['layer_error']:.2e}",
                      flush=True)
                del model
    summary = bench_methods.summarise(rows)
    table = bench_methods.fmt_table(summary)
    print(table)
    out = pathlib.Path(args.json or f"benchmarks/results/w8a8_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
            "cpu": cpu_model(), "torch": torch.__version__, "qvlquant": qvlquant.__version__,
            "args": vars(args), "seconds": round(time.time() - t0, 1), "load_average": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
