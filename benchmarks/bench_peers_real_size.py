"""qvlquant, llm-compressor and GPTQModel on the same real-shape checkpoint and the same calibration batches: wall
time and peak resident memory of each tool's whole process tree, side by side, and each output checked for sanity.

    bash benchmarks/peers/setup_venvs.sh                                  # once: /work/peers/{llmc,gptqmodel}
    python benchmarks/make_random_checkpoint.py --shape qwen2-vl-2b --output /work/scratch/qwen2-vl-2b-random
    python benchmarks/bench_peers_real_size.py --checkpoint /work/scratch/qwen2-vl-2b-random --threads 2 \\
        --runs qvlquant-gptq,llmc-gptq,gptqmodel-gptq,qvlquant-awq,llmc-awq \\
        --json benchmarks/results/peers_real_size_cpu.json [--timeout 3600]

One tool at a time, each in its own process (the peers in their own venvs, benchmarks/peers/run_*.py
``--check-only``), with the same thread count, from the same ``--num-samples`` batches
(benchmarks/peers/export_batches.py; qvlquant draws the same samples itself with the same seed). Every run is GPTQ or
AWQ W4 g128 with matched settings: GPTQ symmetric, damping 0.01, no act-order (qvlquant ``--no-desc-act``; its own
default is static act-order); AWQ asymmetric, each tool's own search. The models are loaded in the checkpoint's
dtype (bf16), as a user would.

Measured per run: wall time of the whole command; the peak of the process tree's summed resident memory, sampled
every 0.2 s; ``/usr/bin/time -v``'s peak (the largest single process, the kernel's figure); and, for the peers,
the peak at the end of quantization (VmHWM before their outputs are read back). Sanity: every quantized linear
dequantized (by the peer's own decompressor, or for qvlquant's GPTQ v1 export by the GPTQModel runner's independent
reader) against the input weight, ||W_q - W|| / ||W||; on random Gaussian weights a W4 g128 grid gives ~0.1, and a
run is marked sane when every linear is finite and below SANE_ERROR. A run past ``--timeout`` is killed and recorded
with what it reached (a 7B may not fit: an out-of-memory kill is recorded as such). Each finished run is appended to
the JSON at once. Not in CI: it needs the peer venvs and a quiet machine for an hour or more.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
TIMELINE_STEP_S = 15.0  # seconds between the recorded points of a run's memory over time
SANE_ERROR = 0.25  # relative weight error above which a W4 g128 linear is not a plausible quantization of its input

RUNS = {  # name -> (tool, method)
    "qvlquant-gptq": ("qvlquant", "gptq"), "llmc-gptq": ("llmc", "gptq"), "gptqmodel-gptq": ("gptqmodel", "gptq"),
    "qvlquant-awq": ("qvlquant", "awq"), "llmc-awq": ("llmc", "awq"),
}


def _peer_module(name: str):
    spec = importlib.util.spec_from_file_location(f"peers_{name}", HERE / "peers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in pathlib.Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in pathlib.Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def sampled(cmd: list[str], env: dict, timeout: float, cwd: pathlib.Path | None = None) -> dict:
    """Run ``cmd`` in its own process group, sampling the tree's memory; kill the group past ``timeout`` seconds."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
                                cwd=cwd)
        t0, peak, timed_out, timeline = time.time(), 0, False, []
        while proc.poll() is None:
            rss = tree_rss_bytes(proc.pid)
            peak = max(peak, rss)
            if not timeline or time.time() - t0 >= timeline[-1][0] + TIMELINE_STEP_S:
                timeline.append((round(time.time() - t0, 1), round(rss / 2**30, 2)))
            if time.time() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
        wall = time.time() - t0
        out.seek(0)
        text = out.read()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"rc": proc.returncode, "timed_out": timed_out, "wall_s": round(wall, 1),
            "peak_tree_rss_gib_sampled": round(peak / 2**30, 3),
            "peak_rss_gib_time_v": round(int(m[1]) * 1024 / 2**30, 3) if m else None,
            "rss_timeline_gib": timeline, **progress(text), "log_tail": text[-2500:]}


