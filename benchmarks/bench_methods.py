"""Quantization methods side by side, with error bars over calibration draws, on an embedded model.

    python benchmarks/bench_methods.py [--model testbed|demo|DIR] [--seeds 0,1,2] [--settings W4g128,W3g128]
        [--variants rtn,gptq,...] [--peers benchmarks/results/peers_testbed.json] [--json FILE]

Every variant is quantized in memory (``quantize_model``, the loop ``qvlquant quantize`` runs) from the calibration
samples of each seed (``--num-samples`` drawn from the demo source: half easy-vqa questions with their image,
half text), and scored by ``Scorer``, the one evaluation every row gets (peers included, through
benchmarks/bench_peers.py):
- held-out text perplexity (the demo's held-out stdlib docstrings, 128-token windows);
- KL(base || quantized) of the answer-token distribution on easy-vqa test questions, and on held-out real
  photographs (``qvlquant.eval.photos``: scikit-image's and matplotlib's sample photos, easy-vqa's questions);
- decoder-layer error: per layer, the quantized layer's output error on the inputs the base model feeds it, over
  what the layer adds to the residual stream, averaged over layers (blind to AWQ's function-preserving scales);
- easy-vqa accuracy on ``--acc-limit`` test questions (greedy generate).
Each cell is mean +- sample standard deviation over the seeds. Within a setting, each variant is compared with the
best mean perplexity: a difference no larger than the larger of the two spreads is a tie (``verdict``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import time

import torch

VARIANTS = {  # name -> (method, settings beyond the bit width and group size); column order explicit, so a name
    # means the same settings whatever qvlquant's defaults are ("*-default": qvlquant's defaults, whatever they are)
    "rtn": ("rtn", {}),
    "rtn-asym": ("rtn", {"sym": False}),
    "gptq-damp0.1": ("gptq", {"mse": 0.0, "damp_percent": 0.1, "desc_act": False}),
    "gptq-damp0.01": ("gptq", {"mse": 0.0, "damp_percent": 0.01, "desc_act": False}),
    "gptq-asym": ("gptq", {"mse": 0.0, "damp_percent": 0.01, "desc_act": False, "sym": False}),
    "gptq-actorder": ("gptq", {"mse": 0.0, "damp_percent": 0.01, "desc_act": True, "static_groups": True}),
    "gptq-actorder-damp0.1": ("gptq", {"mse": 0.0, "damp_percent": 0.1, "desc_act": True, "static_groups": True}),
    "gptq-mse": ("gptq", {"damp_percent": 0.01, "desc_act": False, "mse": 2.4}),
    "gptq-vision0.25": ("gptq", {"mse": 0.0, "damp_percent": 0.01, "desc_act": False, "vision_weight": 0.25}),
    "gptq-vision4": ("gptq", {"mse": 0.0, "damp_percent": 0.01, "desc_act": False, "vision_weight": 4.0}),
    "gptq-actorder-mse": ("gptq", {"damp_percent": 0.01, "desc_act": True, "static_groups": True, "mse": 2.4}),
    "gptq-actorder-asym": ("gptq", {"mse": 0.0, "damp_percent": 0.01, "desc_act": True, "static_groups": True, "sym": False}),
    "gptq-actorder-vision0.25": ("gptq", {"mse": 0.0, "damp_percent": 0.01, "desc_act": True, "static_groups": True,
                                          "vision_weight": 0.25}),
    "awq": ("awq", {"awq_rounding": "rtn"}),
    "awq-noclip": ("awq", {"awq_rounding": "rtn", "awq_clip": False}),
    "awq-gptq": ("awq", {"awq_rounding": "gptq", "damp_percent": 0.01, "mse": 0.0}),
    "awq-gptq-mse": ("awq", {"awq_rounding": "gptq", "damp_percent": 0.01, "mse": 2.4}),
    "gptq-default": ("gptq", {}),
    "awq-default": ("awq", {}),
}
DEFAULT_VARIANTS = ("rtn", "rtn-asym", "gptq-damp0.1", "gptq-damp0.01", "gptq-asym", "gptq-actorder", "gptq-mse",
                    "gptq-vision0.25", "awq", "awq-gptq")
METRICS = ("perplexity", "answer_kl", "photo_kl", "layer_error", "accuracy")


def parse_setting(text: str) -> tuple[int, int]:
    """'W4g128' -> (4, 128)."""
    bits, group = text.upper().removeprefix("W").split("G")
    return int(bits), int(group)


class Scorer:
    """What every quantized model is measured by against one base, with the base's side computed once."""

    def __init__(self, base, processor, family, kl_limit: int = 512, acc_limit: int = 1000):
        from qvlquant.assets.paths import DATA_DIR
        from qvlquant.calib.easyvqa import load_split
        from qvlquant.eval.compare import answer_logits
        from qvlquant.eval.easyvqa import evaluate, prompt_batch
        from qvlquant.eval.perplexity import token_stream
        from qvlquant.eval.photos import photo_items

        self.base, self.processor, self.family = base, processor, family
        test = load_split("test")
        self.kl_items, self.acc_items, self.photos = test[:kl_limit], test[:acc_limit], photo_items()
        docs = (DATA_DIR / "heldout.txt").read_text(encoding="utf-8").splitlines()
        self.stream = token_stream(processor.tokenizer, docs)
        self.base_logits = answer_logits(base, processor, self.kl_items)
        self.base_photo_logits = answer_logits(base, processor, self.photos)
        windows = self.stream[: 16 * 128].view(16, 128)
        images: dict = {}
        self.layer_batches = [  # held-out: text windows and easy-vqa test prompts (images), never calibration
            {"input_ids": windows[i:i + 8], "attention_mask": torch.ones_like(windows[i:i + 8])} for i in (0, 8)
        ] + [prompt_batch(processor, test[-64:][i:i + 32], images) for i in (0, 32)]
        self.base_accuracy = evaluate(base, processor, self.acc_items, desc="bf16")["accuracy"] if acc_limit else None

    def base_row(self) -> dict:
        from qvlquant.eval.perplexity import perplexity

        return {"perplexity": perplexity(self.base, self.stream), "answer_kl": 0.0, "photo_kl": 0.0,
                "layer_error": 0.0, "accuracy": self.base_accuracy}

    def score(self, model) -> dict:
        from qvlquant.eval.compare import answer_logits, decoder_layer_errors, mean_kl
        from qvlquant.eval.easyvqa import evaluate
        from qvlquant.eval.perplexity import perplexity

        errors = decoder_layer_errors(self.base, model, self.family.decoder_layers, self.layer_batches)
        return {
            "perplexity": perplexity(model, self.stream),
            "answer_kl": mean_kl(self.base_logits, answer_logits(model, self.processor, self.kl_items)),
            "photo_kl": mean_kl(self.base_photo_logits, answer_logits(model, self.processor, self.photos)),
            "layer_error": sum(errors) / len(errors),
            "accuracy": evaluate(model, self.processor, self.acc_items)["accuracy"] if self.acc_items else None,
        }


