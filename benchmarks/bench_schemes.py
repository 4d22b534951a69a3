"""The served schemes on an embedded model: each export written by ``qvlquant.quantize`` and reloaded with
``qvlquant.load`` (the served numerics: int8 activations per token for W8A8, static e4m3 ones for FP8, e2m1 ones per
16 inputs under the calibrated global scale for NVFP4), optionally beside llm-compressor 0.14's own runs.

    python benchmarks/bench_schemes.py [--model testbed] [--schemes W8A8 | FP8_DYNAMIC,FP8,NVFP4A16,NVFP4,W4A16]
        [--seeds 0,1,2] [--num-samples 32] [--threads 1] [--variants datafree-rtn,...] [--llmc] [--acc-limit 0]
        [--json benchmarks/results/schemes_testbed.json]

``VARIANTS``: qvlquant's rows, each in one setting (the scheme it is compared in): W8A8 data-free round-to-nearest
against the calibrated path (SmoothQuant off / 0.8 / auto, then GPTQ); FP8_DYNAMIC (data-free) and FP8 (static
per-tensor input scales, calibrated); NVFP4A16 (data-free, weight-only) and NVFP4 (W4A4, calibrated input global
scales: its default SmoothQuant, then with smoothing off, at 0.5 and at 0.8; rows named "nvfp4" written before the
default smoothing are the unsmoothed ones); W4A16 GPTQ (qvlquant's GPTQ defaults, 4 bits, groups of 128). ``--schemes`` picks the settings whose
variants run (default W8A8, the original benchmark); ``--variants`` names them one by one instead.

Every export is scored by ``bench_methods.Scorer``, the evaluation every other method row gets: held-out text
perplexity, KL of the easy-vqa answer tokens and of the held-out photographs' answers to the BF16 model,
decoder-layer error, and easy-vqa accuracy on ``--acc-limit`` test questions (0: skipped; greedy generation adds
minutes). The calibrated rows are drawn ``--num-samples`` from the demo source per seed; each cell is mean +- sample
standard deviation over the seeds (a data-free row has no draw: one run). Each row records the 1-minute load average
before and after it; the JSON is rewritten after every row, so a run stopped early keeps the rows it finished.

``--llmc``: llm-compressor 0.14's runs of the chosen settings beside them (``LLMC_VARIANTS``: its W8A8 recipe,
``SmoothQuantModifier(smoothing_strength=0.8)`` then ``GPTQModifier(scheme="W8A8")``, and GPTQ alone; its
``QuantizationModifier(scheme=S)`` for FP8_DYNAMIC and NVFP4A16 without data, for FP8 and NVFP4 through ``oneshot``
over the calibration set), in its venv (benchmarks/peers/setup_venvs.sh), from the very batches qvlquant calibrates
on for the same seed (benchmarks/peers/export_batches.py); its compressed-tensors checkpoint is loaded by
``qvlquant.load`` (the same layouts and configs) and scored by the same scorer.
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

# name -> (setting: the scheme the row is compared in, qvlquant.quantize settings, calibrated: one run per seed)
VARIANTS = {
    "datafree-rtn": ("W8A8", {"scheme": "W8A8"}, False),
    "smoothquant-off+gptq": ("W8A8", {"scheme": "W8A8", "method": "gptq", "smoothing_strength": "off"}, True),
    "smoothquant-0.8+gptq": ("W8A8", {"scheme": "W8A8", "method": "gptq", "smoothing_strength": "0.8"}, True),
    "smoothquant-auto+gptq": ("W8A8", {"scheme": "W8A8", "method": "gptq", "smoothing_strength": "auto"}, True),
    "fp8-dynamic": ("FP8_DYNAMIC", {"scheme": "FP8_DYNAMIC"}, False),
    "fp8-static": ("FP8", {"scheme": "FP8"}, True),
    "nvfp4a16": ("NVFP4A16", {"scheme": "NVFP4A16"}, False),
    "nvfp4": ("NVFP4", {"scheme": "NVFP4"}, True),  # its default: SmoothQuant at DEFAULT_NVFP4_SMOOTHING
    "nvfp4-smoothquant-off": ("NVFP4", {"scheme": "NVFP4", "smoothing_strength": "off"}, True),
    "nvfp4-smoothquant-0.5": ("NVFP4", {"scheme": "NVFP4", "smoothing_strength": "0.5"}, True),
    "nvfp4-smoothquant-0.8": ("NVFP4", {"scheme": "NVFP4", "smoothing_strength": "0.8"}, True),
    "gptq-w4a16": ("W4A16", {"method": "gptq", "bits": 4, "group_size": 128}, True),
}
# name -> (setting, run_llmcompressor.py's arguments, calibrated: from each seed's batches)
LLMC_VARIANTS = {
    "llmc smoothquant-0.8+gptq": ("W8A8", ["--method", "w8a8-gptq", "--smoothing", "0.8", "--damp", "0.01"], True),
    "llmc gptq": ("W8A8", ["--method", "w8a8-gptq", "--smoothing", "0.0", "--damp", "0.01"], True),
    "llmc fp8-dynamic": ("FP8_DYNAMIC", ["--method", "FP8_DYNAMIC"], False),
    "llmc fp8-static": ("FP8", ["--method", "FP8"], True),
    "llmc nvfp4a16": ("NVFP4A16", ["--method", "NVFP4A16"], False),
    "llmc nvfp4": ("NVFP4", ["--method", "NVFP4"], True),
}
SETTINGS = tuple(dict.fromkeys(setting for setting, _, _ in VARIANTS.values()))
HERE = pathlib.Path(__file__).resolve().parent


def choose(schemes: str | None, variants: str | None, llmc: bool) -> tuple[list[str], list[str]]:
    """-> (qvlquant's variants, llm-compressor's): ``variants`` by name, else every variant of ``schemes``; with
    ``llmc``, llm-compressor's variants of the settings chosen. Unknown names are refused."""
    settings = [s for s in (schemes or "W8A8").split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"--schemes {','.join(unknown)}: choose from {', '.join(SETTINGS)}")
    if variants:
        chosen = [v for v in variants.split(",") if v]
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"--variants {','.join(unknown)}: choose from {', '.join(VARIANTS)}")
        settings = list(dict.fromkeys(VARIANTS[v][0] for v in chosen))
    else:
        chosen = [v for v, (setting, _, _) in VARIANTS.items() if setting in settings]
    peers = [v for v, (setting, _, _) in LLMC_VARIANTS.items() if setting in settings] if llmc else []
    return chosen, peers


