"""One process against N gloo processes on the same job, side by side: wall time, seconds per layer, peak memory
per process, and whether the results are the same tensors.

    python benchmarks/bench_distributed.py --model demo --methods gptq awq --nproc 2 \\
        --json benchmarks/results/distributed_cpu.json
    python benchmarks/bench_distributed.py --model /tmp/ckpt/qwen2-vl-2b-random --methods gptq awq \\
        --max-layers 4 --nproc 2 --json benchmarks/results/distributed_cpu.json

Every process gets one thread (OMP_NUM_THREADS=1), so N processes use N cores and the one-process run one. Runs
use W4 g128 and --num-samples 16 of the demo calibration set; with --max-layers the partial folders' layer
records and saved hidden states are compared (tensor by tensor: the records' metadata holds timings), else the
exports' weight files byte for byte. Each pair is appended to the JSON at once; outputs are deleted after it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import torch
from safetensors import safe_open


def run(model: str, method: str, nproc: int, out: pathlib.Path, max_layers: int | None, samples: int) -> dict:
    for p in (out, out.with_name(f".{out.name}.partial")):
        shutil.rmtree(p, ignore_errors=True)
    cmd = [sys.executable, "-m", "qvlquant", "quantize", "--model", model, "--method", method, "--bits", "4",
           "--group-size", "128", "--num-samples", str(samples), "--nproc", str(nproc), "--output", str(out)]
    if max_layers:
        cmd += ["--max-layers", str(max_layers)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, QVLQUANT_QUIET="1", OMP_NUM_THREADS="1"))
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    folder = out.with_name(f".{out.name}.partial") if max_layers else out
    report = json.loads((folder / ("report.json" if max_layers else "quantize_report.json")).read_text())
    layer_s = list(report["layer_seconds"].values())
    losses = [info["loss"] for info in report["layers"].values() if "loss" in info]
    return {"objective_sum": sum(losses) if losses else None,  # GPTQ: each linear's squared output error
            "nproc": nproc, "wall_s": round(wall, 1), "quantize_s": report["quantize_seconds"],
            "mean_layer_s": round(sum(layer_s) / len(layer_s), 2), "layers_run": len(layer_s),
            "phase_s": report["phase_seconds"], "peak_rss_gib_per_process": report["peak_rss_gib_per_process"],
            "folder": str(folder)}


def tensors(folder: pathlib.Path, partial: bool) -> dict[str, bytes]:
    files = sorted(folder.glob("layer_*.safetensors")) + [folder / "inputs.safetensors"] if partial else \
        sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[f"{f.name}:{k}"] = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return out


def differing_codes(a: pathlib.Path, b: pathlib.Path) -> float:
    """Fraction of the 4-bit codes (nibbles of the packed qweight words, either layout) that differ."""
    differ = total = 0
    for f in sorted(a.glob("layer_*.safetensors")):
        with safe_open(str(f), "pt") as ha, safe_open(str(b / f.name), "pt") as hb:
            for k in (k for k in ha.keys() if k.endswith(".qweight")):
                x = ha.get_tensor(k) ^ hb.get_tensor(k)
                nibbles = torch.stack([(x >> (4 * i)) & 0xF for i in range(8)])
                differ += int((nibbles != 0).sum())
                total += nibbles.numel()
    return differ / max(1, total)


def compare(a: pathlib.Path, b: pathlib.Path, partial: bool) -> dict:
    if not partial:
        same_files = all((a / f.name).read_bytes() == f.read_bytes() for f in b.glob("*.safetensors"))
        return {"weight_files_byte_identical": same_files}
    ta, tb = tensors(a, True), tensors(b, True)
    differ = [k for k in ta if ta[k] != tb.get(k)]
    return {"tensors": len(ta), "tensors_differing": len(differ), "same_names": ta.keys() == tb.keys(),
            "codes_differing": round(differing_codes(a, b), 5), "differing": differ[:10]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--max-layers", type=int)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--work", default="/tmp/qvlquant-bench-distributed")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = pathlib.Path(args.json)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for method in args.methods:
        load = os.getloadavg()[0]
        one = run(args.model, method, 1, work / "one", args.max_layers, args.num_samples)
        many = run(args.model, method, args.nproc, work / "many", args.max_layers, args.num_samples)
        same = compare(pathlib.Path(one["folder"]), pathlib.Path(many["folder"]), bool(args.max_layers))
        row = {"model": pathlib.Path(args.model).name, "method": method, "max_layers": args.max_layers,
               "num_samples": args.num_samples, "load_average_before": round(load, 2), "one": one, "many": many,
               "speedup_wall": round(one["wall_s"] / many["wall_s"], 2),
               "speedup_layer": round(one["mean_layer_s"] / many["mean_layer_s"], 2), "equality": same,
               "machine": f"{os.uname().machine}, {os.cpu_count()} cores, 1 thread per process"}
        row["objective_sum"] = [one["objective_sum"], many["objective_sum"]]
        print(json.dumps({k: v for k, v in row.items() if k not in ("one", "many")}), flush=True)
        rows.append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        for d in ("one", "many"):
            for p in (work / d, work / f".{d}.partial"):
                shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
