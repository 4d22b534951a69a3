"""Time the data-free FP8 export of a checkpoint against copying it: the export reads each tensor, quantizes the
decoder linears and writes; the copy is the floor (read and write the same bytes). Peak RSS of each run is
measured in its own process.

    python benchmarks/bench_fp8_datafree.py                      # the embedded demo, both schemes, 3 repeats
    python benchmarks/bench_fp8_datafree.py --model /tmp/qwen2-vl-7b-random --repeats 1 --json fp8.json

(``benchmarks/make_random_checkpoint.py`` writes a random checkpoint of the real 7B shape; run that one only on a
machine of your own: it reads and writes about 30 GB.)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, shutil, sys, time
kind, src, dst = sys.argv[1:4]
t = time.perf_counter()
if kind == "copy":
    shutil.copytree(src, dst)
    job = time.perf_counter() - t
else:
    from qvlquant.api import quantize
    job = quantize(model=src, output=dst, scheme=kind, threads=1)["total_seconds"]
print(json.dumps({"seconds": time.perf_counter() - t, "job_seconds": job,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run_once(kind: str, src: str, dst: pathlib.Path) -> dict:
    """One run in a fresh process (its own peak RSS); the output removed afterwards."""
    env = dict(os.environ, QVLQUANT_QUIET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, kind, src, str(dst)], env=env, check=True,
                          capture_output=True, text=True)
    shutil.rmtree(dst, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    from qvlquant.assets.paths import EMBEDDED_MODELS

    src = str(args.model or EMBEDDED_MODELS["demo"])
    size = sum(f.stat().st_size for f in pathlib.Path(src).glob("*.safetensors"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fp8-") as tmp:
        for kind in ("copy", "FP8_BLOCK", "FP8_DYNAMIC"):
            runs = [run_once(kind, src, pathlib.Path(tmp) / f"{kind}-{i}") for i in range(args.repeats)]
            seconds = [r["seconds"] for r in runs]
            rows.append({"run": kind, "median_s": round(statistics.median(seconds), 2),
                         "job_median_s": round(statistics.median(r["job_seconds"] for r in runs), 2),
                         "min_s": round(min(seconds), 2), "max_s": round(max(seconds), 2),
                         "peak_rss_gib": round(max(r["peak_rss_gib"] for r in runs), 3)})
    print(f"{src}: {size / 2**30:.3f} GiB of safetensors; {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.repeats} runs each; 'process' includes starting Python and importing torch, 'job' is what "
          "quantize_report.json records (checks, skeleton, processor, export)")
    print(f"{'run':<12} {'process s':>9} {'min-max s':>13} {'job s':>7} {'peak RSS GiB':>13}")
    for r in rows:
        print(f"{r['run']:<12} {r['median_s']:>9.2f} {r['min_s']:>6.2f}-{r['max_s']:<6.2f} {r['job_median_s']:>7.2f} "
              f"{r['peak_rss_gib']:>13.3f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"model": src, "bytes": size, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
