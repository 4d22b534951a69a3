"""Recipes: YAML files of quantize settings plus an optional ``check:`` section with the CI gate's tolerances.

A recipe's keys are the quantize settings' names, i.e. the quantize flags' names with underscores (``group_size``
for ``--group-size``); ``recipes/*.yaml`` are examples. What a recipe may hold is declared here (SETTINGS: type and
choices of each key), not read from a command-line parser. Every error names the file and the key. A recipe is a
regular file of at most 1 MiB (storage.files), in YAML without anchors or aliases (RecipeLoader).

    recipe = load_recipe("recipes/demo-gptq-int4.yaml")
    recipe.settings     # {"model": "demo", "method": "gptq", "bits": 4, ...}
    recipe.tolerances   # Tolerances(max_drop={"easyvqa": 1.0}, max_ppl_increase=2.0)
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping

import yaml

from qvlquant.config import MEASURES, JobConfig
from qvlquant.eval.check import (
    DEFAULT_MAX_PPL_INCREASE,
    Tolerances,
    known_task,
    tolerance,
)
from qvlquant.quant.formats import EXPORT_FORMATS, SCHEMES
from qvlquant.quant.rules import rule_from_mapping
from qvlquant.quant.spec import AWQ_ROUNDING, METHODS, RARE_EXPERTS
from qvlquant.storage.files import read_text_bounded

MAX_RECIPE_BYTES = 1 << 20  # the published recipes are under 1 KB
MAX_ERROR_CHARS = 300  # of a YAML parser's message quoted in an error


@dataclasses.dataclass(frozen=True)
class Setting:
    """A recipe key: a value of ``type`` (bool, int, float or str), one of ``choices`` when given, null only when
    ``nullable``."""

    type: type
    choices: tuple = ()
    nullable: bool = False


SETTINGS: dict[str, Setting] = {
    "model": Setting(str),
    "method": Setting(str, METHODS),
    "bits": Setting(int, (2, 3, 4, 8)),
    "group_size": Setting(int),
    "sym": Setting(bool),
    "damp_percent": Setting(float),
    "desc_act": Setting(bool),
    "static_groups": Setting(bool),
    "true_sequential": Setting(bool),
    "mse": Setting(float),
    "vision_weight": Setting(float),
    "min_expert_tokens": Setting(int),
    "rare_experts": Setting(str, RARE_EXPERTS),
    "awq_rounding": Setting(str, AWQ_ROUNDING),
    "calib": Setting(str),
    "num_samples": Setting(int),
    "split": Setting(str),
    "image_column": Setting(str),
    "question_column": Setting(str),
    "answer_column": Setting(str),
    "text_column": Setting(str, nullable=True),
    "batch_size": Setting(int),
    "max_length": Setting(int),
    "min_pixels": Setting(int),
    "max_pixels": Setting(int),
    "allow_urls": Setting(bool),
    "seed": Setting(int),
    "dtype": Setting(str, ("bfloat16", "float16", "float32")),
    "pad_intermediate_to": Setting(int, nullable=True),
    "trust_remote_code": Setting(bool),
    "export_format": Setting(str, EXPORT_FORMATS),
    "resume": Setting(bool),
    "output": Setting(str),
    "device": Setting(str, nullable=True),
    "offload": Setting(str, ("auto", "cpu", "device")),
    "rules": Setting(list),  # per-module rules: [{pattern: REGEX, skip: true} or {pattern: REGEX, bits: 8, ...}]
    "scheme": Setting(str, tuple(SCHEMES)),
    "smoothing_strength": Setting(str, nullable=True),  # --scheme W8A8 / NVFP4: "0.8" (quoted), "auto" (W8A8) or "off"
    "target_bits": Setting(float, nullable=True),  # the sensitivity search (config.SearchConfig)
    "candidate_bits": Setting(str),  # "3,4,8,16"
    "sensitivity": Setting(str, MEASURES),
}
# Quantize flags a recipe may not set: the recipe itself, replacing an existing folder (asked for on the command line
# each time, never by a file), a limit for measuring, and the machine's thread count.
COMMAND_LINE_ONLY = frozenset({"recipe", "overwrite", "max_layers", "threads", "nproc"})
CHECK_KEYS = ("max_drop", "max_ppl_increase")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A loaded recipe: ``settings`` (key -> validated value) and the check gate's ``tolerances`` (the defaults
    when the recipe has no check: section)."""

    path: str
    settings: Mapping
    tolerances: Tolerances


def setting_value(key: str, value, source: str):
    """``value`` of recipe key ``key`` checked against SETTINGS (ints are accepted for floats); errors name
    ``source``."""
    if key not in SETTINGS:
        raise ValueError(f"recipe {source}: unknown key(s) {[key]}; known: {', '.join(sorted(SETTINGS))}")
    spec = SETTINGS[key]
    if value is None and spec.nullable:
        return None
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != (spec.type is bool) or not isinstance(value, spec.type):  # YAML true is no int
        expected = "true or false" if spec.type is bool else spec.type.__name__
        raise ValueError(f"recipe {source}: {key} must be {expected}, got {value!r:.80}")
    if spec.type is float and not math.isfinite(value):
        raise ValueError(f"recipe {source}: {key} must be a finite number, got {value!r:.80}")
    if spec.choices and value not in spec.choices:
        raise ValueError(f"recipe {source}: {key} must be one of {list(spec.choices)}, got {value!r:.80}")
    if key == "rules":
        return [rule_from_mapping(entry, f"recipe {source}: rules[{i}]") for i, entry in enumerate(value)]
    return value


