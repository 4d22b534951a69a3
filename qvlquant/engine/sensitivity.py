"""The sensitivity search behind ``--target-bits``: a calibration pass that measures, per linear group (the linears
that read one input: q/k/v, gate/up, which serving stacks fuse and so need one setting), the error each candidate
width causes; then the choice of one candidate per group at the target's size; then that choice as explicit rules,
which the normal quantize run takes like any other (export, vLLM and load see only rules).

The pass streams like the quantize loop: capture layer 0's inputs, then one decoder layer at a time from a
``LayerSource`` (the checkpoint, ``engine.streaming.StreamedLayers``), measured, replayed in full precision to give
the next layer its inputs, released. Memory holds one layer and the calibration activations (twice, for the
``layer`` measure: the full-precision outputs it compares against).

    table = measure_model(skeleton, batches, plan, source)       # [GroupErrors], layer by layer
    choice = search(table, plan, linears, target_bits=4.25)       # the rules, the sizes, the report's table
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence

import torch

from qvlquant.config import SKIP_BITS, candidate_config, check_target_bits, linear_bits
from qvlquant.engine.loop import InMemoryLayers, LayerSource, capture_inputs
from qvlquant.families import ModelFamily
from qvlquant.quant.apply import collect_hessians
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.gptq import hessian
from qvlquant.quant.layer import LayerInput, QuantizationError, next_input, run_layer
from qvlquant.quant.rtn import fake_quantize
from qvlquant.quant.rules import ModulePlan, Rule, describe
from qvlquant.quant.sensitivity import (
    choose,
    output_energy,
    output_error,
    squared_error,
)
from qvlquant.quant.spec import QuantConfig
from qvlquant.ui.progress import progress


@dataclasses.dataclass(frozen=True, kw_only=True)
class SensitivityPlan:
    """What the pass measures: ``candidates`` (widths; SKIP_BITS: kept) of the job's ``qcfg`` for each linear group
    that ``fixed`` (the user's rules, resolved) leaves to the search, by ``measure`` ("layer" or "output")."""

    family: ModelFamily
    qcfg: QuantConfig  # the job's settings; the candidates differ from it in bits only
    pack_format: PackFormat
    candidates: tuple[int, ...]
    measure: str = "layer"
    fixed: ModulePlan | None = None  # the user's rules: the groups they match keep them and are not searched
    storage_bits: int = 16  # bits per weight of a kept linear (the checkpoint's dtype)
    offload: str | None = None

    def searched(self, prefix: str, group: Sequence[str]) -> bool:
        """Whether the linear group ``group`` of the layer at ``prefix`` is the search's (no user rule matches it)."""
        return self.fixed is None or all(self.fixed.rule_for(f"{prefix}.{n}") is None for n in group)

    def config(self, bits: int) -> QuantConfig | None:
        return candidate_config(self.qcfg, bits)


@dataclasses.dataclass(frozen=True)
class GroupErrors:
    """One linear group's measured error at each candidate width (relative: see quant.sensitivity)."""

    layer: int
    names: tuple[str, ...]  # runtime names of its linears
    errors: tuple[tuple[int, float], ...]  # (candidate bits, error), by width


@torch.no_grad()
def measure_layer(layer: torch.nn.Module, inputs: list[LayerInput], groups: list[tuple[str, ...]],
                  plan: SensitivityPlan) -> dict[tuple[str, ...], dict[int, float]]:
    """Each group's error at each candidate (SKIP_BITS: 0, the weights as they are). The layer is left as it was."""
    quantized = {b: plan.config(b).spec for b in plan.candidates if b != SKIP_BITS}
    measured = (_output_errors if plan.measure == "output" else _layer_errors)(layer, inputs, groups, quantized,
                                                                                 plan.qcfg.vision_weight)
    return {g: {**measured[g], **({SKIP_BITS: 0.0} if SKIP_BITS in plan.candidates else {})} for g in groups}


def _output_errors(layer, inputs, groups, specs, vision_weight) -> dict:
    """``tr(dW H dW^T) / tr(W H W^T)`` over each group's linears, from the Hessians GPTQ would collect."""
    sums = collect_hessians(layer, inputs, groups, vision_weight) if groups else {}
    out = {}
    for group in groups:
        S, n = sums.pop(group)
        if n == 0:
            raise QuantizationError(f"{group[0]}: received no calibration tokens; add samples")
        H = hessian(S, n)
        weights = [layer.get_submodule(name).weight.data for name in group]
        energy = sum(output_energy(w, H) for w in weights)
        out[group] = {b: sum(output_error(w, H, spec) for w in weights) / max(energy, 1e-30)
                      for b, spec in specs.items()}
    return out


def _layer_errors(layer, inputs, groups, specs, vision_weight) -> dict:
    """The layer's output with one group rounded to nearest at each width, against full precision: squared error
    over the output's energy, real tokens only."""
    refs = [run_layer(layer, x).to(x.hidden.device) for x in inputs]
    out = {}
    for group in groups:
        linears = [layer.get_submodule(name) for name in group]
        kept = [m.weight.data for m in linears]
        out[group] = {}
        try:
            for bits, spec in specs.items():
                for m, w in zip(linears, kept):
                    m.weight.data = fake_quantize(w, spec)
                err = energy = 0.0
                for x, ref in zip(inputs, refs):
                    e, r = squared_error(ref, run_layer(layer, x).to(ref.device), x.token_mask)
                    err, energy = err + e, energy + r
                out[group][bits] = err / max(energy, 1e-30)
        finally:
            for m, w in zip(linears, kept):
                m.weight.data = w
    return out


@torch.no_grad()
def measure_model(model, batches: list[dict], plan: SensitivityPlan,
                  source: LayerSource | None = None) -> list[GroupErrors]:
    """The pass: capture, then per decoder layer load it from ``source``, measure its searched groups, replay it
    unquantized for the next layer's inputs, release it. -> every searched group's errors, layer by layer."""
    family = plan.family
    source = source or InMemoryLayers(model, family)
    inputs = capture_inputs(model, family, batches, plan.offload)
    source.after_capture()
    n = len(model.get_submodule(family.decoder_layers))
    table = []
    for i in progress(range(n), desc=f"sensitivity ({plan.measure})", unit="layer"):
        prefix = f"{family.decoder_layers}.{i}"
        layer = source.load(i)
        inputs = [x.of_type(family.layer_type(i)) for x in inputs]  # hybrid models: this layer type's mask
        groups = [g for g in family.at(i).linear_groups if plan.searched(prefix, g)]
        measured = measure_layer(layer, inputs, groups, plan)
        for unit in search_units(family.at(i), groups):  # an MoE layer's experts: one unit, their errors summed
            errors = {b: sum(measured[g][b] for g in unit) for b in measured[unit[0]]}
            table.append(GroupErrors(i, tuple(f"{prefix}.{name}" for g in unit for name in g),
                                     tuple(sorted(errors.items()))))
        inputs = [next_input(i, layer, x) for x in inputs]
        source.release(i)
    return table


def search_units(layout: ModelFamily, groups: list[tuple[str, ...]]) -> list[tuple[tuple[str, ...], ...]]:
    """The layer's linear ``groups`` joined where one of vLLM's fused layers (``layout.fused``) spans several: an
    MoE layer's experts, one group per expert, which vLLM runs as one layer of one setting. The search gives each
    unit one width, so it never splits a fused layer (summing its groups' errors is the same knapsack with that
    constraint). Groups that no fused layer joins stay units of their own, in their order."""
    unit_of = list(range(len(groups)))

    def root(i: int) -> int:
        while unit_of[i] != i:
            i = unit_of[i]
        return i

    for _, parts in layout.fused:
        joined = [i for i, g in enumerate(groups) if set(g) & set(parts)]
        for i in joined[1:]:
            unit_of[root(i)] = root(joined[0])
    units: dict[int, list[tuple[str, ...]]] = {}
    for i, g in enumerate(groups):
        units.setdefault(root(i), []).append(g)
    return [tuple(u) for u in units.values()]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The search's choice: a width per searched group, the rules that say so, and the sizes."""

    rules: tuple[Rule, ...]  # one per searched group whose width is not the job's, anchored on its runtime names
    chosen: tuple[int, ...]  # per row of ``table``
    table: tuple[GroupErrors, ...]
    sizes: tuple[dict[int, int], ...]  # per row of ``table``: candidate -> bits
    target_bits: float
    bits: int  # of every quantizable linear (searched or fixed by a user rule), scales and zeros counted
    weights: int
    measure: str

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights

    def error(self) -> float:
        return sum(dict(row.errors)[b] for row, b in zip(self.table, self.chosen))

    def to_report(self, plan: SensitivityPlan, seconds: float) -> dict:
        """What quantize_report.json records under ``mixed_precision``."""
        default = plan.qcfg.spec.bits
        return {
            "target_bits": self.target_bits, "bits_per_weight": round(self.bits_per_weight, 4),
            "measure": self.measure, "candidates": list(plan.candidates), "seconds": round(seconds, 2),
            "error": self.error(),
            "error_at_job_bits": (sum(dict(r.errors)[default] for r in self.table)
                                  if default in plan.candidates else None),
            "rules": [rule.text() for rule in self.rules],
            "groups": [{"layer": row.layer, "linears": [n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]
                                                        for n in row.names],
                        "errors": {str(b): e for b, e in row.errors}, "bits": {str(b): s for b, s in size.items()},
                        "chosen": b}
                       for row, size, b in zip(self.table, self.sizes, self.chosen)],
        }