def progress(log: str) -> dict:
    """How far a run got, from its log: the highest decoder layer index it named (``layers.N``, as the peers'
    progress bars and qvlquant's per-layer lines name them) and the last line naming a layer, progress bars'
    carriage returns and colour codes removed. What a killed run reached, not a measurement of its speed."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", log).replace("\r", "\n")
    layers = [int(n) for n in re.findall(r"layers\.(\d+)\.", plain)]
    named = [line.strip() for line in plain.splitlines() if re.search(r"layer", line, re.IGNORECASE)]
    return {"highest_layer_named": max(layers) if layers else None, "last_layer_line": named[-1][:300] if named else None}


def qvlquant_command(checkpoint: pathlib.Path, method: str, args, out: pathlib.Path) -> list[str]:
    cmd = [sys.executable, "-m", "qvlquant.cli", "quantize", "--model", str(checkpoint), "--method", method,
           "--bits", "4", "--group-size", "128", "--calib", "demo", "--num-samples", str(args.num_samples),
           "--seed", str(args.seed), "--threads", str(args.threads), "--output", str(out)]
    if method == "gptq":
        cmd += ["--sym", "--damp-percent", "0.01", "--no-desc-act"]
    return cmd


def qvlquant_sanity(checkpoint: pathlib.Path, out: pathlib.Path) -> dict:
    """qvlquant's GPTQ v1 export read back by the GPTQModel runner's own reader (not qvlquant's), linear by linear."""
    peers = _peer_module("run_gptqmodel")
    names, read = _packed_linears(out)

    def one(name: str):
        parts = read(name, ("qweight", "qzeros", "scales", "g_idx"))
        return peers.dequantize_gptq(parts, peers.packed_width(name, parts)["bits"], v1=True)

    return _peer_module("layout").weight_errors(names, one, checkpoint)


def _packed_linears(out: pathlib.Path):
    """An export's packed linears (the names of its ``.qweight`` tensors) and a reader of one linear's parts."""
    from safetensors import safe_open

    where = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            where.update(dict.fromkeys(f.keys(), path))

    def read(name: str, parts: tuple[str, ...]) -> dict:
        got = {}
        for p in parts:
            if f"{name}.{p}" in where:
                with safe_open(str(where[f"{name}.{p}"]), "pt") as f:
                    got[p] = f.get_tensor(f"{name}.{p}")
        return got

    return sorted(k[: -len(".qweight")] for k in where if k.endswith(".qweight")), read


def awq_sanity(checkpoint: pathlib.Path, out: pathlib.Path) -> dict:
    """qvlquant's AWQ GEMM export: read back with qvlquant's own unpacking (the AWQ layout is checked against the
    peers' readers in the tests), linear by linear. AWQ folds smoothing scales into the weights, so the error is
    against the input weight of an unscaled linear only where no scale was folded: reported, not bounded."""
    from qvlquant.quant.formats import PackFormat
    from qvlquant.quant.spec import QuantSpec

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    spec = QuantSpec(bits=config["bits"], group_size=config["group_size"], sym=False)
    names, read = _packed_linears(out)

    def one(name: str):
        parts = read(name, ("qweight", "qzeros", "scales"))
        return PackFormat.AWQ_GEMM.unpack(parts, spec, parts["qweight"].shape[0]).dequantize()

    return _peer_module("layout").weight_errors(names, one, checkpoint)


def run_one(name: str, checkpoint: pathlib.Path, batches: pathlib.Path, args, work: pathlib.Path) -> dict:
    tool, method = RUNS[name]
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(f".{out.name}.partial"), ignore_errors=True)
    if tool == "qvlquant":
        cmd = qvlquant_command(checkpoint, method, args, out)
        env = dict(os.environ)  # progress lines on: a run killed at --timeout shows the layer it reached
    else:
        python = args.peers_dir / tool / "bin" / "python"
        if not python.exists():
            raise SystemExit(f"{python} is missing: run bash benchmarks/peers/setup_venvs.sh {args.peers_dir}")
        runner = {"llmc": "run_llmcompressor.py", "gptqmodel": "run_gptqmodel.py"}[tool]
        cmd = [str(python), str(HERE / "peers" / runner), "--model", str(checkpoint), "--batches", str(batches),
               "--bits", "4", "--group-size", "128", "--dtype", "bfloat16", "--threads", str(args.threads),
               "--check-only", "--output", str(out)]
        cmd += {"gptq": ["--method", "gptq", "--sym", "--damp", "0.01", "--actorder", "none"],
                "awq": ["--method", "awq", "--asym"]}[method]
        # GPTQModel's CPU pool needs 2 workers (its model loader asks for 2; 1 is refused): its torch threads follow
        # --threads, as everyone's
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", OMP_NUM_THREADS=str(args.threads))
    load_before = os.getloadavg()
    row = {"run": name, "tool": tool, "method": method, "checkpoint": checkpoint.name,
           **sampled(["/usr/bin/time", "-v", *cmd], env, args.timeout, cwd=work)}  # llm-compressor writes logs/ there
    row["load_average_before"], row["load_average_after"] = load_before, os.getloadavg()
    if row["rc"] == 0:
        if tool == "qvlquant":
            report = json.loads((out / "quantize_report.json").read_text())
            row["peak_rss_gib_report"] = report.get("peak_rss_gib")
            row["export_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            row["sanity"] = qvlquant_sanity(checkpoint, out) if method == "gptq" else awq_sanity(checkpoint, out)
        else:
            meta = json.loads((out / "meta.json").read_text())
            row.update({k: meta.get(k) for k in ("peak_rss_gib_quantize", "saved_bytes", "versions", "sanity")})
            row["quantize_s"] = meta.get("wall_seconds")
        s = row["sanity"]
        row["sane"] = bool(s["linears"]) and not s["nonfinite"] and not s["unmatched"] and s["max"] < SANE_ERROR
        if method == "awq":  # scales folded into the weights: the error against the input is no bound
            row["sane"] = bool(s["linears"]) and not s["nonfinite"] and not s["unmatched"]
    else:
        # our own kill at --timeout is SIGKILL too: only a kill we did not send counts as out of memory
        row["oom_killed"] = not row["timed_out"] and (
            "Killed" in row["log_tail"] or "MemoryError" in row["log_tail"] or row["rc"] in (-9, 137))
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(f".{out.name}.partial"), ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=pathlib.Path, help="a random real-shape checkpoint folder")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"of {', '.join(RUNS)}")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed and recorded")
    ap.add_argument("--peers-dir", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("QVLQUANT_PEERS_DIR", "/work/peers")))
    ap.add_argument("--work", type=pathlib.Path, default=None, help="scratch folder (default: beside the checkpoint)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"--runs {','.join(unknown)}: choose from {', '.join(RUNS)}")
    checkpoint = args.checkpoint.resolve()
    work = (args.work or checkpoint.parent / "peers-work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    batches = work / f"batches-{args.num_samples}-{args.seed}"
    if not (batches / "index.json").exists():
        subprocess.run([sys.executable, str(HERE / "peers" / "export_batches.py"), "--model", str(checkpoint),
                        "--num-samples", str(args.num_samples), "--seed", str(args.seed), "--output", str(batches)],
                       check=True)
    path = pathlib.Path(args.json)
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    for name in runs:
        row = run_one(name, checkpoint, batches, args, work)
        row.update(threads=args.threads, num_samples=args.num_samples, seed=args.seed,
                   machine=f"{platform.machine()}, {os.cpu_count()} cores")
        doc["rows"].append(row)
        path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"{name}: rc {row['rc']}{' (timed out)' if row['timed_out'] else ''}, {row['wall_s']} s, peak tree "
              f"{row['peak_tree_rss_gib_sampled']} GiB, sane {row.get('sane')}", flush=True)


if __name__ == "__main__":
    main()
