"""Mixed precision at equal size: hand rules against the sensitivity search, with error bars over calibration draws.

    python benchmarks/mixed_precision.py [--models testbed,demo] [--seeds 0,1,2] [--measures layer]
        [--num-samples 64] [--threads 2] [--json benchmarks/results/mixed_precision_cpu.json]
        [--gptqmodel [--peers-dir DIR]]    # GPTQModel's dynamic beside: mixed_precision_peers_testbed.json

Per model and calibration draw (``--num-samples`` from the demo source, the draw's seed), GPTQ W*g128 in memory
(``quantize_model``, the loop ``qvlquant quantize`` runs, with the rules ``--override`` / ``--target-bits`` give):
- uniform W4g128 and uniform W3g128;
- W4 with the first and the last decoder layer in W8 (the usual hand rule);
- the sensitivity search (engine.sensitivity, each of ``--measures``) at uniform W4's bits per weight + 0.25 and
  + 0.5, and at the hand rule's own bits per weight.
Bits per weight are those of the GPTQ layout over the decoder linears, scales, zeros and g_idx counted (as
``quantize`` prints its plan); perplexity is the eval's held-out perplexity (``evaluation.heldout_perplexity``).
Each cell is mean and sample standard deviation over the draws; "vs hand rule" compares the search at the hand
rule's size with the hand rule (``eval.compare.verdict``: a difference within the larger spread is a tie).

``--gptqmodel`` runs the same draws through GPTQModel too (its venv under ``--peers-dir``,
benchmarks/peers/setup_venvs.sh; not in CI): uniform W4g128 and the hand rule, from exactly the batches qvlquant
calibrated on (written with benchmarks/peers/export_batches.py), with bench_peers' GPTQModel run whose settings are
qvlquant's GPTQ defaults (checked against ``QuantConfig`` at startup). The hand rule goes in as GPTQModel's
``dynamic``: the regexes qvlquant's own GPTQ export writes for it (``checkpoint.export.mixed_settings``) with the
width settings. Each linear's width and groups are read back from GPTQModel's saved tensors and must be the ones
qvlquant's plan gives; its bits per weight are those tensors' bits. Its dense weights are scored by the same
held-out perplexity. Extra verdicts: "vs qvlquant" (a GPTQModel row against qvlquant's row for the same rule) and
"vs GPTQModel hand rule" (qvlquant's search at the hand rule's size against GPTQModel's hand rule).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import torch

UNIFORM = "W4g128"
HAND = "W4, first/last layer W8"
HERE = pathlib.Path(__file__).resolve().parent
PEER = "GPTQModel"
PEER_RUN = "gptqmodel-gptq-actorder"  # bench_peers.PEER_RUNS: damp 0.01, static act-order, symmetric, no mse


def calibration(processor, n: int, seed: int) -> list[dict]:
    from qvlquant.calib.dataset import CalibConfig, build_batches
    from qvlquant.calib.sources import load_samples

    samples, names, _ = load_samples("demo", n, seed=seed)
    return build_batches(processor, samples, CalibConfig(), names)


class Bench:
    """One model: its linears, the plans' sizes, and quantize-then-score of a rule set."""

    def __init__(self, name: str):
        import qvlquant
        from qvlquant.engine.loop import decoder_linears, fused_groups
        from qvlquant.families import family_for

        self.name = name
        self.base, self.processor = qvlquant.load(name)
        self.family = family_for(self.base.config.model_type)
        self.layers = len(self.base.get_submodule(self.family.decoder_layers))
        self.linears = decoder_linears(self.base, self.family)
        self.fused = fused_groups(self.family, self.layers)

    def job(self, bits: int):
        from qvlquant.quant.spec import QuantConfig, QuantSpec

        return QuantConfig("gptq", QuantSpec(bits, 128))

    def modules(self, rules, bits: int = 4):
        from qvlquant.quant.rules import ModulePlan

        return ModulePlan.resolve(tuple(rules), self.job(bits), [n for n, _, _ in self.linears], self.fused)

    def size(self, rules, bits: int = 4) -> dict:
        from qvlquant.quant.formats import PackFormat
        from qvlquant.quant.rules import plan_rows, plan_total

        total = plan_total(plan_rows(self.modules(rules, bits), self.linears, PackFormat.GPTQ))
        return {"bits_per_weight": total["bits"] / total["weights"], "mib": total["bytes"] / 2**20}

    def hand_rule(self):
        from qvlquant.quant.rules import parse_rule

        head = self.family.decoder_layers.rsplit(".", 1)[-1]
        return (parse_rule(rf"\.{head}\.(0|{self.layers - 1})\.:bits=8"),)

    def score(self, calib, rules, bits: int = 4) -> tuple[float, float]:
        """-> (held-out perplexity, seconds to quantize)."""
        from qvlquant.engine.loop import LoopPlan, quantize_model
        from qvlquant.evaluation import heldout_perplexity
        from qvlquant.quant.formats import PackFormat

        model = copy.deepcopy(self.base)
        plan = LoopPlan(family=self.family, qcfg=self.job(bits), pack_format=PackFormat.GPTQ,
                        modules=self.modules(rules, bits) if rules else None)
        t0 = time.time()
        quantize_model(model, calib, plan)
        seconds = time.time() - t0
        ppl = heldout_perplexity(model, self.processor)
        del model
        return ppl, seconds

    def measure(self, calib, measure: str):
        """-> (the sensitivity table, its plan, seconds): the pass on the base model in memory."""
        from qvlquant.config import SearchConfig
        from qvlquant.engine.sensitivity import SensitivityPlan, measure_model
        from qvlquant.quant.formats import PackFormat

        plan = SensitivityPlan(family=self.family, qcfg=self.job(4), pack_format=PackFormat.GPTQ,
                               candidates=SearchConfig().candidate_bits, measure=measure)
        t0 = time.time()
        table = measure_model(self.base, calib, plan)
        return table, plan, time.time() - t0