def check_section(section, source: str) -> Tolerances:
    """The tolerances of a recipe's ``check:`` section (max_drop: {task: points}, max_ppl_increase: percent)."""
    if section is None:
        return Tolerances()
    if not isinstance(section, Mapping):
        raise ValueError(f"recipe {source}: check must be a mapping with {' and/or '.join(CHECK_KEYS)}, got {section!r:.80}")
    unknown = sorted(set(section) - set(CHECK_KEYS))
    if unknown:
        raise ValueError(f"recipe {source}: unknown check key(s) {unknown}; known: {', '.join(CHECK_KEYS)}")
    drops = section.get("max_drop") or {}
    if not isinstance(drops, Mapping):
        raise ValueError(f"recipe {source}: check.max_drop must map task -> points, got {drops!r:.80}")
    max_drop = {known_task(task, f"recipe {source}: check.max_drop"): tolerance(points, f"recipe {source}: check.max_drop.{task!s:.80}")
                for task, points in drops.items()}
    ppl = tolerance(section.get("max_ppl_increase", DEFAULT_MAX_PPL_INCREASE), f"recipe {source}: check.max_ppl_increase")
    return Tolerances(max_drop, ppl)


def parse_recipe(data, source: str) -> Recipe:
    """A recipe from its parsed YAML ``data``; ``source`` (the file) is named in every error."""
    if not isinstance(data, Mapping):
        raise ValueError(f"recipe {source}: expected a mapping of settings, got {type(data).__name__}")
    unknown = sorted(str(k)[:80] for k in set(data) - set(SETTINGS) - {"check"})
    if unknown:
        raise ValueError(f"recipe {source}: unknown key(s) {unknown[:20]}; known: {', '.join(sorted(SETTINGS))}")
    settings = {k: setting_value(k, v, source) for k, v in data.items() if k != "check"}
    return Recipe(str(source), settings, check_section(data.get("check"), source))


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe subset without anchors and aliases: a recipe needs neither, and aliases of aliases (a "billion
    laughs") build a value whose printing in an error takes gigabytes."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not allowed in a "
                                              "recipe; write the value out", event.start_mark)
        return super().compose_node(parent, index)


def load_recipe(path: str | pathlib.Path) -> Recipe:
    """Read (a regular file of at most MAX_RECIPE_BYTES) and validate the recipe YAML at ``path``."""
    text = read_text_bounded(path, MAX_RECIPE_BYTES, "recipe")
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # RecipeLoader is a SafeLoader
    except (yaml.YAMLError, RecursionError) as e:
        reason = " ".join(str(e).split()) if isinstance(e, yaml.YAMLError) else "nested too deeply"
        raise ValueError(f"cannot read recipe {path}: {reason[:MAX_ERROR_CHARS]}") from None
    return parse_recipe(data, str(path))


def check_tolerances(recipe: str | pathlib.Path | None = None, max_drop: Mapping[str, float] | None = None,
                     max_ppl_increase: float | None = None) -> Tolerances:
    """The gate's tolerances: the recipe's check: section (defaults without a recipe), ``max_drop`` and
    ``max_ppl_increase`` overriding it."""
    base = load_recipe(recipe).tolerances if recipe is not None else Tolerances()
    return base.override(max_drop, max_ppl_increase)


# What a written recipe holds of a job: the settings that decide the exported tensors (never where the output goes,
# whether it resumes, or the machine: device, offload, threads), each only where it is not the default.
_QUANT_RECIPE_KEYS = ("damp_percent", "desc_act", "static_groups", "true_sequential", "mse", "vision_weight",
                      "min_expert_tokens", "rare_experts", "awq_rounding")
_CALIB_RECIPE_KEYS = ("max_length", "min_pixels", "max_pixels", "batch_size", "allow_urls")


def job_recipe(config: JobConfig) -> dict:
    """``config`` as recipe settings (SETTINGS keys): the model, method, grid, calibration draw, format and rules
    always; every other setting where it differs from its default. ``JobConfig.from_flat(**job_recipe(c),
    output=...)`` builds ``c`` again (the sensitivity search's recipe is read back that way)."""
    q, spec = config.quant, config.quant.spec
    plain = type(q)(q.method, spec)
    out = {"model": str(config.model), "method": q.method, "bits": spec.bits, "group_size": spec.group_size,
           "sym": spec.sym}
    out |= {k: getattr(q, k) for k in _QUANT_RECIPE_KEYS if getattr(q, k) != getattr(plain, k)}
    calib = config.calib
    out |= {"calib": calib.source, "num_samples": calib.num_samples, "seed": calib.seed}
    if calib.split != type(calib)().split:
        out["split"] = calib.split
    out |= {f"{k}_column": v for k, v in calib.columns if (k, v) not in type(calib)().columns}
    default = type(config.processing)()
    out |= {k: getattr(config.processing, k) for k in _CALIB_RECIPE_KEYS
            if getattr(config.processing, k) != getattr(default, k)}
    if config.device.dtype is not None:
        out["dtype"] = config.device.dtype
    if config.pad_intermediate_to is not None:
        out["pad_intermediate_to"] = config.pad_intermediate_to
    if config.trust_remote_code:
        out["trust_remote_code"] = True
    out["export_format"] = config.export.format
    if config.search.active:
        out |= {"target_bits": config.search.target_bits,
                "candidate_bits": ",".join(map(str, config.search.candidate_bits)),
                "sensitivity": config.search.measure}
    out["rules"] = [rule.to_dict() for rule in config.rules]
    return out


def dump_recipe(settings: Mapping, comment: str = "") -> str:
    """Recipe YAML of ``settings`` (``job_recipe``), in their order, after ``comment`` (each line made a comment)."""
    head = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    return head + yaml.safe_dump(dict(settings), sort_keys=False, allow_unicode=True, width=1000)
