"""llm-compressor and GPTQModel on the same model, from the same calibration batches, scored by the same function
as qvlquant's own rows (bench_methods.Scorer).

    bash benchmarks/peers/setup_venvs.sh                 # once: /work/peers/{llmc,gptqmodel} (~4 min, 12 GB)
    python benchmarks/bench_peers.py [--model testbed] [--seeds 0,1,2] [--settings W4g128,W3g128]
        [--runs llmc-gptq,...] [--variants gptq-damp0.01,...] [--peers-dir /work/peers]
        [--json benchmarks/results/peers_testbed.json]
    python benchmarks/bench_methods.py --peers benchmarks/results/peers_testbed.json   # one table, with error bars

For each seed, qvlquant's calibration batches are written once (benchmarks/peers/export_batches.py); each peer run
quantizes from exactly those tensors in its own venv and writes its dequantized state dict
(benchmarks/peers/run_*.py), which is loaded into a copy of the base and scored here. Not in CI: it needs the two
peer stacks installed. ``--variants`` (bench_methods.VARIANTS, none by default) adds qvlquant's own rows, quantized
in memory from the very batches each seed's peers read, so one file holds the whole comparison.

On an MoE (``--model demo-qwen3.5-moe``) both peers unfuse transformers 5's fused experts into one linear per expert
and save them as ``mlp.experts.N.{gate,up,down}_proj`` (llm-compressor's ``linearize_moe``, GPTQModel's defuser),
which is how the input checkpoint stores them: the runners map them back key for key and ``qvlquant.load`` reads
them into the same per-expert linears (``ExpertLinears``) it reads the base's into. A peer row carries ``calibration``: what its run says of the experts it did not
calibrate (llm-compressor: linears whose Hessian no token reached; GPTQModel: linears it rounded to nearest for
seeing too few tokens).
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
    "llmc-gptq-routed": ("llmc", "run_llmcompressor.py", ["--method", "gptq", "--sym", "--damp", "0.01", "--actorder", "none",
                                                          "--moe-experts", "routed"]),  # MoE: routed tokens only
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


def calibration_notes(meta: dict) -> dict:
    """A peer run's meta.json -> how many linears it quantized and what it says of those it did not calibrate
    (``gptq`` in the runners' meta; the per-linear call counts left out)."""
    quantized = meta.get("quantized_linears")
    notes = {"quantized_linears": len(quantized) if isinstance(quantized, list) else quantized}
    return notes | {k: v for k, v in (meta.get("gptq") or {}).items() if k != "calls"}


def qvlquant_notes(info: dict[str, dict], family) -> dict:
    """qvlquant's per-linear record (QuantResult.layer_info) -> how many linears it quantized and, on an MoE, the
    fewest tokens any routed expert saw and the experts' linears it did not calibrate on their own routed tokens
    (``fallback``: "rtn" below ``min_expert_tokens``, or "all_tokens"), as "name (tokens)"."""
    experts = {n: i for n, i in info.items() if family.experts and f".{family.experts}." in n}
    tokens = [i["tokens"] for i in experts.values() if isinstance(i.get("tokens"), int)]
    notes = {"quantized_linears": len(info)}
    if experts:
        notes |= {"expert_linears": len(experts), "min_expert_tokens": min(tokens, default=None),
                  "fallback": [f"{n} ({i.get('tokens')}, {i['fallback']})" for n, i in experts.items()
                               if i.get("fallback")]}
    return notes


def report(r: dict, t0: float) -> None:
    print(f"[{time.time() - t0:6.0f}s] seed {r['seed']} {r['setting']} {r['variant']}: ppl {r['perplexity']:.3f} "
          f"KL {r['answer_kl']:.4f} photo KL {r['photo_kl']:.4f} layer {r['layer_error']:.2e} "
          f"acc {r['accuracy']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed", help="testbed (default), demo, or a Qwen2-VL folder")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default="W4g128,W3g128")
    ap.add_argument("--runs", default=",".join(PEER_RUNS), help=f"of {', '.join(PEER_RUNS)}")
    ap.add_argument("--variants", default="", help="qvlquant's own rows on the same batches (bench_methods.VARIANTS)")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--kl-limit", type=int, default=512)
    ap.add_argument("--acc-limit", type=int, default=1000)
    ap.add_argument("--peers-dir", type=pathlib.Path, default=pathlib.Path(os.environ.get("QVLQUANT_PEERS_DIR", "/work/peers")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kl-format", default=".4f", help="the table's KL cells, e.g. .2e for a bed whose KL is tiny")
    ap.add_argument("--json", default=None, help="default benchmarks/results/peers_MODEL.json")
    args = ap.parse_args()
    os.environ.setdefault("QVLQUANT_QUIET", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
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
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if [v for v in variants if v not in bm.VARIANTS]:
        raise SystemExit(f"unknown variant(s) {[v for v in variants if v not in bm.VARIANTS]}; "
                         f"choose from {', '.join(bm.VARIANTS)}")
    settings = [(s, *bm.parse_setting(s)) for s in args.settings.split(",")]
    folder = resolve_model_path(args.model).resolve()
    base, processor = qvlquant.load(args.model)
    family = family_for(base.config.model_type).bind(base.config)  # hybrid models: each layer's type
    scorer = bm.Scorer(base, processor, family, args.kl_limit, args.acc_limit)
    rows, versions, failed, t0 = [], {}, [], time.time()
    label = args.model if args.model in EMBEDDED else folder.name
    out_json = pathlib.Path(args.json or f"benchmarks/results/peers_{label}.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)

    def save(final: bool) -> None:
        """The rows so far (rewritten after each, so an interrupted run keeps what it measured)."""
        summary = bm.summarise(rows)
        meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads", "args": {
            k: str(v) for k, v in vars(args).items()}, "peers": versions, "failed": failed, "complete": final,
            "seconds": round(time.time() - t0, 1), "load_average": os.getloadavg()}
        out_json.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary,
                                        "table": bm.fmt_table(summary, args.kl_format)}, indent=2) + "\n")
    if variants:  # qvlquant's rows come with the BF16 reference, as in bench_methods
        rows.append(dict(scorer.base_row(), setting="-", variant="bf16", seed=None))
    with tempfile.TemporaryDirectory(prefix="qvlquant-peers-") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            batches = pathlib.Path(tmp) / f"batches-{seed}"
            calib = calibration_batches(folder, "demo", args.num_samples, seed)
            write_batches(calib, batches, {"seed": seed, "calib": "demo", "model": str(folder)})
            for name, bits, group in settings:
                for variant in variants:  # qvlquant, from the tensors just written
                    results = []
                    model, seconds = bm.run_variant(base, calib, family, variant, bits, group, results)
                    rows.append(dict(scorer.score(model), setting=name, variant=variant, seed=seed,
                                     quantize_seconds=round(seconds, 2),
                                     calibration=qvlquant_notes(results[0].layer_info, family)))
                    del model
                    report(rows[-1], t0)
                    save(False)
                for run in runs:
                    out = pathlib.Path(tmp) / f"{run}-{name}-{seed}"
                    try:
                        meta = run_peer(run, folder, batches, bits, group, args.peers_dir, out)
                    except RuntimeError as e:  # the peer refused: its error is the result
                        failed.append({"run": run, "setting": name, "seed": seed, "error": str(e)[-3000:]})
                        print(f"[{time.time() - t0:6.0f}s] seed {seed} {name} {run}: FAILED\n{e}", flush=True)
                        shutil.rmtree(out, ignore_errors=True)
                        save(False)
                        continue
                    model = dense_model(folder, out)
                    shutil.rmtree(out)
                    versions[run] = {k: v for k, v in meta.items() if k.endswith("version") or k in ("peer", "versions")}
                    rows.append(dict(scorer.score(model), setting=name, variant=run, seed=seed,
                                     quantize_seconds=meta.get("wall_seconds"), peer=versions[run],
                                     calibration=calibration_notes(meta)))
                    del model
                    report(rows[-1], t0)
                    save(False)
    save(True)
    print(bm.fmt_table(bm.summarise(rows), args.kl_format))


if __name__ == "__main__":
    main()