def _script(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gptqmodel_dynamic(bench: Bench, rules, bits: int = 4) -> dict:
    """``rules`` as GPTQModel's ``dynamic``: the regexes qvlquant's GPTQ export writes (``mixed_settings``; they match
    from the start of a name, as GPTQModel matches), each with the width settings of its linears. No ``desc_act``:
    in an export it says whether the checkpoint needs g_idx at run time, but in GPTQModel's quantize config it would
    switch the job's act-order off for those layers, which qvlquant quantizes with the job's order."""
    from qvlquant.checkpoint.export import mixed_settings

    dynamic = {}
    for cfg, patterns in mixed_settings(bench.family, bench.layers, bench.modules(rules, bits)):
        for p in patterns:
            if cfg is None:
                dynamic[f"-:{p}"] = {}
            else:
                dynamic[f"+:{p}"] = {"bits": cfg.spec.bits, "group_size": cfg.spec.group_size, "sym": cfg.spec.sym}
    return dynamic


def check_peer_settings(bench: Bench, extra: list[str], widths) -> None:
    """The GPTQModel run's arguments must be qvlquant's GPTQ defaults at every width the rules use: damping,
    static act-order (GPTQModel's ``--actorder static``), no mse range search."""
    given = dict(zip(extra[::2], extra[1::2]))
    for bits in widths:
        job = bench.job(bits)
        want = {"--damp": job.damp_percent, "--actorder": "static" if job.desc_act and job.static_groups else None,
                "--mse": job.mse}
        got = {"--damp": float(given.get("--damp", 0.01)), "--actorder": given.get("--actorder"),
               "--mse": float(given.get("--mse", 0.0))}
        if got != want:
            raise SystemExit(f"bench_peers {PEER_RUN} runs {got}, but qvlquant's GPTQ at {bits} bits is {want}: "
                             "match the run to the defaults (or the defaults to the run) before comparing")


def applied_widths(bench: Bench, rules, bits: int, meta: dict) -> dict:
    """What GPTQModel's saved tensors hold (meta["packed"], read from their shapes) against qvlquant's plan: every
    decoder linear quantized, at the plan's width and group count. -> {bits_per_weight, mib, widths}."""
    plan = bench.modules(rules, bits) if rules else None
    found = {}
    for name, w in meta["packed"].items():
        found[name] = w
        found[w["key"]] = w  # the input folder's key (model.layers.N...), should GPTQModel name it so
    total_bits = total_weights = 0
    widths: dict[str, int] = {}
    for name, k, n in bench.linears:
        w = found.get(name)
        cfg = plan.config_for(name) if plan else bench.job(bits)
        if w is None:
            raise SystemExit(f"{name}: not among GPTQModel's quantized linears ({len(meta['packed'])} found)")
        want = (cfg.spec.bits, cfg.spec.groups(k), k, n)
        got = (w["bits"], w["groups"], w["in_features"], w["out_features"])
        if got != want:
            raise SystemExit(f"{name}: GPTQModel saved (bits, groups, in, out) {got}, qvlquant's plan is {want}")
        total_bits += w["packed_bits"]
        total_weights += k * n
        widths[name] = w["bits"]
    if len(meta["packed"]) != len(bench.linears):
        raise SystemExit(f"GPTQModel quantized {len(meta['packed'])} linears, the decoder has {len(bench.linears)}")
    return {"bits_per_weight": total_bits / total_weights, "mib": total_bits / 8 / 2**20, "widths": widths}


class Peer:
    """GPTQModel on one model: the same draws' batches written to disk, quantized in its venv, scored here."""

    def __init__(self, bench: Bench, peers_dir: pathlib.Path, tmp: pathlib.Path):
        from qvlquant.engine.skeleton import resolve_model_path

        self.bench, self.peers_dir, self.tmp = bench, peers_dir, tmp
        self.folder = resolve_model_path(bench.name).resolve()
        self.bench_peers = _script("bench_peers")
        sys.path.insert(0, str(HERE / "peers"))
        from export_batches import write_batches  # noqa: E402 (benchmarks/peers is no package)

        self.write_batches = write_batches
        self.versions: dict = {}

    def batches(self, calib, seed: int) -> pathlib.Path:
        out = self.tmp / f"{self.bench.name}-batches-{seed}"
        if not out.exists():
            self.write_batches(calib, out, {"seed": seed, "calib": "demo", "model": str(self.folder)})
        return out

    def score(self, calib, seed: int, rules, bits: int = 4) -> tuple[float, float, dict, dict]:
        """-> (held-out perplexity, seconds GPTQModel quantized for, applied widths, GPTQModel's dynamic)."""
        from qvlquant.evaluation import heldout_perplexity

        dynamic = gptqmodel_dynamic(self.bench, rules, bits) if rules else None
        more = ("--dynamic", json.dumps(dynamic)) if dynamic else ()
        out = self.tmp / f"{self.bench.name}-{PEER_RUN}-{seed}-{len(rules)}"
        meta = self.bench_peers.run_peer(PEER_RUN, self.folder, self.batches(calib, seed), bits, 128,
                                         self.peers_dir, out, more)
        applied = applied_widths(self.bench, rules, bits, meta)
        if dynamic and meta["quantize_config"].get("dynamic") != dynamic:
            raise SystemExit(f"GPTQModel saved dynamic {meta['quantize_config'].get('dynamic')}, given {dynamic}")
        model = self.bench_peers.dense_model(self.folder, out)
        shutil.rmtree(out)
        ppl = heldout_perplexity(model, self.bench.processor)
        del model
        self.versions = {"versions": meta["versions"], "threads": meta["threads"], "cpu_workers": meta["cpu_workers"]}
        return ppl, meta["wall_seconds"], applied, dynamic or {}


def run_seed(bench: Bench, seed: int, args, log, peer: Peer | None = None) -> list[dict]:
    from qvlquant.engine.sensitivity import search

    calib = calibration(bench.processor, args.num_samples, seed)
    rows = []

    def add(variant: str, rules, bits: int = 4, **extra) -> None:
        ppl, seconds = bench.score(calib, rules, bits)
        rows.append(dict(bench.size(rules, bits), model=bench.name, variant=variant, seed=seed, perplexity=ppl,
                         quantize_seconds=round(seconds, 2), rules=[r.text() for r in rules], **extra))
        log(f"{bench.name} seed {seed} {variant}: {rows[-1]['bits_per_weight']:.4f} bits/weight, ppl {ppl:.3f}")

    def add_peer(variant: str, rules) -> None:
        ppl, seconds, applied, dynamic = peer.score(calib, seed, rules)
        widths = applied.pop("widths")
        rows.append(dict(applied, model=bench.name, variant=f"{PEER}: {variant}", mirrors=variant, seed=seed,
                         perplexity=ppl, quantize_seconds=seconds, rules=[r.text() for r in rules],
                         dynamic=dynamic, applied_bits=widths, peer=peer.versions["versions"]))
        at = ", ".join(f"{b} bits: {sum(v == b for v in widths.values())}" for b in sorted(set(widths.values())))
        log(f"{bench.name} seed {seed} {rows[-1]['variant']}: {rows[-1]['bits_per_weight']:.4f} bits/weight "
            f"({at} linears), ppl {ppl:.3f}")

    add(UNIFORM, ())
    add("W3g128", (), bits=3)
    hand = bench.hand_rule()
    add(HAND, hand)
    if peer is not None:
        add_peer(UNIFORM, ())
        add_peer(HAND, hand)
    uniform_bits = bench.size(())["bits_per_weight"]
    targets = {"+0.25": uniform_bits + 0.25, "+0.5": uniform_bits + 0.5,
               "hand rule's size": bench.size(hand)["bits_per_weight"]}
    for measure in args.measures.split(","):
        table, plan, seconds = bench.measure(calib, measure)
        for label, target in targets.items():
            result = search(table, plan, bench.linears, target)
            add(f"search ({measure}) at {label}", result.rules, target_bits=round(target, 4),
                search_seconds=round(seconds, 2))
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    from qvlquant.eval.compare import spread, verdict

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["variant"]), []).append(r)
    out = []
    for (model, variant), rs in groups.items():
        row = {"model": model, "variant": variant, "seeds": [r["seed"] for r in rs]}
        if "mirrors" in rs[0]:
            row["mirrors"] = rs[0]["mirrors"]
        for key in ("perplexity", "bits_per_weight", "mib"):
            values = [r[key] for r in rs]
            row[key] = dict(zip(("mean", "sd"), spread(values)), values=values)
        out.append(row)
    def find(model: str, variant: str) -> dict | None:
        return next((h for h in out if h["model"] == model and h["variant"] == variant), None)

    versus = lambda r, other: verdict(r["perplexity"]["values"], other["perplexity"]["values"])  # noqa: E731
    for r in out:
        hand, peer_hand = find(r["model"], HAND), find(r["model"], f"{PEER}: {HAND}")
        if "hand rule's size" in r["variant"] or r.get("mirrors") == HAND:
            r["vs_hand_rule"] = versus(r, hand)
        if "hand rule's size" in r["variant"] and peer_hand:
            r["vs_peer_hand_rule"] = versus(r, peer_hand)
        if "mirrors" in r:
            r["vs_qvlquant"] = versus(r, find(r["model"], r["mirrors"]))
    return out


