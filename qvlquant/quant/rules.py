"""Per-module precision: an ordered list of ``pattern -> action`` rules over runtime module names, first match wins.

An action is ``skip`` (the linear keeps the checkpoint's dtype) or settings that replace the job's for the matched
linears: ``bits``, ``group_size``, ``sym`` and ``method`` (``rtn`` or ``gptq``, which pack alike). Patterns are
regular expressions searched (``re.search``) in runtime names such as ``model.language_model.layers.3.mlp.down_proj``;
``mlp.down_proj`` or ``layers\\.(0|27)\\.`` are typical.

    rules = (parse_rule("mlp.down_proj:bits=8"), parse_rule("layers\\.0\\.:skip"))
    plan = ModulePlan.resolve(rules, QuantConfig("gptq"), names)   # validated against the model's linears
    plan.config_for("model.language_model.layers.0.self_attn.q_proj")   # None: skipped

Everything is checked before any data work: a pattern that is no regular expression, a setting that is unknown or
of the wrong type, a pattern that matches no linear, and linears that serving stacks fuse (q/k/v, gate/up) given
different settings are errors naming the rule.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from qvlquant.quant.spec import QuantConfig, QuantSpec

SKIP = "skip"
SETTINGS = {"bits": int, "group_size": int, "sym": bool, "method": str}  # what a rule may set
RULE_METHODS = ("rtn", "gptq")  # methods a rule may switch between: they round the same layer alone and pack alike
MAX_PATTERN = 1000  # characters; a pattern longer than any module name is a mistake


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` (a regex searched in runtime module names) -> skip, or the settings in ``settings``."""

    pattern: str
    skip: bool = False
    settings: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern or len(self.pattern) > MAX_PATTERN:
            raise ValueError(f"rule pattern must be a regular expression of 1 to {MAX_PATTERN} characters, "
                             f"got {self.pattern!r:.80}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"rule {self.pattern!r}: not a regular expression ({e})") from None
        if self.skip == bool(self.settings):
            raise ValueError(f"rule {self.pattern!r}: give either skip or settings "
                             f"({', '.join(SETTINGS)}), not {'both' if self.skip else 'neither'}")
        for key, value in self.settings:
            kind = SETTINGS.get(key)
            if kind is None:
                raise ValueError(f"rule {self.pattern!r}: unknown setting {key!r}; a rule sets {', '.join(SETTINGS)} "
                                 "or skip")
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"rule {self.pattern!r}: {key} must be {kind.__name__}, got {value!r:.80}")
        if dict(self.settings).get("method", "rtn") not in RULE_METHODS:
            raise ValueError(f"rule {self.pattern!r}: method must be one of {', '.join(RULE_METHODS)} (AWQ folds "
                             "scales across linears: it is chosen for the whole job)")

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    def text(self) -> str:
        """The rule as ``--override`` / ``--ignore`` spell it (what the plan and the report print)."""
        return f"{self.pattern}:{SKIP if self.skip else ','.join(f'{k}={_show(v)}' for k, v in self.settings)}"

    def to_dict(self) -> dict:
        """The rule as a recipe's ``rules:`` entry."""
        return {"pattern": self.pattern, **({SKIP: True} if self.skip else dict(self.settings))}


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _value(key: str, text: str, where: str):
    """A setting's value from its text (``bits=8``, ``sym=false``)."""
    kind = SETTINGS.get(key)
    if kind is None:
        raise ValueError(f"{where}: unknown setting {key!r}; a rule sets {', '.join(SETTINGS)} or skip")
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{where}: {key} must be true or false, got {text!r:.40}")
        return text.lower() == "true"
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where}: {key} must be a whole number, got {text!r:.40}") from None
    return text


def parse_rule(text: str) -> Rule:
    """``PATTERN:skip`` or ``PATTERN:key=value,key=value`` (the last ``:`` separates them, so a pattern may hold
    colons). -> Rule; a ValueError quoting the text otherwise."""
    where = f"rule {text!r:.120}"
    pattern, sep, action = str(text).rpartition(":")
    if not sep or not pattern:
        raise ValueError(f"{where}: write PATTERN:skip or PATTERN:bits=8,group_size=64")
    if action.strip() == SKIP:
        return Rule(pattern, skip=True)
    settings = []
    for item in action.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{where}: {item!r:.40} is not key=value (or skip)")
        settings.append((key.strip(), _value(key.strip(), value.strip(), where)))
    return Rule(pattern, settings=tuple(settings))


