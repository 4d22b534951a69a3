"""llm-compressor and GPTQModel on the same model, from the same calibration batches, scored by the same function
as qvlquant's own rows (bench_methods.Scorer).

    bash benchmarks/peers/setup_venvs.sh                 # once: /work/peers/{llmc,gptqmodel} (~4 min, 12 GB)
    python benchmarks/bench_peers.py [--model testbed] [--seeds 0,1,2] [--settings W4g128,W3g128]
        [--runs llmc-gptq,...] [--peers-dir /work/peers] [--json benchmarks/results/peers_testbed.json]
    python benchmarks/bench_methods.py --peers benchmarks/results/peers_testbed.json   # one table, with error bars

For each seed, qvlquant's calibration batches are written once (benchmarks/peers/export_batches.py); each peer run
quantizes from exactly those tensors in its own venv and writes its dequantized state dict
(benchmarks/peers/run_*.py), which is loaded into a copy of the base and scored here. Not in CI: it needs the two
peer stacks installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors import safe_open

HERE = pathlib.Path(__file__).resolve().parent
PEER_RUNS = {  # name -> (venv, runner, arguments besides model, batches, bits, group size, output)
    "llmc-gptq": ("llmc", "run_llmcompressor.py", ["--method", "gptq", "--sym", "--damp", "0.01", "--actorder", "none"]),
    "llmc-gptq-actorder": ("llmc", "run_llmcompressor.py", ["--method", "gptq", "--sym", "--damp", "0.01",
                                                            "--actorder", "static"]),
    "llmc-awq": ("llmc", "run_llmcompressor.py", ["--method", "awq", "--asym"]),
    "gptqmodel-gptq": ("gptqmodel", "run_gptqmodel.py", ["--damp", "0.01", "--actorder", "none"]),
    "gptqmodel-gptq-actorder": ("gptqmodel", "run_gptqmodel.py", ["--damp", "0.01", "--actorder", "static"]),
    "gptqmodel-gptq-mse": ("gptqmodel", "run_gptqmodel.py", ["--damp", "0.01", "--actorder", "none", "--mse", "2.4"]),
    "gptqmodel-gptq-gar": ("gptqmodel", "run_gptqmodel.py", ["--damp", "0.01", "--actorder", "gar"]),
}


def _bench_methods():
    spec = importlib.util.spec_from_file_location("bench_methods", HERE / "bench_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_peer(name: str, folder: pathlib.Path, batches: pathlib.Path, bits: int, group: int, peers_dir: pathlib.Path,
             out: pathlib.Path, more: tuple[str, ...] = ()) -> dict:
    """One peer run in its venv, ``more`` arguments after the run's own (``--dynamic JSON`` for GPTQModel). -> its
    meta.json (the dense state dict is out/model.safetensors)."""
    venv, runner, extra = PEER_RUNS[name]
    python = peers_dir / venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run bash benchmarks/peers/setup_venvs.sh {peers_dir}")
    cmd = [str(python), str(HERE / "peers" / runner), "--model", str(folder), "--batches", str(batches),
           "--bits", str(bits), "--group-size", str(group), *extra, *more, "--output", str(out)]
    env = dict(os.environ, QVLQUANT_QUIET="1", GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)  # GPTQModel writes logs/ there
    if done.returncode != 0:
        raise RuntimeError(f"{name} W{bits}g{group} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((out / "meta.json").read_text())


def dense_model(folder: pathlib.Path, out: pathlib.Path):
    """The peer's dense weights (out/model.safetensors, the base folder's keys) loaded as a checkpoint folder:
    the base's config and processor files are copied beside them, and transformers maps the keys as for the base."""
    import qvlquant

    keys = lambda path: set(safe_open(str(path), "pt").keys())  # noqa: E731
    if keys(out / "model.safetensors") != keys(folder / "model.safetensors"):
        raise KeyError(f"{out}/model.safetensors does not hold exactly the keys of {folder}/model.safetensors")
    for f in folder.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return qvlquant.load(out)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed", help="testbed (default), demo, or a Qwen2-VL folder")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default="W4g128,W3g128")
    ap.add_argument("--runs", default=",".join(PEER_RUNS), help=f"of {', '.join(PEER_RUNS)}")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--kl-limit", type=int, default=512)
    ap.add_argument("--acc-limit", type=int, default=1000)
    ap.add_argument("--peers-dir", type=pathlib.Path, default=pathlib.Path(os.environ.get("QVLQUANT_PEERS_DIR", "/work/peers")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="default benchmarks/results/peers_MODEL.json")
    args = ap.parse_args()
    os.environ.setdefault("QVLQUANT_QUIET", "1")
    torch.set_num_threads(args.threads)
    import qvlquant
    from qvlquant.engine.skeleton import EMBEDDED, resolve_model_path
    from qvlquant.families import family_for

    sys.path.insert(0, str(HERE / "peers"))
    from export_batches import calibration_batches, write_batches  # noqa: E402 (benchmarks/peers is not a package)

    bm = _bench_methods()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in PEER_RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {', '.join(PEER_RUNS)}")
    settings = [(s, *bm.parse_setting(s)) for s in args.settings.split(",")]
    folder = resolve_model_path(args.model).resolve()
    base, processor = qvlquant.load(args.model)
    family = family_for(base.config.model_type)
    scorer = bm.Scorer(base, processor, family, args.kl_limit, args.acc_limit)
    rows, versions, t0 = [], {}, time.time()
    with tempfile.TemporaryDirectory(prefix="qvlquant-peers-") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            batches = pathlib.Path(tmp) / f"batches-{seed}"
            write_batches(calibration_batches(folder, "demo", args.num_samples, seed), batches,
                          {"seed": seed, "calib": "demo", "model": str(folder)})
            for name, bits, group in settings:
                for run in runs:
                    out = pathlib.Path(tmp) / f"{run}-{name}-{seed}"
                    meta = run_peer(run, folder, batches, bits, group, args.peers_dir, out)
                    model = dense_model(folder, out)
                    shutil.rmtree(out)
                    versions[run] = {k: v for k, v in meta.items() if k.endswith("version") or k in ("peer", "versions")}
                    rows.append(dict(scorer.score(model), setting=name, variant=run, seed=seed,
                                     quantize_seconds=meta.get("wall_seconds"), peer=versions[run]))
                    del model
                    r = rows[-1]
                    print(f"[{time.time() - t0:6.0f}s] seed {seed} {name} {run}: ppl {r['perplexity']:.3f} "
                          f"KL {r['answer_kl']:.4f} photo KL {r['photo_kl']:.4f} layer {r['layer_error']:.2e}", flush=True)
    summary = bm.summarise(rows)
    print(bm.fmt_table(summary))
    label = args.model if args.model in EMBEDDED else folder.name
    out = pathlib.Path(args.json or f"benchmarks/results/peers_{label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads", "args": {
        k: str(v) for k, v in vars(args).items()}, "peers": versions, "seconds": round(time.time() - t0, 1),
        "load_average": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary, "table": bm.fmt_table(summary)},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