def fmt_table(summary: list[dict]) -> str:
    head = ["model", "variant", "bits/weight", "MiB", "perplexity", "vs hand rule"]
    peers = any("mirrors" in r for r in summary)
    if peers:
        head += ["vs qvlquant", f"vs {PEER} hand rule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda r, k, f: (f"{r[k]['mean']:{f}} ± {r[k]['sd']:{f}}" if len(r[k]["values"]) > 1  # noqa: E731
                            else f"{r[k]['mean']:{f}}")
    for r in summary:
        cells = [r["model"], r["variant"], cell(r, "bits_per_weight", ".4f"), cell(r, "mib", ".3f"),
                 cell(r, "perplexity", ".3f"), r.get("vs_hand_rule", "-")]
        if peers:
            cells += [r.get("vs_qvlquant", "-"), r.get("vs_peer_hand_rule", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="testbed,demo", help="embedded models (or Qwen2-VL folders), comma-separated")
    ap.add_argument("--seeds", default="0,1,2", help="calibration draws, comma-separated")
    ap.add_argument("--measures", default="layer", help="sensitivity measures to search with: layer, output or both")
    ap.add_argument("--num-samples", type=int, default=64, help="calibration samples per draw")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/mixed_precision_cpu.json")
    ap.add_argument("--gptqmodel", action="store_true", help="run uniform W4g128 and the hand rule through "
                    "GPTQModel too, from the same batches (its venv: benchmarks/peers/setup_venvs.sh)")
    ap.add_argument("--peers-dir", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("QVLQUANT_PEERS_DIR", "/work/peers")),
                    help="where setup_venvs.sh built the peers' venvs (default $QVLQUANT_PEERS_DIR or /work/peers)")
    args = ap.parse_args()
    os.environ.setdefault("QVLQUANT_QUIET", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import qvlquant
    from qvlquant.evaluation import heldout_perplexity

    t0, load_before = time.time(), os.getloadavg()
    log = lambda text: print(f"[{time.time() - t0:6.0f}s] {text}", flush=True)  # noqa: E731
    rows, versions = [], {}
    with tempfile.TemporaryDirectory(prefix="qvlquant-mixed-") as tmp:
        for name in args.models.split(","):
            bench = Bench(name)
            peer = Peer(bench, args.peers_dir, pathlib.Path(tmp)) if args.gptqmodel else None
            if peer:
                check_peer_settings(bench, peer.bench_peers.PEER_RUNS[PEER_RUN][2], (4, 8))
            rows.append(dict(bench.size((), 4), model=name, variant="bf16", seed=None,
                             perplexity=heldout_perplexity(bench.base, bench.processor), rules=[]))
            rows[-1].update(bits_per_weight=16.0, mib=sum(k * n for _, k, n in bench.linears) * 2 / 2**20)
            for seed in (int(s) for s in args.seeds.split(",")):
                rows += run_seed(bench, seed, args, log, peer)
            if peer:
                versions = peer.versions
    summary = summarise(rows)
    table = fmt_table(summary)
    print(table)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "torch": torch.__version__, "qvlquant": qvlquant.__version__,
            "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
            "seconds": round(time.time() - t0, 1)}
    if args.gptqmodel:
        venv, runner, extra = _script("bench_peers").PEER_RUNS[PEER_RUN]
        meta["peer"] = {"name": PEER, "versions": versions, "run": PEER_RUN, "runner": f"benchmarks/peers/{runner}",
                        "arguments": extra + ["--bits", "4", "--group-size", "128"], **versions}
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