def rule_from_mapping(entry, where: str) -> Rule:
    """A recipe's ``rules:`` entry: ``{pattern: ..., skip: true}`` or ``{pattern: ..., bits: 8, ...}``."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("pattern"), str):
        raise ValueError(f"{where}: each rule is a mapping with a pattern and skip: true or settings "
                         f"({', '.join(SETTINGS)}), got {entry!r:.80}")
    rest = {k: v for k, v in entry.items() if k != "pattern"}
    skip = rest.pop(SKIP, False)
    if not isinstance(skip, bool):
        raise ValueError(f"{where}: skip must be true or false, got {skip!r:.40}")
    try:
        return Rule(entry["pattern"], skip=skip, settings=tuple(rest.items()))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def config_with(base: QuantConfig, rule: Rule) -> QuantConfig:
    """The job's config with ``rule``'s settings: the spec fields replaced; GPTQ's mse, when at its default for the
    job's width, takes its default for the new width; a method switch keeps only what the new method takes. Raises what QuantConfig / QuantSpec raise for an impossible combination."""
    given = dict(rule.settings)
    spec = QuantSpec(given.get("bits", base.spec.bits), given.get("group_size", base.spec.group_size),
                     given.get("sym", base.spec.sym))
    method = given.get("method", base.method)
    if method != base.method:
        if base.method not in RULE_METHODS:
            raise ValueError(f"method {base.method} cannot be switched per module (its scales fold across linears)")
        return QuantConfig(method, spec) if method == "rtn" else dataclasses.replace(
            QuantConfig("gptq", spec), **{k: getattr(base, k) for k in ("block_size", "true_sequential")})
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(QuantConfig)}
    fields["spec"] = spec
    if base.mse == QuantConfig(base.method, base.spec).mse:  # at the job width's default: the new width's default
        fields["mse"] = None
    return QuantConfig(**fields)  # AWQ's rounding stays the job's: the layer's scale search decides it once


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """The job's config and its rules, each rule with the config it gives (None: skip). ``config_for(name)``: the
    first matching rule's, else the job's."""

    default: QuantConfig
    rules: tuple[tuple[Rule, QuantConfig | None], ...] = ()

    @classmethod
    def resolve(cls, rules: Sequence[Rule], default: QuantConfig, names: Iterable[str] | None = None,
                fused: Iterable[Sequence[str]] = ()) -> "ModulePlan":
        """Each rule's config, checked (errors name the rule). With ``names`` (every quantizable linear's runtime
        name): a rule that matches none of them is an error, and so is a group of ``fused`` linears (runtime
        names that serving stacks run as one layer) given different settings."""
        resolved = []
        for rule in rules:
            try:
                resolved.append((rule, None if rule.skip else config_with(default, rule)))
            except ValueError as e:
                raise ValueError(f"rule {rule.text()!r}: {e}") from None
        plan = cls(default, tuple(resolved))
        if names is not None:
            plan.check_matches(list(names))
        for group in fused:
            plan.check_fused(group)
        return plan

    @property
    def mixed(self) -> bool:
        return bool(self.rules)

    def rule_for(self, name: str) -> Rule | None:
        return next((rule for rule, _ in self.rules if rule.matches(name)), None)

    def config_for(self, name: str) -> QuantConfig | None:
        for rule, config in self.rules:
            if rule.matches(name):
                return config
        return self.default

    def check_matches(self, names: list[str]) -> None:
        for rule, _ in self.rules:
            if not any(rule.matches(n) for n in names):
                example = names[0] if names else "(the model has no quantizable linears)"
                raise ValueError(f"rule {rule.text()!r} matches no quantizable linear; patterns are searched in "
                                 f"runtime names such as {example}")

    def check_fused(self, group: Sequence[str]) -> None:
        """Linears a serving stack fuses into one layer (vLLM's qkv_proj, gate_up_proj) need one setting."""
        configs = {name: self.config_for(name) for name in group}
        if len({None if c is None else _key(c) for c in configs.values()}) > 1:
            # the names below the group's common module (q_proj; an MoE layer's 0.gate_proj, ...)
            parts = [n.split(".") for n in group]
            common = next((i for i in range(len(parts[0])) if len({tuple(p[: i + 1]) for p in parts}) > 1),
                          len(parts[0]) - 1)
            prefix, leaf = ".".join(parts[0][:common]), lambda n: ".".join(n.split(".")[common:])  # noqa: E731
            if len(group) <= 4:
                shown = ", ".join(f"{leaf(n)}: {describe(c)}" for n, c in configs.items())
            else:  # an MoE layer's experts: per setting, how many linears and the first of them
                by: dict[str, list[str]] = {}
                for n, c in configs.items():
                    by.setdefault(describe(c), []).append(leaf(n))
                shown = ", ".join(f"{len(ns)} linears {s} (first {ns[0]})" for s, ns in by.items())
            raise ValueError(f"{prefix}: {shown}; vLLM runs these linears as one fused layer, so they need one "
                             "setting: make the rule's pattern match all of them, or none")

    def to_dict(self) -> list[dict]:
        return [rule.to_dict() for rule, _ in self.rules]