def jobs(chosen: list[str], peers: list[str], seeds: list[int]) -> list[tuple[str, str, int | None]]:
    """The rows in the order they run: setting by setting, the data-free runs first, then each seed's calibrated
    runs (qvlquant's, then llm-compressor's), so a run stopped early leaves whole settings. -> (variant, tool, seed)."""
    table = {**{v: (VARIANTS[v][0], VARIANTS[v][2], "qvlquant") for v in chosen},
             **{v: (LLMC_VARIANTS[v][0], LLMC_VARIANTS[v][2], "llmc") for v in peers}}
    out = []
    for setting in dict.fromkeys(s for s, _, _ in table.values()):
        mine = [(v, tool) for v, (s, _, tool) in table.items() if s == setting]
        out += [(v, tool, None) for v, tool in mine if not table[v][1]]
        out += [(v, tool, seed) for seed in seeds for v, tool in mine if table[v][1]]
    return out


def compared_within(variant: str) -> str:
    """The method a row's perplexity verdict is taken within (bench_methods.summarise): its setting, so that each
    scheme's rows, qvlquant's and llm-compressor's, are compared with each other only."""
    return "bf16" if variant == "bf16" else (VARIANTS.get(variant) or LLMC_VARIANTS[variant])[0]


def default_json(model: str, settings: set[str]) -> pathlib.Path:
    """benchmarks/results/w8a8_MODEL.json for the W8A8 benchmark alone (its earlier name), else schemes_MODEL.json."""
    return pathlib.Path(f"benchmarks/results/{'w8a8' if settings == {'W8A8'} else 'schemes'}_{model}.json")