def calibration(processor, n: int, seed: int) -> list[dict]:
    from qvlquant.calib.dataset import CalibConfig, build_batches
    from qvlquant.calib.sources import load_samples

    samples, names, _ = load_samples("demo", n, seed=seed)
    return build_batches(processor, samples, CalibConfig(), names)


def run_variant(base, calib, family, variant: str, bits: int, group: int, results: list | None = None):
    """-> (quantized copy of base, seconds); ``results``: quantize_model's QuantResult is appended to it."""
    from qvlquant.engine.loop import LoopPlan, quantize_model
    from qvlquant.quant.formats import PackFormat
    from qvlquant.quant.spec import QuantConfig, QuantSpec

    method, settings = VARIANTS[variant]
    settings = dict(settings)
    sym = settings.pop("sym", method != "awq")
    qcfg = QuantConfig(method, QuantSpec(bits, group, sym), **settings)
    model = copy.deepcopy(base)
    t0 = time.time()
    plan = LoopPlan(family=family, qcfg=qcfg, pack_format=PackFormat.GPTQ)  # any width; the model in memory is scored
    result = quantize_model(model, calib, plan)
    if results is not None:
        results.append(result)
    return model, time.time() - t0


def method_of(variant: str) -> str:
    """rtn, gptq or awq: qvlquant's variants from VARIANTS, a peer's run from its name (llmc-awq, gptqmodel-gptq)."""
    if variant in VARIANTS:
        return VARIANTS[variant][0]
    return "bf16" if variant == "bf16" else ("awq" if "awq" in variant else "gptq")


def summarise(rows: list[dict], method=method_of) -> list[dict]:
    """Group per-seed rows by (setting, variant): mean and spread of each metric, and verdicts on perplexity
    within the same method (``method``: variant -> the method it is compared within) and setting: against
    qvlquant's best variant ("vs best") and the peers' best run ("vs best peer")."""
    from qvlquant.eval.compare import spread, verdict

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["setting"], r["variant"]), []).append(r)
    out = []
    for (setting, variant), rs in groups.items():
        row = {"setting": setting, "variant": variant, "seeds": [r["seed"] for r in rs], "peer": rs[0].get("peer")}
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                row[m] = dict(zip(("mean", "sd"), spread(vals)), values=vals)
        out.append(row)
    for r in out:
        r["method"] = method(r["variant"])
    for setting, method in {(r["setting"], r["method"]) for r in out if r["variant"] != "bf16"}:
        mine = [r for r in out if r["setting"] == setting and r["method"] == method]
        ours = [r for r in mine if not r["peer"]]
        peers = [r for r in mine if r["peer"]]
        best = min(ours, key=lambda r: r["perplexity"]["mean"]) if ours else None
        best_peer = min(peers, key=lambda r: r["perplexity"]["mean"]) if peers else None
        for r in ours:
            r["vs_best"] = "best" if r is best else verdict(r["perplexity"]["values"], best["perplexity"]["values"])
            if best_peer is not None:
                r["vs_best_peer"] = verdict(r["perplexity"]["values"], best_peer["perplexity"]["values"])
        for r in peers:
            r["vs_best_peer"] = "best" if r is best_peer else verdict(r["perplexity"]["values"],
                                                                      best_peer["perplexity"]["values"])
    return out