def _key(c: QuantConfig) -> tuple:
    return (c.method, c.spec, c.desc_act, c.static_groups)


def describe(c: QuantConfig | None) -> str:
    """``W4g128 gptq`` / ``W8 per-channel rtn`` / ``skip`` (what plans and errors print)."""
    if c is None:
        return SKIP
    group = " per-channel" if c.spec.group_size == -1 else f"g{c.spec.group_size}"
    return f"W{c.spec.bits}{group}{'' if c.spec.sym else ' asym'} {c.method}"


def packed_bits(fmt, spec: QuantSpec, k: int, n: int) -> int:
    """Bits a [N, K] linear takes in layout ``fmt`` (a ``PackFormat``), codes, scales, zeros and indices counted."""
    return sum(8 * torch.tensor([], dtype=dt).element_size() * math.prod(shape)
               for shape, dt in fmt.tensor_shapes(k, n, spec).values())


def plan_rows(plan: ModulePlan, linears: Iterable[tuple[str, int, int]], fmt, storage_bits: int = 16) -> list[dict]:
    """What ``plan`` makes of ``linears`` ((runtime name, in_features, out_features)) in layout ``fmt``: one row per
    setting, in the order first met, with its linears, weights, bits per weight (scales and zeros included) and
    bytes; skipped linears at ``storage_bits`` per weight. The totals row is ``plan_total``."""
    rows: dict[str, dict] = {}
    for name, k, n in linears:
        cfg = plan.config_for(name)
        bits = n * k * storage_bits if cfg is None else packed_bits(fmt, cfg.spec, k, n)
        row = rows.setdefault(describe(cfg), {"setting": describe(cfg), "linears": 0, "weights": 0, "bits": 0})
        row["linears"] += 1
        row["weights"] += n * k
        row["bits"] += bits
    return [dict(r, bits_per_weight=round(r["bits"] / r["weights"], 4), bytes=r["bits"] // 8) for r in rows.values()]


def plan_total(rows: list[dict]) -> dict:
    weights, bits = sum(r["weights"] for r in rows), sum(r["bits"] for r in rows)
    return {"setting": "all", "linears": sum(r["linears"] for r in rows), "weights": weights, "bits": bits,
            "bits_per_weight": round(bits / max(1, weights), 4), "bytes": bits // 8}


def format_plan(rows: list[dict]) -> str:
    """The plan as ``quantize`` prints it."""
    lines = [f"{'setting':<22} {'linears':>7} {'weights':>14} {'bits/weight':>11} {'MiB':>10}"]
    for r in rows + [plan_total(rows)]:
        lines.append(f"{r['setting']:<22} {r['linears']:>7} {r['weights']:>14,} {r['bits_per_weight']:>11.3f} "
                     f"{r['bytes'] / 2**20:>10.1f}")
    return "\n".join(lines)
