"""Quantize random-weight checkpoints of the real Qwen2-VL shapes and record wall time, time per layer, where the
time went and peak memory: one ``qvlquant quantize`` process per run, under ``/usr/bin/time -v`` so the peak
resident memory is the kernel's figure for the whole process (the report's own ``peak_rss_gib`` beside it).

Make the checkpoints first (benchmarks/make_random_checkpoint.py), then e.g.

    python benchmarks/bench_real_size.py --checkpoints /tmp/ckpt --runs 2b:gptq 2b:awq 7b:rtn 7b:gptq:2 \\
        --json benchmarks/results/real_size_cpu.json

A run is SHAPE:METHOD[:MAX_LAYERS[:BITS]] (BITS default 4); every run uses g128 and the method's defaults (so a
row measures whatever the defaults were when it ran: its settings are recorded), the demo calibration source
(--num-samples 16) and the machine's default device. Each finished run is appended to the JSON at once, so a long series that is
stopped keeps what it measured; exports are deleted after each run (the disk fills).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time


def run_one(checkpoint: pathlib.Path, method: str, max_layers: int | None, work: pathlib.Path, samples: int,
            bits: int = 4) -> dict:
    out = work / f"{checkpoint.name}-{method}"
    for p in (out, out.with_name(f".{out.name}.partial")):
        shutil.rmtree(p, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "qvlquant.cli", "quantize", "--model", str(checkpoint),
           "--method", method, "--bits", str(bits), "--group-size", "128", "--calib", "demo", "--num-samples", str(samples),
           "--output", str(out)]  # random weights: the demo chats on purpose
    if max_layers:
        cmd += ["--max-layers", str(max_layers)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, QVLQUANT_QUIET="1"))
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    report_path = out.with_name(f".{out.name}.partial") / "report.json" if max_layers else out / "quantize_report.json"
    report = json.loads(report_path.read_text())
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else None
    for p in (out, out.with_name(f".{out.name}.partial")):
        shutil.rmtree(p, ignore_errors=True)
    layer_s = list(report["layer_seconds"].values())
    return {
        "checkpoint": checkpoint.name, "method": method, "bits": bits, "quant_settings": report.get("config", {}).get("quant"),
        "layers_run": len(layer_s),
        "layers_total": report["estimate"]["layers"], "wall_s": round(wall, 1),
        "quantize_s": report["quantize_seconds"], "export_s": report.get("export_seconds"),
        "mean_layer_s": round(sum(layer_s) / len(layer_s), 2), "max_layer_s": max(layer_s),
        "phase_s": report["phase_seconds"], "peak_rss_gib_time_v": round(rss_kib * 1024 / 2**30, 3),
        "peak_rss_gib_report": report["peak_rss_gib"], "estimate": report["estimate"],
        "export_bytes": disk, "tokens": report["calibration"]["tokens"], "machine": report["machine"],
        "load_average_before": os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", required=True, help="folder holding qwen2-vl-2b-random / qwen2-vl-7b-random")
    p.add_argument("--runs", nargs="+", required=True, help="SHAPE:METHOD[:MAX_LAYERS[:BITS]], SHAPE 2b or 7b")
    p.add_argument("--work", default=None, help="where exports go (default: beside the checkpoints)")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    root = pathlib.Path(args.checkpoints)
    work = pathlib.Path(args.work or root / "runs")
    work.mkdir(parents=True, exist_ok=True)
    path = pathlib.Path(args.json)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for spec in args.runs:
        shape, method, *rest = spec.split(":")
        max_layers = int(rest[0]) if rest and rest[0] else None
        row = run_one(root / f"qwen2-vl-{shape}-random", method, max_layers, work, args.num_samples,
                      int(rest[1]) if len(rest) > 1 else 4)
        rows.append(row)
        path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        print(f"{spec}: wall {row['wall_s']} s, {row['layers_run']}/{row['layers_total']} layers, "
              f"{row['mean_layer_s']} s/layer, peak RSS {row['peak_rss_gib_time_v']} GiB", flush=True)


if __name__ == "__main__":
    main()