def group_sizes(plan: SensitivityPlan, names: Sequence[str], shapes: dict[str, tuple[int, int]]) -> dict[int, int]:
    """candidate -> bits the group's linears ``names`` take at it (``shapes``: name -> (in, out) features)."""
    return {b: sum(linear_bits(plan.pack_format, plan.config(b), *shapes[n], plan.storage_bits) for n in names)
            for b in plan.candidates}


def search(table: Sequence[GroupErrors], plan: SensitivityPlan, linears: Sequence[tuple[str, int, int]],
           target_bits: float) -> SearchResult:
    """The width per group of ``table`` with the least summed error such that every linear of ``linears`` ((runtime
    name, in, out features): all the quantizable ones, as ``plan_rows`` counts them) averages at most
    ``target_bits`` per weight; linears a user rule fixes count at their rule's size."""
    shapes = {name: (k, n) for name, k, n in linears}
    searched = {name for row in table for name in row.names}
    fixed_bits = sum(linear_bits(plan.pack_format, (plan.fixed or ModulePlan(plan.qcfg)).config_for(name), k, n,
                                 plan.storage_bits) for name, k, n in linears if name not in searched)
    weights = sum(k * n for _, k, n in linears)
    sizes = [group_sizes(plan, row.names, shapes) for row in table]
    budget = int(target_bits * weights) - fixed_bits
    totals = {b: (fixed_bits + sum(s[b] for s in sizes)) / weights for b in plan.candidates}
    check_target_bits(target_bits, totals, "over this model's linears" + (" (those fixed by rules included)"
                                                                            if fixed_bits else ""))
    options = [[(size[b], dict(row.errors)[b]) for b in plan.candidates] for row, size in zip(table, sizes)]
    try:
        picked = choose(options, budget)
    except ValueError as e:
        raise ValueError(f"target_bits {target_bits:g}: {e}") from None
    chosen = tuple(plan.candidates[j] for j in picked)
    bits = fixed_bits + sum(s[b] for s, b in zip(sizes, chosen))
    rules = tuple(group_rule(row.names, b) for row, b in zip(table, chosen) if b != plan.qcfg.spec.bits)
    return SearchResult(rules, chosen, tuple(table), tuple(sizes), target_bits, bits, weights, plan.measure)