def fmt_table(summary: list[dict], kl: str = ".4f") -> str:
    """The summary as a markdown table; ``kl``: the KL cells' format (".2e" where they are all below 1e-4)."""
    head = ["setting", "variant", "ppl", "vs best", "vs best peer", "KL easy-vqa", "KL photos", "layer err", "acc %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda r, m, f: "-" if m not in r else (f"{r[m]['mean']:{f}} ± {r[m]['sd']:{f}}" if len(r[m]["values"]) > 1
                                                   else f"{r[m]['mean']:{f}}")  # noqa: E731
    for r in summary:
        lines.append("| " + " | ".join([
            r["setting"], r["variant"], cell(r, "perplexity", ".3f"), r.get("vs_best", "-"), r.get("vs_best_peer", "-"),
            cell(r, "answer_kl", kl),
            cell(r, "photo_kl", kl), cell(r, "layer_error", ".2e"), cell(r, "accuracy", ".2f"),
        ]) + " |")
    return "\n".join(lines)


def combine(paths: list[str], out: str | None, kl: str = ".4f") -> None:
    """One table from the per-seed rows of earlier runs (each file's meta kept beside)."""
    runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    rows = [r for run in runs for r in run["rows"]]
    summary = summarise(rows)
    table = fmt_table(summary, kl)
    print(table)
    if out:
        meta = {"combined": {p: run["meta"] for p, run in zip(paths, runs)}}
        pathlib.Path(out).write_text(json.dumps({"meta": meta, "summary": summary, "table": table}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed", help="testbed (default), demo, or a Qwen2-VL folder")
    ap.add_argument("--seeds", default="0,1,2", help="calibration draws, comma-separated")
    ap.add_argument("--settings", default="W4g128,W3g128")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--num-samples", type=int, default=64, help="calibration samples per draw")
    ap.add_argument("--kl-limit", type=int, default=512, help="easy-vqa questions for the answer-token KL")
    ap.add_argument("--acc-limit", type=int, default=1000, help="easy-vqa questions for accuracy (0: skip)")
    ap.add_argument("--peers", default=None, help="JSON of bench_peers.py: its per-seed rows join the table")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: one table from the rows of earlier runs' JSON (this script's, bench_peers')")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kl-format", default=".4f", help="the KL cells' format, e.g. .2e for a bed whose KL is tiny")
    ap.add_argument("--json", default=None, help="default benchmarks/results/methods_MODEL.json")
    args = ap.parse_args()
    os.environ.setdefault("QVLQUANT_QUIET", "1")
    if args.combine:
        combine(args.combine, args.json, args.kl_format)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import qvlquant
    from qvlquant.engine.skeleton import EMBEDDED
    from qvlquant.families import family_for

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    settings = [(s, *parse_setting(s)) for s in args.settings.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    base, processor = qvlquant.load(args.model)
    family = family_for(base.config.model_type).bind(base.config)  # hybrid models: each layer's type
    t0 = time.time()
    scorer = Scorer(base, processor, family, args.kl_limit, args.acc_limit)
    rows = [dict(scorer.base_row(), setting="-", variant="bf16", seed=None)]
    for seed in seeds:
        calib = calibration(processor, args.num_samples, seed)
        for name, bits, group in settings:
            for variant in variants:
                model, seconds = run_variant(base, calib, family, variant, bits, group)
                rows.append(dict(scorer.score(model), setting=name, variant=variant, seed=seed,
                                 quantize_seconds=round(seconds, 2)))
                del model
                r = rows[-1]
                print(f"[{time.time() - t0:6.0f}s] seed {seed} {name} {variant}: ppl {r['perplexity']:.3f} "
                      f"KL {r['answer_kl']:.4f} photo KL {r['photo_kl']:.4f} layer {r['layer_error']:.2e}", flush=True)
    if args.peers:
        peers = json.loads(pathlib.Path(args.peers).read_text())
        rows += [r for r in peers["rows"] if r["setting"] in {s for s, _, _ in settings}]
    summary = summarise(rows)
    table = fmt_table(summary, args.kl_format)
    print(table)
    label = args.model if args.model in EMBEDDED else pathlib.Path(args.model).name
    out = pathlib.Path(args.json or f"benchmarks/results/methods_{label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
            "torch": torch.__version__, "qvlquant": qvlquant.__version__, "args": vars(args),
            "seconds": round(time.time() - t0, 1), "load_average": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
