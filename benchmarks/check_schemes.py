"""Each served scheme through the user's own three commands, on an embedded model: ``qvlquant quantize --scheme S``,
``qvlquant eval`` (the export loaded by ``qvlquant.load`` with the served numerics, beside the recorded base), and
``qvlquant check`` with its default tolerances. What issue 26 asks of every scheme, on the demo and the test bed.

    python benchmarks/check_schemes.py --model testbed [--schemes FP8_BLOCK,FP8_DYNAMIC,...] [--limit 200]
        [--threads 1] [--seeds 0,1,2] [--merge] [--json benchmarks/results/check_schemes_testbed.json]

One row per scheme (a calibrated one, FP8 or NVFP4: one per ``--seeds`` calibration draw, each quantized with
``--seed N``; the default, no ``--seeds``, is the quantize command's own draw): the check's verdict and exit status,
the eval's accuracy and perplexity of the export and of the base, the quantize and eval wall seconds and the
1-minute load average before and after. The JSON is rewritten after every row; exports are deleted after their row.
``--merge``: the rows of the schemes not run this time are kept from the JSON already there (rerun one scheme only).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

SCHEMES = ("FP8_BLOCK", "FP8_DYNAMIC", "FP8", "W8A8", "NVFP4A16", "NVFP4")
CALIBRATED = ("FP8", "NVFP4")  # the schemes that read calibration data (--seed), as the quantize command runs them


def cli(*args: str, threads: int) -> tuple[int, str, float]:
    """``qvlquant ARGS`` in a fresh interpreter -> (exit status, stdout + stderr, wall seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), QVLQUANT_QUIET="1")
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "qvlquant.cli", *args], capture_output=True, text=True, env=env)
    return done.returncode, done.stdout + done.stderr, round(time.time() - t0, 1)


def one(model: str, scheme: str, limit: int, threads: int, work: pathlib.Path, seed: int | None = None) -> dict:
    out, report = work / scheme, work / f"{scheme}-eval.json"
    load_before = os.getloadavg()
    row = {"model": model, "scheme": scheme, "limit": limit, **({} if seed is None else {"seed": seed})}
    draw = () if seed is None else ("--seed", str(seed))
    rc, text, row["quantize_s"] = cli("quantize", "--model", model, "--scheme", scheme, "--threads", str(threads),
                                      *draw, "--output", str(out), threads=threads)
    if rc:
        return {**row, "failed": "quantize", "rc": rc, "tail": text[-1500:], "load_average_before": load_before}
    rc, text, row["eval_s"] = cli("eval", "--model", str(out), "--limit", str(limit), "--report", str(report),
                                  threads=threads)
    if rc:
        return {**row, "failed": "eval", "rc": rc, "tail": text[-1500:], "load_average_before": load_before}
    summary = json.loads(report.read_text())
    row["eval"] = {k: summary.get(k) for k in ("accuracy", "perplexity", "quantization")}
    quantized = json.loads((out / "quantize_report.json").read_text())
    if "smoothing" in quantized:
        row["smoothing_strength"] = quantized["smoothing"]["strength"]
    row["base"] = {k: (summary.get("baseline") or {}).get(k) for k in ("accuracy", "perplexity")}
    rc, text, _ = cli("check", str(report), threads=threads)
    row.update(check_rc=rc, check_passed=rc == 0, check_output=text.strip()[-1500:],
               load_average_before=load_before, load_average_after=os.getloadavg())
    shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="testbed", help="an embedded model (demo, testbed, demo-qwen3.5, ...)")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--limit", type=int, default=200, help="easy-vqa test questions the eval scores")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", default=None, help="calibration draws of the calibrated schemes, e.g. 0,1,2 (default: "
                                                  "the quantize command's)")
    ap.add_argument("--merge", action="store_true", help="keep the rows of the other schemes from --json")
    ap.add_argument("--json", type=pathlib.Path, required=True)
    args = ap.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        raise SystemExit(f"--schemes {','.join(unknown)}: choose from {', '.join(SCHEMES)}")
    seeds = [None] if args.seeds is None else [int(s) for s in args.seeds.split(",") if s]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)",
            "args": {k: str(v) for k, v in vars(args).items()}}
    kept = []
    if args.merge and args.json.exists():
        old = json.loads(args.json.read_text(encoding="utf-8"))
        kept = [row for row in old["rows"] if row["scheme"] not in schemes]
        meta["kept_rows_from"] = old["meta"]  # where the rows not rerun came from
    doc = {"meta": meta, "rows": list(kept)}
    with tempfile.TemporaryDirectory(prefix="check-schemes-") as work:
        for scheme in schemes:
            for seed in seeds if scheme in CALIBRATED else [None]:
                row = one(args.model, scheme, args.limit, args.threads, pathlib.Path(work), seed)
                doc["rows"].append(row)
                doc["rows"].sort(key=lambda r: (SCHEMES.index(r["scheme"]), r.get("seed") or 0))
                args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
                verdict = row.get("failed") or ("passed" if row["check_passed"] else "FAILED")
                print(f"{args.model} {scheme}{'' if seed is None else f' seed {seed}'}: check {verdict}", flush=True)


if __name__ == "__main__":
    main()