def llmc_export(folder: pathlib.Path, batches: pathlib.Path | None, peer_args: list[str], out: pathlib.Path,
                peers_dir: pathlib.Path, threads: int) -> dict:
    """One of llm-compressor's runs on ``folder`` (from export_batches.py's ``batches`` where it calibrates), its
    checkpoint kept in ``out``. -> run_llmcompressor.py's meta.json."""
    python = peers_dir / "llmc" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run bash benchmarks/peers/setup_venvs.sh {peers_dir}")
    data = [] if batches is None else ["--batches", str(batches)]
    meta = pathlib.Path(str(out) + "-meta")
    done = subprocess.run([str(python), str(HERE / "peers" / "run_llmcompressor.py"), "--model", str(folder), *data,
                           *peer_args, "--dtype", "bfloat16", "--threads", str(threads), "--keep", str(out),
                           "--output", str(meta)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=out.parent)  # llm-compressor writes its logs/ folder into the working directory
    if done.returncode:
        raise RuntimeError(f"run_llmcompressor.py {' '.join(peer_args)} failed:\n{done.stderr[-4000:]}")
    return json.loads((meta / "meta.json").read_text())


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
    ap.add_argument("--schemes", default="W8A8", help=f"settings whose variants run, of {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--kl-limit", type=int, default=256)
    ap.add_argument("--acc-limit", type=int, default=0, help="easy-vqa questions for accuracy (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=None, help=f"instead of --schemes: of {', '.join(VARIANTS)}")
    ap.add_argument("--llmc", action="store_true", help="add llm-compressor's runs of the settings (its venv)")
    ap.add_argument("--peers-dir", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("QVLQUANT_PEERS_DIR", "/work/peers")))
    ap.add_argument("--json", default=None, help="default benchmarks/results/schemes_MODEL.json (W8A8 alone: "
                                                 "w8a8_MODEL.json)")
    args = ap.parse_args()
    chosen, peers = choose(args.schemes, args.variants, args.llmc)
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = {VARIANTS[v][0] for v in chosen} | {LLMC_VARIANTS[v][0] for v in peers}
    out_json = pathlib.Path(args.json) if args.json else default_json(args.model, settings)
    os.environ.setdefault("QVLQUANT_QUIET", "1")
    torch.set_num_threads(args.threads)
    import qvlquant
    from qvlquant.assets.paths import EMBEDDED_MODELS
    from qvlquant.families import family_for

    t0 = time.time()
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
            "cpu": cpu_model(), "torch": torch.__version__, "qvlquant": qvlquant.__version__,
            "args": vars(args), "settings": sorted(settings), "variants": chosen + peers,
            "load_average_start": os.getloadavg()}
    rows: list[dict] = []

    def save() -> str:
        summary = bench_methods.summarise(rows, method=compared_within)
        table = bench_methods.fmt_table(summary)
        meta.update(seconds=round(time.time() - t0, 1), load_average=os.getloadavg())
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary, "table": table}, indent=2,
                                       default=str) + "\n")
        return table

    base, processor = qvlquant.load(args.model)
    family = family_for(base.config.model_type)
    load_before = os.getloadavg()[0]
    scorer = bench_methods.Scorer(base, processor, family, args.kl_limit, acc_limit=args.acc_limit)
    rows.append(dict(scorer.base_row(), setting=next(iter(settings)) if len(settings) == 1 else "-",
                     variant="bf16", seed=None, load_before=load_before, load_after=os.getloadavg()[0]))
    save()
    folder = pathlib.Path(EMBEDDED_MODELS.get(args.model, args.model)).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        batches: dict[int, pathlib.Path] = {}
        for variant, tool, seed in jobs(chosen, peers, seeds):
            out = pathlib.Path(tmp) / f"{variant.replace(' ', '-')}-{seed}"
            load_before = os.getloadavg()[0]
            started = time.time()
            setting = (LLMC_VARIANTS if tool == "llmc" else VARIANTS)[variant][0]
            try:
                if tool == "llmc":
                    if seed is not None and seed not in batches:
                        batches[seed] = pathlib.Path(tmp) / f"batches-{seed}"
                        subprocess.run([sys.executable, str(HERE / "peers" / "export_batches.py"), "--model",
                                        str(folder), "--num-samples", str(args.num_samples), "--seed", str(seed),
                                        "--output", str(batches[seed])], check=True, stdout=subprocess.DEVNULL)
                        started = time.time()
                    peer_meta = llmc_export(folder, batches.get(seed), LLMC_VARIANTS[variant][1], out,
                                            args.peers_dir, args.threads)
                    extra = {"peer": "llm-compressor 0.14", "peer_seconds": peer_meta["wall_seconds"],
                             "peer_versions": peer_meta["versions"]}
                else:
                    _, quantize_settings, calibrated = VARIANTS[variant]
                    calib = dict(num_samples=args.num_samples, seed=seed) if calibrated else {}
                    report = qvlquant.quantize(output=str(out), model=args.model, threads=args.threads,
                                               **quantize_settings, **calib)
                    extra = {}
                    if quantize_settings.get("smoothing_strength") == "auto":
                        extra["strengths"] = report["smoothing"]["groups"]
                seconds = time.time() - started
                model, _ = qvlquant.load(out)
                scores = scorer.score(model)
                del model
            except Exception as err:  # recorded in the JSON's meta.failed, and the other rows still run
                print(f"[{time.time() - t0:6.0f}s] {setting} {variant} seed {seed}: FAILED\n{err}", flush=True)
                meta.setdefault("failed", []).append({"variant": variant, "seed": seed, "error": repr(err)})
                save()
                continue
            row = dict(scores, setting=setting, variant=variant, seed=seed, quantize_seconds=round(seconds, 2),
                       **extra, load_before=load_before, load_after=os.getloadavg()[0])
            rows.append(row)
            save()
            print(f"[{time.time() - t0:6.0f}s] {setting} {variant} seed {seed}: ppl {row['perplexity']:.4f} KL "
                  f"{row['answer_kl']:.5f} photo KL {row['photo_kl']:.5f} layer {row['layer_error']:.2e}"
                  + ("" if row["accuracy"] is None else f" acc {row['accuracy']:.2f}")
                  + f" (load {load_before:.2f} -> {row['load_after']:.2f})", flush=True)
    print(save())


if __name__ == "__main__":
    main()