def group_rule(names: Sequence[str], bits: int) -> Rule:
    """The rule giving exactly the linears ``names`` (one layer's group) width ``bits`` (SKIP_BITS: skip):
    ``^model\\.language_model\\.layers\\.3\\.(?:self_attn\\.q_proj|...)$``. Names numbered 0..n-1 below one module
    with the same linears each (every expert of an MoE layer) take one pattern, the number as ``\\d+``."""
    prefix = names[0].rsplit(".", 2)[0] + "."
    inside = [n[len(prefix):] for n in names]
    numbered: dict[str, list[str]] = {}
    for n in inside:
        index, _, leaf = n.partition(".")
        numbered.setdefault(index, []).append(leaf)
    leaves = next(iter(numbered.values()))
    if len(numbered) > 1 and sorted(numbered) == sorted(map(str, range(len(numbered)))) and \
            all(v == leaves for v in numbered.values()):
        body = rf"\d+\.(?:{'|'.join(re.escape(leaf) for leaf in leaves)})"
    else:
        body = "|".join(re.escape(n) for n in inside)
    pattern = f"^{re.escape(prefix)}(?:{body})$"
    return Rule(pattern, skip=True) if bits == SKIP_BITS else Rule(pattern, settings=(("bits", bits),))


def format_choice(result: SearchResult, plan: SensitivityPlan) -> str:
    """One line per chosen width: how many groups took it (what quantize prints after the search)."""
    counts: dict[int, int] = {}
    for b in result.chosen:
        counts[b] = counts.get(b, 0) + 1
    shown = ", ".join(f"{n} at {describe(plan.config(b))}" for b, n in sorted(counts.items()))
    return (f"sensitivity search ({result.measure}): {len(result.chosen)} linear groups: {shown}; "
            f"{result.bits_per_weight:.4f} bits per weight for a target of {result.target_bits:g}")


def timed_search(model, batches, plan, source, linears, target_bits) -> tuple[SearchResult, dict]:
    """measure_model then search. -> (the result, its report section)."""
    t0 = time.time()
    result = search(measure_model(model, batches, plan, source), plan, linears, target_bits)
    return result, result.to_report(plan, time.time() - t0)
