"""Mixed precision at equal size: hand rules against the sensitivity search, with error bars over calibration draws.

    python benchmarks/mixed_precision.py [--models testbed,demo] [--seeds 0,1,2] [--measures layer]
        [--num-samples 64] [--threads 2] [--json benchmarks/results/mixed_precision_cpu.json]

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

UNIFORM = "W4g128"


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


def run_seed(bench: Bench, seed: int, args, log) -> list[dict]:
    from qvlquant.engine.sensitivity import search

    calib = calibration(bench.processor, args.num_samples, seed)
    rows = []

    def add(variant: str, rules, bits: int = 4, **extra) -> None:
        ppl, seconds = bench.score(calib, rules, bits)
        rows.append(dict(bench.size(rules, bits), model=bench.name, variant=variant, seed=seed, perplexity=ppl,
                         quantize_seconds=round(seconds, 2), rules=[r.text() for r in rules], **extra))
        log(f"{bench.name} seed {seed} {variant}: {rows[-1]['bits_per_weight']:.4f} bits/weight, ppl {ppl:.3f}")

    add(UNIFORM, ())
    add("W3g128", (), bits=3)
    hand = bench.hand_rule()
    add("W4, first/last layer W8", hand)
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
        for key in ("perplexity", "bits_per_weight", "mib"):
            values = [r[key] for r in rs]
            row[key] = dict(zip(("mean", "sd"), spread(values)), values=values)
        out.append(row)
    for r in out:
        if "hand rule's size" in r["variant"]:
            hand = next(h for h in out if h["model"] == r["model"] and h["variant"].startswith("W4, first/last"))
            r["vs_hand_rule"] = verdict(r["perplexity"]["values"], hand["perplexity"]["values"])
    return out


def fmt_table(summary: list[dict]) -> str:
    head = ["model", "variant", "bits/weight", "MiB", "perplexity", "vs hand rule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda r, k, f: (f"{r[k]['mean']:{f}} ± {r[k]['sd']:{f}}" if len(r[k]["values"]) > 1  # noqa: E731
                            else f"{r[k]['mean']:{f}}")
    for r in summary:
        lines.append("| " + " | ".join([r["model"], r["variant"], cell(r, "bits_per_weight", ".4f"),
                                        cell(r, "mib", ".3f"), cell(r, "perplexity", ".3f"),
                                        r.get("vs_hand_rule", "-")]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="testbed,demo", help="embedded models (or Qwen2-VL folders), comma-separated")
    ap.add_argument("--seeds", default="0,1,2", help="calibration draws, comma-separated")
    ap.add_argument("--measures", default="layer", help="sensitivity measures to search with: layer, output or both")
    ap.add_argument("--num-samples", type=int, default=64, help="calibration samples per draw")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/mixed_precision_cpu.json")
    args = ap.parse_args()
    os.environ.setdefault("QVLQUANT_QUIET", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import qvlquant
    from qvlquant.evaluation import heldout_perplexity

    t0, load_before = time.time(), os.getloadavg()
    log = lambda text: print(f"[{time.time() - t0:6.0f}s] {text}", flush=True)  # noqa: E731
    rows = []
    for name in args.models.split(","):
        bench = Bench(name)
        rows.append(dict(bench.size((), 4), model=name, variant="bf16", seed=None,
                         perplexity=heldout_perplexity(bench.base, bench.processor), rules=[]))
        rows[-1].update(bits_per_weight=16.0, mib=sum(k * n for _, k, n in bench.linears) * 2 / 2**20)
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += run_seed(bench, seed, args, log)
    summary = summarise(rows)
    table = fmt_table(summary)
    print(table)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "torch": torch.__version__, "qvlquant": qvlquant.__version__, "args": vars(args),
            "seconds": round(time.time() - t0, 1)}
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
