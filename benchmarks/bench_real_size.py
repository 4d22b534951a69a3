"""Quantize random-weight checkpoints of the real shapes and record wall time, time per layer, where the time went
and peak memory: one ``qvlquant quantize`` process per run, under ``/usr/bin/time -v`` so the peak resident memory
is the kernel's figure for the whole process (the report's own ``peak_rss_gib`` beside it). While it runs, its
resident memory is sampled every 0.2 s and each decoder layer's window closed when its record appears in the
partial folder: ``layers`` holds each layer's type (hybrid models), seconds and the largest sample of its window
(layer 0's window includes the set-up and the capture pass; a sample can miss a peak shorter than 0.2 s, the
whole-process figure cannot).

Make the checkpoints first (benchmarks/make_random_checkpoint.py), then e.g.

    python benchmarks/bench_real_size.py --checkpoints /tmp/ckpt --runs 2b:gptq 2b:awq 7b:rtn 7b:gptq:2 \\
        --json benchmarks/results/real_size_cpu.json

A run is NAME:METHOD[:MAX_LAYERS[:BITS]] (BITS default 4); NAME is a checkpoint folder under --checkpoints (2b and
7b: qwen2-vl-2b-random, qwen2-vl-7b-random). Every run uses g128 and the method's defaults (so a row measures
whatever the defaults were when it ran: its settings are recorded), the demo calibration source (--num-samples 16),
the machine's default device and --threads when given. Each finished run is appended to the JSON at once, so a long
series that is stopped keeps what it measured; exports are deleted after each run (the disk fills).
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
import tempfile
import time


def _rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and its children (``/usr/bin/time``'s child is the quantize process)."""
    total = 0
    try:
        children = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for p in [pid, *map(int, children)]:
            for line in pathlib.Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return total


def _sampled(cmd: list[str], partial: pathlib.Path, env: dict) -> tuple[subprocess.CompletedProcess, list, dict]:
    """Run ``cmd`` sampling its resident memory; -> the finished process, [(seconds, bytes)], {layer: seconds its
    record appeared}."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        t0, samples, ends = time.time(), [], {}
        while proc.poll() is None:
            samples.append((time.time() - t0, _rss_bytes(proc.pid)))
            for f in partial.glob("layer_*.safetensors") if partial.exists() else ():
                ends.setdefault(int(f.stem.split("_")[1]), time.time() - t0)
            time.sleep(0.2)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()), samples, ends


def layer_windows(samples: list, ends: dict, types: list | None) -> list[dict]:
    """Per finished layer: its type, and the largest memory sample between the previous layer's record and its own."""
    rows, start = [], 0.0
    for i in sorted(ends):
        peak = max((b for t, b in samples if start <= t <= ends[i]), default=0)
        rows.append({"layer": i, "type": types[i] if types else None, "sampled_peak_rss_gib": round(peak / 2**30, 3)})
        start = ends[i]
    return rows


