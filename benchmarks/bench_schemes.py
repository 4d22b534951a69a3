"""INT8 W8A8 on an embedded model: data-free round-to-nearest against the calibrated path (SmoothQuant off / 0.8 /
auto, then GPTQ), each export reloaded with ``qvlquant.load`` (int8 activations per token, the served numerics).

    python benchmarks/bench_w8a8.py [--model demo] [--seeds 0,1,2] [--num-samples 32] [--threads 1]
        [--variants datafree-rtn,...] [--llmc] [--json benchmarks/results/w8a8_demo.json]

Every export is written by ``qvlquant.quantize`` (the CLI's path) and scored by ``bench_methods.Scorer``, the
evaluation every other method row gets: held-out text perplexity, KL of the easy-vqa answer tokens and of the
held-out photographs' answers to the BF16 model, decoder-layer error (accuracy is skipped: greedy generation adds
minutes and no resolution at 8 bits). The calibrated rows are drawn ``--num-samples`` from the demo source per seed;
each cell is mean +- sample standard deviation over the seeds (the data-free row has no draw: one run).

``--llmc``: llm-compressor 0.14's own W8A8 recipe beside them (``SmoothQuantModifier(smoothing_strength=0.8)`` then
``GPTQModifier(scheme="W8A8")``, and GPTQ alone), in its venv (benchmarks/peers/setup_venvs.sh), from the very batches
qvlquant calibrates on for the same seed (benchmarks/peers/export_batches.py); its compressed-tensors checkpoint is
loaded by ``qvlquant.load`` (the same int8 layout and config) and scored by the same scorer.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_methods

VARIANTS = {  # name -> quantize settings beyond scheme W8A8 (None: data-free)
    "datafree-rtn": None,
    "smoothquant-off+gptq": {"method": "gptq", "smoothing_strength": "off"},
    "smoothquant-0.8+gptq": {"method": "gptq", "smoothing_strength": "0.8"},
    "smoothquant-auto+gptq": {"method": "gptq", "smoothing_strength": "auto"},
}
LLMC_VARIANTS = {"llmc smoothquant-0.8+gptq": 0.8, "llmc gptq": 0.0}  # name -> SmoothQuantModifier strength (0: none)
HERE = pathlib.Path(__file__).resolve().parent


def llmc_export(folder: pathlib.Path, batches: pathlib.Path, smoothing: float, out: pathlib.Path, peers_dir: pathlib.Path,
                threads: int) -> None:
    """llm-compressor's W8A8 recipe on ``folder`` from export_batches.py's ``batches``, its checkpoint kept in ``out``."""
    python = peers_dir / "llmc" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run bash benchmarks/peers/setup_venvs.sh {peers_dir}")
    subprocess.run([str(python), str(HERE / "peers" / "run_llmcompressor.py"), "--model", str(folder), "--batches",
                    str(batches), "--method", "w8a8-gptq", "--smoothing", str(smoothing), "--damp", "0.01",
                    "--dtype", "bfloat16", "--threads", str(threads), "--keep", str(out), "--output",
                    str(out) + "-meta"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=out.parent)  # llm-compressor writes its logs/ folder into the working directory


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
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--llmc", action="store_true", help="add llm-compressor's W8A8 recipe (its venv)")
    ap.add_argument("--peers-dir", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("QVLQUANT_PEERS_DIR", "/work/peers")))
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
    chosen = [v for v in args.variants.split(",") if v]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants {','.join(unknown)}: choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.llmc:
            from qvlquant.assets.paths import EMBEDDED_MODELS

            folder = pathlib.Path(EMBEDDED_MODELS.get(args.model, args.model)).resolve()
            for seed in seeds:
                batches = pathlib.Path(tmp) / f"batches-{seed}"
                subprocess.run([sys.executable, str(HERE / "peers" / "export_batches.py"), "--model", str(folder),
                                "--num-samples", str(args.num_samples), "--seed", str(seed), "--output", str(batches)],
                               check=True, stdout=subprocess.DEVNULL)
                for variant, smoothing in LLMC_VARIANTS.items():
                    out = pathlib.Path(tmp) / f"{variant.replace(' ', '-')}-{seed}"
                    started = time.time()
                    llmc_export(folder, batches, smoothing, out, args.peers_dir, args.threads)
                    seconds = time.time() - started
                    model, _ = qvlquant.load(out)
                    row = dict(scorer.score(model), setting="W8A8", variant=variant, seed=seed,
                               quantize_seconds=round(seconds, 2), peer="llm-compressor 0.14")
                    rows.append(row)
                    print(f"[{time.time() - t0:6.0f}s] {variant} seed {seed}: ppl {row['perplexity']:.4f} KL "
                          f"{row['answer_kl']:.5f} photo KL {row['photo_kl']:.5f} layer {row['layer_error']:.2e}",
                          flush=True)
                    del model
        for variant in chosen:
            settings = VARIANTS[variant]
            for seed in ([None] if settings is None else seeds):
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
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary, "table": table}, indent=2, default=str)
                   + "\n")


if __name__ == "__main__":
    main()