def run_one(checkpoint: pathlib.Path, method: str, max_layers: int | None, work: pathlib.Path, samples: int,
            bits: int = 4, threads: int | None = None) -> dict:
    out = work / f"{checkpoint.name}-{method}"
    partial = out.with_name(f".{out.name}.partial")
    for p in (out, partial):
        shutil.rmtree(p, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "qvlquant.cli", "quantize", "--model", str(checkpoint),
           "--method", method, "--bits", str(bits), "--group-size", "128", "--output", str(out)]
    if method != "rtn":  # round-to-nearest reads no calibration data (and refuses its flags)
        cmd += ["--calib", "demo", "--num-samples", str(samples)]  # random weights: the demo chats on purpose
    if max_layers:
        cmd += ["--max-layers", str(max_layers)]
    if threads:
        cmd += ["--threads", str(threads)]
    text = json.loads((checkpoint / "config.json").read_text())
    types = (text.get("text_config") or text).get("layer_types")
    load_before = os.getloadavg()
    t0 = time.time()
    proc, rss, ends = _sampled(cmd, partial, dict(os.environ, QVLQUANT_QUIET="1"))
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    # --max-layers below the model's layers: the partial run's report; all of them: the export's
    report_path = out / "quantize_report.json" if (out / "quantize_report.json").exists() else partial / "report.json"
    report = json.loads(report_path.read_text())
    layers = layer_windows(rss, ends, types)
    seconds = report.get("layer_seconds") or {}  # none for a data-free run (RTN, FP8: no layer loop)
    for row in layers:
        row["seconds"] = seconds.get(str(row["layer"]))
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else None
    for p in (out, out.with_name(f".{out.name}.partial")):
        shutil.rmtree(p, ignore_errors=True)
    layer_s = list(seconds.values())
    return {
        "checkpoint": checkpoint.name, "method": method, "bits": bits, "quant_settings": report.get("config", {}).get("quant"),
        "layers_run": len(layer_s),
        "layers_total": (report.get("estimate") or {}).get("layers", len(types or []) or None),
        "wall_s": round(wall, 1), "quantize_s": report.get("quantize_seconds"), "export_s": report.get("export_seconds"),
        "mean_layer_s": round(sum(layer_s) / len(layer_s), 2) if layer_s else None,
        "max_layer_s": max(layer_s, default=None),
        "phase_s": report.get("phase_seconds"), "peak_rss_gib_by_phase": report.get("peak_rss_gib_by_phase"),
        "peak_rss_gib_time_v": round(rss_kib * 1024 / 2**30, 3),
        "peak_rss_gib_report": report.get("peak_rss_gib"), "estimate": report.get("estimate"),
        "export_bytes": disk, "tokens": (report.get("calibration") or {}).get("tokens"), "machine": report.get("machine"),
        "data_free": not seconds,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "layers": layers,
        "experts": report.get("experts"), "commit": _commit(),
    }


def time_copy(checkpoint: pathlib.Path, work: pathlib.Path) -> float:
    """Seconds ``cp -r`` takes to copy ``checkpoint`` into ``work`` (the copy deleted after): what reading and writing
    the checkpoint costs on this machine, the yardstick of a data-free run. Neither the copy nor an export syncs its
    files to disk."""
    target = work / f"{checkpoint.name}-copy"
    shutil.rmtree(target, ignore_errors=True)
    t0 = time.time()
    subprocess.run(["cp", "-r", str(checkpoint), str(target)], check=True)
    seconds = time.time() - t0
    shutil.rmtree(target, ignore_errors=True)
    return round(seconds, 1)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=pathlib.Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", required=True, help="folder holding the checkpoints (e.g. qwen2-vl-2b-random)")
    p.add_argument("--runs", nargs="+", required=True,
                   help="NAME:METHOD[:MAX_LAYERS[:BITS]], NAME a folder there (2b, 7b: qwen2-vl-2b/7b-random)")
    p.add_argument("--threads", type=int, default=None, help="passed to quantize --threads")
    p.add_argument("--work", default=None, help="where exports go (default: beside the checkpoints)")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--json", required=True)
    p.add_argument("--copy-baseline", action="store_true",
                   help="time cp -r of the checkpoint before and after each run (page cache warm), recorded beside it")
    args = p.parse_args()
    root = pathlib.Path(args.checkpoints)
    work = pathlib.Path(args.work or root / "runs")
    work.mkdir(parents=True, exist_ok=True)
    path = pathlib.Path(args.json)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for spec in args.runs:
        shape, method, *rest = spec.split(":")
        max_layers = int(rest[0]) if rest and rest[0] else None
        name = f"qwen2-vl-{shape}-random" if shape in ("2b", "7b") else shape
        copies = [time_copy(root / name, work)] if args.copy_baseline else []
        row = run_one(root / name, method, max_layers, work, args.num_samples,
                      int(rest[1]) if len(rest) > 1 else 4, args.threads)
        if args.copy_baseline:
            copies.append(time_copy(root / name, work))
            row["copy_checkpoint_s"] = copies
            row["wall_over_copy"] = [round(row["wall_s"] / c, 2) for c in copies]
        rows.append(row)
        path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        print(f"{spec}: wall {row['wall_s']} s, {row['layers_run']}/{row['layers_total']} layers, "
              f"{row['mean_layer_s']} s/layer, peak RSS {row['peak_rss_gib_time_v']} GiB", flush=True)


if __name__ == "__main__":
    main()
