"""Reading a checkpoint's config.json (``read_config``: inspect and repair) and its ``quantization_config``: ``read_quantization_config`` is the one reader (load, inspect,
the vLLM rules, the card and the eval all take its ``CheckpointQuant``); ``checkpoint.export`` is the one writer.

Defaults, decided once: a field left out means what the library that defines the format reads it as, so qvlquant
reads the same model transformers and vLLM read.

- GPTQ (transformers' ``GPTQConfig``): ``bits`` has no default there, so a GPTQ config without it is an error;
  ``group_size`` 128, ``sym`` true, ``desc_act`` false, ``checkpoint_format`` "gptq" (v1, the only layout read:
  "gptq_v2" stores its zero points without v1's offset of one).
- AWQ (transformers' ``AwqConfig``): ``bits`` 4, ``group_size`` 128, ``zero_point`` true, ``version`` "gemm" (the
  only layout read; it holds 4-bit codes only). AutoAWQ's own spellings ``w_bit`` / ``q_group_size`` are read where
  ``bits`` / ``group_size`` are absent.
- compressed-tensors (its ``QuantizationArgs``): one config group targets the class "Linear" (the default scheme),
  further groups target module names or ``re:`` regexes; every group ``format`` "pack-quantized" (on the group or
  the config), ``type`` "int"; ``num_bits`` 8, ``symmetric`` true, ``strategy`` inferred from ``group_size`` (a
  size: "group", -1: "channel"), ``actorder`` null.

Mixed precision (``CheckpointQuant.overrides``, resolved per module by ``CheckpointQuant.spec_for``): GPTQModel's
``dynamic`` (an ordered dict of ``re.match`` patterns, first match wins; ``-:`` leaves the module unquantized, ``+:``
or no prefix overrides ``bits`` / ``group_size`` / ``sym`` / ``desc_act``, each absent key the base value: vLLM's
``gptq_utils.get_dynamic_override``); compressed-tensors' name / regex targets, which win over the class target
"Linear" (``compressed_tensors.utils.match.match_targets`` and vLLM's ``find_matched_target``), and ``ignore``;
AWQ holds one width, so its only per-module setting is ``modules_to_not_convert``.

- FP8, Qwen's block format (vLLM's ``Fp8Config``): ``activation_scheme`` required (vLLM reads it without a
  default) and "dynamic"; ``fmt`` "e4m3"; ``weight_block_size`` [128, 128] (per-tensor FP8 is not read).
- compressed-tensors ``float-quantized``: FP8_DYNAMIC (8-bit float weights per channel, symmetric; 8-bit float
  input activations per token, dynamic) and FP8 (weights per tensor; input activations per tensor, static: a
  calibrated ``input_scale``), told apart by the weights' strategy.
- compressed-tensors ``int-quantized``: W8A8 with dynamic activations only (8-bit int weights per channel,
  symmetric; 8-bit int input activations per token, dynamic, symmetric).
- compressed-tensors ``nvfp4-pack-quantized``: NVFP4A16 (4-bit float weights, strategy ``tensor_group``, groups
  of 16, symmetric; no input activations) and NVFP4 W4A4 (input activations of the same grid, ``dynamic: local``:
  a calibrated ``input_global_scale``, group scales computed at run time).

A present field of the wrong type (``"bits": "4"``), an unknown method, a layout qvlquant has no ``PackFormat`` for,
or a width ``QuantSpec`` refuses is a ValueError naming the file and the field; never a KeyError.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

from qvlquant.quant.formats import Fp8Format, Int8Format, Nvfp4Format, PackFormat
from qvlquant.quant.fp8 import BLOCK as FP8_BLOCK
from qvlquant.quant.nvfp4 import GROUP as NVFP4_GROUP
from qvlquant.quant.spec import QuantSpec
from qvlquant.storage.files import read_text_bounded

REQUIRED = object()  # _get's default for a field the format's library has no default for
KINDS = {int: "a whole number", bool: "true or false", str: "a string", dict: "a JSON object"}


@dataclasses.dataclass(frozen=True)
class ModuleRule:
    """One per-module setting of a mixed checkpoint: the linears ``pattern`` matches take ``spec`` (None: they stay
    unquantized, a plain ``.weight`` in the checkpoint)."""

    pattern: str  # GPTQ dynamic: the regex without its "+:" / "-:"; compressed-tensors: a target ("re:..." or a name)
    spec: QuantSpec | None
    act_order: bool = False  # GPTQ desc_act, compressed-tensors actorder "group", of the matched linears

    def describe(self) -> str:
        """"skipped" or "W8 g128 sym" (act-order appended): how ``inspect`` and ``summary`` name the setting."""
        return "skipped" if self.spec is None else describe_spec(self.spec, self.act_order)


def describe_spec(spec: QuantSpec | None, act_order: bool = False) -> str:
    if spec is None:
        return "not quantized"
    group = "per-channel" if spec.group_size == -1 else f"g{spec.group_size}"
    return f"W{spec.bits} {group} {'sym' if spec.sym else 'asym'}" + (" act-order" if act_order else "")


@dataclasses.dataclass(frozen=True)
class CheckpointQuant:
    """What a checkpoint's ``quantization_config`` says, read once by ``read_quantization_config``."""

    method: str  # quant_method: "gptq", "awq", "compressed-tensors" or "fp8"
    # the layout of the packed tensors on disk (Fp8Format: FP8 e4m3 weights; Int8Format: INT8 W8A8 weights;
    # Nvfp4Format: e2m1 codes, e4m3 scales)
    pack_format: PackFormat | Fp8Format | Int8Format | Nvfp4Format
    spec: QuantSpec  # the base setting: bits; group_size (-1: per channel); sym (AWQ: not zero_point)
    act_order: bool  # the groups are permuted at load time (GPTQ desc_act, compressed-tensors actorder "group")
    checkpoint_format: str  # GPTQ checkpoint_format "gptq", AWQ version "gemm", compressed-tensors "pack-quantized"
    not_converted: tuple[str, ...] = ()  # GPTQ / AWQ modules_to_not_convert (each client matches them its own way)
    in_block: tuple[str, ...] = ()  # GPTQ modules_in_block_to_quantize, flattened; empty: every linear of a block
    ignore: tuple[str, ...] = ()  # compressed-tensors ignore (exact names, or regexes after "re:")
    # GPTQ dynamic in its order; compressed-tensors name / regex targets of the config groups in theirs
    overrides: tuple[ModuleRule, ...] = ()
    where: str = dataclasses.field(default="quantization_config", compare=False)  # for errors: file and field

    @property
    def mixed(self) -> bool:
        return bool(self.overrides)

    def summary(self) -> dict:
        """The settings the eval table and ``inspect`` show, spelled the same for every format; a mixed checkpoint
        adds ``mixed``: its per-module rules, named (the base settings are those of every other linear)."""
        out = {"quant_method": self.method, "bits": self.spec.bits, "group_size": self.spec.group_size,
               "sym": self.spec.sym}
        if isinstance(self.pack_format, Fp8Format):
            out["weights"] = "fp8_e4m3"
        if isinstance(self.pack_format, Int8Format):
            out["weights"] = "int8_w8a8"
        if isinstance(self.pack_format, Nvfp4Format):
            out["weights"] = "nvfp4_e2m1"
        if self.pack_format in (Fp8Format.TENSOR, Nvfp4Format.W4A4):  # the calibrated schemes' static scales
            out["activations"] = "fp8_e4m3 static per tensor" if self.pack_format is Fp8Format.TENSOR \
                else "nvfp4_e2m1 per 16, calibrated global scale"
        if self.mixed:
            settings = [r.describe() for r in self.overrides]
            out["mixed"] = ", ".join(f"{settings.count(s)} rule(s) {s}" for s in dict.fromkeys(settings))
        return out

    def spec_for(self, name: str) -> QuantSpec | None:
        """The setting of the linear ``name`` (transformers' runtime module name, e.g.
        ``model.language_model.layers.3.self_attn.q_proj``); None: the checkpoint leaves it unquantized. Resolved
        as the format's clients do: compressed-tensors ``ignore``, then name / regex targets before "Linear";
        GPTQ / AWQ ``modules_to_not_convert`` (transformers' matcher), GPTQ ``modules_in_block_to_quantize`` (a
        substring, as vLLM reads it), then the first ``dynamic`` pattern that ``re.match``es."""
        if self.method == "compressed-tensors":
            return self._compressed_spec_for(name)
        if any(transformers_skips(name, p) for p in self.not_converted):
            return None
        if self.in_block and not any(entry in name for entry in self.in_block):
            return None
        rule = next((r for r in self.overrides if re.match(r.pattern, name)), None)
        return self.spec if rule is None else rule.spec

    def _compressed_spec_for(self, name: str) -> QuantSpec | None:
        if any(target_matches(name, entry) for entry in self.ignore):
            return None
        matched = [r for r in self.overrides if target_matches(name, r.pattern)]
        if len({(r.spec, r.act_order) for r in matched}) > 1:  # vLLM takes the first in config order,
            # compressed-tensors exact names first, then regexes alphabetically: they can disagree
            raise ValueError(f"{self.where}.config_groups: {name} is matched by targets of different settings "
                             f"({', '.join(f'{r.pattern} ({r.describe()})' for r in matched)}); compressed-tensors "
                             "and vLLM may pick different ones: give each linear one target")
        return matched[0].spec if matched else self.spec


def transformers_skips(name: str, pattern: str) -> bool:
    """transformers 5's reading of one ``modules_to_not_convert`` entry (``quantizers_utils.should_convert_module``):
    the pattern, as a regex, matches ``name`` from its start up to a module boundary, or ``name`` ends with it."""
    try:
        anchored = re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", name) is not None
    except re.error:  # not a regex: only the suffix reading is left
        anchored = False
    return anchored or name.endswith(pattern)


def target_matches(name: str, target: str) -> bool:
    """compressed-tensors' and vLLM's reading of a target or ``ignore`` entry as a module name: ``re:`` + a regex
    ``re.match``ed, else the exact name."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def read_quantization_config(qc: dict | None, where: str) -> CheckpointQuant | None:
    """The ``quantization_config`` of a config.json (``where`` names the file in errors); None when there is none
    (a full-precision checkpoint). Raises ValueError for a malformed or unsupported one (module docstring)."""
    if not qc:
        return None
    path = f"{where}: quantization_config"
    if not isinstance(qc, dict):
        raise ValueError(f"{path} must be a JSON object, got {qc!r}")
    method = qc.get("quant_method")
    readers = {"gptq": _read_gptq, "awq": _read_awq, "compressed-tensors": _read_compressed, "fp8": read_fp8_block}
    read = readers.get(method) if isinstance(method, str) else None
    if read is None:
        raise ValueError(f"{path}.quant_method {method!r} is not supported; qvlquant reads 'gptq', 'awq', "
                         "'compressed-tensors' and 'fp8'")
    return read(qc, path)


def _read_gptq(qc: dict, path: str) -> CheckpointQuant:
    layout = _get(qc, ("checkpoint_format", "format"), str, "gptq", path).lower()
    if layout != "gptq":
        raise ValueError(f"{path}.checkpoint_format {layout!r} is not supported; qvlquant reads GPTQ v1 ('gptq')")
    spec = _spec(path, _get(qc, "bits", int, REQUIRED, path), _get(qc, "group_size", int, 128, path),
                 _get(qc, "sym", bool, True, path))
    act_order = _get(qc, "desc_act", bool, False, path)
    return CheckpointQuant("gptq", PackFormat.GPTQ, spec, act_order, layout,
                           not_converted=_names(qc, "modules_to_not_convert", path),
                           in_block=_names(qc, "modules_in_block_to_quantize", path),
                           overrides=_gptq_dynamic(qc, spec, act_order, path), where=path)


def _gptq_dynamic(qc: dict, base: QuantSpec, act_order: bool, path: str) -> tuple[ModuleRule, ...]:
    """GPTQModel's ``dynamic``, in its order: "-:" + regex -> unquantized; "+:" + regex (or a bare regex) -> the
    base settings with the keys it gives replaced."""
    rules = []
    for key, fields in _get(qc, "dynamic", dict, {}, path).items():
        where = f"{path}.dynamic[{key!r}]"
        skip = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{where}: not a regular expression ({e})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{where} must be a JSON object of settings, got {fields!r:.80}")
        if skip:
            rules.append(ModuleRule(pattern, None))
            continue
        spec = _spec(where, _get(fields, "bits", int, base.bits, where),
                     _get(fields, "group_size", int, base.group_size, where), _get(fields, "sym", bool, base.sym, where))
        rules.append(ModuleRule(pattern, spec, _get(fields, "desc_act", bool, act_order, where)))
    return tuple(rules)


def _read_awq(qc: dict, path: str) -> CheckpointQuant:
    layout = _get(qc, ("version", "format"), str, "gemm", path).lower()
    if layout != "gemm":
        raise ValueError(f"{path}.version {layout!r} is not supported; qvlquant reads the AWQ GEMM layout ('gemm')")
    bits = _get(qc, ("bits", "w_bit"), int, 4, path)
    if bits != 4:
        raise ValueError(f"{path}.bits is {bits}: the AWQ GEMM layout holds 4-bit codes only")
    zero_point = _get(qc, "zero_point", bool, True, path)
    spec = _spec(path, bits, _get(qc, ("group_size", "q_group_size"), int, 128, path), not zero_point)
    return CheckpointQuant("awq", PackFormat.AWQ_GEMM, spec, False, layout,
                           not_converted=_names(qc, "modules_to_not_convert", path))


def _read_compressed(qc: dict, path: str) -> CheckpointQuant:
    groups = _get(qc, "config_groups", dict, {}, path)
    if not groups:
        raise ValueError(f"{path}.config_groups holds 0 groups; qvlquant reads one that targets 'Linear' (the "
                         "default scheme), and further groups targeting module names or re: regexes")
    fp8 = [(n, g) for n, g in groups.items() if isinstance(g, dict)
           and (_get(g, "format", str, None, f"{path}.config_groups.{n}") or qc.get("format")) == "float-quantized"]
    if fp8:  # FP8 (llm-compressor's FP8_DYNAMIC): one scheme for every Linear
        if len(groups) != 1:
            raise ValueError(f"{path}.config_groups holds {len(groups)} groups with float-quantized among them; "
                             "qvlquant reads float-quantized as one group for every Linear")
        return read_float_quantized(qc, fp8[0][1], f"{path}.config_groups.{fp8[0][0]}", path)
    int8 = [(n, g) for n, g in groups.items() if isinstance(g, dict)
            and (_get(g, "format", str, None, f"{path}.config_groups.{n}") or qc.get("format")) == "int-quantized"]
    if int8:  # INT8 W8A8 (llm-compressor's W8A8): one scheme for every Linear
        if len(groups) != 1:
            raise ValueError(f"{path}.config_groups holds {len(groups)} groups with int-quantized among them; "
                             "qvlquant reads int-quantized as one group for every Linear")
        return read_int_quantized(qc, int8[0][1], f"{path}.config_groups.{int8[0][0]}", path)
    fp4 = [(n, g) for n, g in groups.items() if isinstance(g, dict)
           and (_get(g, "format", str, None, f"{path}.config_groups.{n}") or qc.get("format")) == "nvfp4-pack-quantized"]
    if fp4:  # NVFP4A16: one scheme for every Linear
        if len(groups) != 1:
            raise ValueError(f"{path}.config_groups holds {len(groups)} groups with nvfp4-pack-quantized among them; "
                             "qvlquant reads nvfp4-pack-quantized as one group for every Linear")
        return read_nvfp4(qc, fp4[0][1], f"{path}.config_groups.{fp4[0][0]}", path)
    base, rules, layout = None, [], None
    for name, group in groups.items():
        gpath = f"{path}.config_groups.{name}"
        spec, act_order, layout = _compressed_group(qc, group, gpath, path)
        # a group without targets (compressed-tensors requires them) is read as the default one, as it was when
        # qvlquant read a single group
        targets = _names(group, "targets", gpath) if group.get("targets") is not None else ("Linear",)
        if "Linear" in targets:
            if base is not None:
                raise ValueError(f"{gpath}.targets: 'Linear' is targeted by {base[2]} already; one group sets the "
                                 "default scheme")
            base = (spec, act_order, name)
        for target in (t for t in targets if t != "Linear"):
            if target.startswith("re:"):
                _regex(target[3:], f"{gpath}.targets")
            rules.append(ModuleRule(target, spec, act_order))
    if base is None:
        raise ValueError(f"{path}.config_groups: no group targets 'Linear'; qvlquant reads a default scheme for every "
                         "Linear, with name / regex groups beside it")
    ignore = _names(qc, "ignore", path)
    for entry in (e for e in ignore if e.startswith("re:")):
        _regex(entry[3:], f"{path}.ignore")
    return CheckpointQuant("compressed-tensors", PackFormat.COMPRESSED, base[0], base[1], layout, ignore=ignore,
                           overrides=tuple(rules), where=path)


def _compressed_group(qc: dict, group, gpath: str, path: str) -> tuple[QuantSpec, bool, str]:
    """One config group -> (its weights' spec, whether its groups are permuted at load time, its format)."""
    if not isinstance(group, dict):
        raise ValueError(f"{gpath} must be a JSON object, got {group!r}")
    layout = _get(group, "format", str, None, gpath) or _get(qc, "format", str, "dense", path)
    if layout != "pack-quantized":
        where = f"{gpath}.format" if group.get("format") is not None else f"{path}.format"
        raise ValueError(f"{where} {layout!r} is not supported; qvlquant reads 'pack-quantized' (integer weights "
                         "packed in int32)")
    weights = _get(group, "weights", dict, REQUIRED, gpath)
    wpath = f"{gpath}.weights"
    if _get(weights, "type", str, "int", wpath) != "int":
        raise ValueError(f"{wpath}.type {weights['type']!r} is not supported; qvlquant reads integer weights ('int')")
    actorder = weights.get("actorder")
    if not (actorder is None or isinstance(actorder, (bool, str))):
        raise ValueError(f"{wpath}.actorder must be null, a string or true/false, got {actorder!r}")
    spec = _spec(wpath, _get(weights, "num_bits", int, 8, wpath), _ct_group_size(weights, wpath),
                 _get(weights, "symmetric", bool, True, wpath))
    return spec, actorder is True or actorder in ("group", "dynamic"), layout


def _regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {pattern!r} is not a regular expression ({e})") from None


def read_fp8_block(qc: dict, path: str) -> CheckpointQuant:
    """Qwen's FP8 (``quant_method: fp8``, vLLM's ``Fp8Config``): e4m3 weights in 128x128 blocks, dynamic
    activations. vLLM requires ``activation_scheme``; ``fmt`` defaults to e4m3 as in transformers'
    ``FineGrainedFP8Config``. Per-tensor FP8 (no ``weight_block_size``) and static activations are refused, naming
    the field."""
    if _get(qc, "fmt", str, "e4m3", path) != "e4m3":
        raise ValueError(f"{path}.fmt {qc['fmt']!r} is not supported; qvlquant reads 'e4m3'")
    scheme = _get(qc, "activation_scheme", str, REQUIRED, path)
    if scheme != "dynamic":
        raise ValueError(f"{path}.activation_scheme {scheme!r} is not supported; qvlquant reads 'dynamic'")
    block = qc.get("weight_block_size")
    if block != list(FP8_BLOCK):
        raise ValueError(f"{path}.weight_block_size {block!r} is not supported; qvlquant reads "
                         f"{list(FP8_BLOCK)} (Qwen's block FP8)")
    return CheckpointQuant("fp8", Fp8Format.BLOCK, QuantSpec(8, FP8_BLOCK[1], True), False, "e4m3",
                           not_converted=_names(qc, "modules_to_not_convert", path))


# float-quantized as qvlquant reads it: per weight strategy, the preset, its fields and the layout it is
FLOAT_QUANTIZED = {
    "channel": ("FP8_DYNAMIC", Fp8Format.CHANNEL, {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True},
                {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}),
    "tensor": ("FP8", Fp8Format.TENSOR, {"type": "float", "num_bits": 8, "strategy": "tensor", "symmetric": True},
               {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False, "symmetric": True}),
}


def read_float_quantized(qc: dict, group: dict, gpath: str, path: str) -> CheckpointQuant:
    """compressed-tensors ``float-quantized`` as FP8_DYNAMIC writes it (8-bit float weights per channel, symmetric;
    8-bit float input activations per token, dynamic) or as the FP8 preset does (weights per tensor; input
    activations per tensor, static: a calibrated ``input_scale``), told apart by the weights' strategy. Anything
    else (per-channel weights with static activations, weight-only) is refused, naming the field."""
    wpath, apath = f"{gpath}.weights", f"{gpath}.input_activations"
    weights = _get(group, "weights", dict, REQUIRED, gpath)
    acts = _get(group, "input_activations", dict, None, gpath)
    if acts is None:
        raise ValueError(f"{apath} is missing; qvlquant reads FP8 with dynamic per-token activations (FP8_DYNAMIC) "
                         "or static per-tensor ones (FP8)")
    strategy = _get(weights, "strategy", str, None, wpath)
    if strategy not in FLOAT_QUANTIZED:
        raise ValueError(f"{wpath}.strategy is {strategy!r}; qvlquant reads float-quantized FP8_DYNAMIC (strategy "
                         "'channel') and FP8 (strategy 'tensor')")
    scheme, fmt, wfields, afields = FLOAT_QUANTIZED[strategy]
    defaults = {"symmetric": True, "dynamic": False}  # compressed-tensors' QuantizationArgs defaults
    for d, where, fields in ((weights, wpath, wfields), (acts, apath, afields)):
        for key, value in fields.items():
            got = _get(d, key, type(value), defaults.get(key) if d is acts else None, where)
            if got != value:
                raise ValueError(f"{where}.{key} is {got!r}; qvlquant reads float-quantized {scheme} "
                                 f"({key} {value!r})")
    return CheckpointQuant("compressed-tensors", fmt, QuantSpec(8, -1, True), False,
                           "float-quantized", ignore=_names(qc, "ignore", path))


def read_int_quantized(qc: dict, group: dict, gpath: str, path: str) -> CheckpointQuant:
    """compressed-tensors ``int-quantized`` as llm-compressor's W8A8 writes it: 8-bit int weights per channel,
    symmetric; 8-bit int input activations per token, dynamic, symmetric. Anything else (static or asymmetric
    activations, per-tensor weights, weight-only) is refused, naming the field."""
    wpath, apath = f"{gpath}.weights", f"{gpath}.input_activations"
    weights = _get(group, "weights", dict, REQUIRED, gpath)
    acts = _get(group, "input_activations", dict, None, gpath)
    if acts is None:
        raise ValueError(f"{apath} is missing; qvlquant reads int-quantized W8A8 with dynamic per-token activations")
    expected = ((weights, wpath, {"type": "int", "num_bits": 8, "strategy": "channel", "symmetric": True}),
                (acts, apath, {"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}))
    defaults = {"symmetric": True, "dynamic": False}  # compressed-tensors' QuantizationArgs defaults
    for d, where, fields in expected:
        for key, value in fields.items():
            got = _get(d, key, type(value), defaults.get(key), where)
            if got != value:
                raise ValueError(f"{where}.{key} is {got!r}; qvlquant reads int-quantized W8A8 ({key} {value!r})")
    return CheckpointQuant("compressed-tensors", Int8Format.CHANNEL, QuantSpec(8, -1, True), False,
                           "int-quantized", ignore=_names(qc, "ignore", path))


NVFP4_FIELDS = {"type": "float", "num_bits": 4, "strategy": "tensor_group", "group_size": NVFP4_GROUP, "symmetric": True}


def read_nvfp4(qc: dict, group: dict, gpath: str, path: str) -> CheckpointQuant:
    """compressed-tensors ``nvfp4-pack-quantized`` as NVFP4A16 writes it (4-bit float weights, ``tensor_group`` in
    groups of 16, symmetric, no input activations) or as the NVFP4 preset does (W4A4: input activations of the same
    grid, ``dynamic: local``, whose calibrated global scale is ``input_global_scale``). Anything else (fully dynamic
    or static activation group scales, other groups) is refused, naming the field."""
    wpath, apath = f"{gpath}.weights", f"{gpath}.input_activations"
    weights = _get(group, "weights", dict, REQUIRED, gpath)
    acts = _get(group, "input_activations", dict, None, gpath)
    scheme = "NVFP4A16" if acts is None else "NVFP4"
    checks = [(weights, wpath, NVFP4_FIELDS)] + ([] if acts is None else [(acts, apath, NVFP4_FIELDS)])
    for d, where, fields in checks:
        for key, value in fields.items():
            got = _get(d, key, type(value), True if key == "symmetric" else None, where)
            if got != value:
                raise ValueError(f"{where}.{key} is {got!r}; qvlquant reads nvfp4-pack-quantized {scheme} "
                                 f"({key} {value!r})")
    if acts is not None and acts.get("dynamic") != "local":
        raise ValueError(f"{apath}.dynamic is {acts.get('dynamic')!r}; qvlquant reads nvfp4-pack-quantized NVFP4 "
                         "(W4A4) with dynamic 'local': a calibrated input_global_scale, group scales at run time")
    fmt = Nvfp4Format.PACKED if acts is None else Nvfp4Format.W4A4
    return CheckpointQuant("compressed-tensors", fmt, QuantSpec(4, NVFP4_GROUP, True), False,
                           "nvfp4-pack-quantized", ignore=_names(qc, "ignore", path), where=path)


def _ct_group_size(weights: dict, wpath: str) -> int:
    """compressed-tensors' group size as QuantSpec's: -1 for strategy "channel"; the strategy inferred from the
    group size when absent, as ``QuantizationArgs`` does."""
    size = _get(weights, "group_size", int, None, wpath)
    inferred = "tensor" if size is None else "channel" if size == -1 else "group"
    strategy = _get(weights, "strategy", str, inferred, wpath)
    if strategy == "channel":
        return -1
    if strategy != "group":
        raise ValueError(f"{wpath}.strategy {strategy!r} is not supported; qvlquant reads 'group' and 'channel'")
    if size is None:
        raise ValueError(f"{wpath}.group_size is missing; strategy 'group' needs it")
    return size


def _spec(path: str, bits: int, group_size: int, sym: bool) -> QuantSpec:
    try:
        return QuantSpec(bits, group_size, sym)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _get(d: dict, keys: str | tuple[str, ...], kind: type, default, path: str):
    """``d``'s value under the first of ``keys`` it holds (a null counts as absent), checked to be a ``kind``;
    ``default`` when none is there (an error naming the field when that is REQUIRED)."""
    keys = (keys,) if isinstance(keys, str) else keys
    key = next((k for k in keys if d.get(k) is not None), None)
    if key is None:
        if default is REQUIRED:
            raise ValueError(f"{path}.{keys[0]} is missing")
        return default
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{path}.{key} must be {KINDS[kind]}, got {value!r}")
    return value


def _names(d: dict, key: str, path: str) -> tuple[str, ...]:
    """A list of module names (a list of lists flattened, as GPTQ's modules_in_block_to_quantize is); () if absent."""
    value = d.get(key) or []
    flat = [n for e in value for n in (e if isinstance(e, list) else [e])] if isinstance(value, list) else None
    if flat is None or not all(isinstance(n, str) for n in flat):
        raise ValueError(f"{path}.{key} must be a list of module names, got {value!r}")
    return tuple(flat)


MAX_CONFIG_BYTES = 16 * 2**20
HEADS = ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim")  # text_config sizes vLLM's rules read


def read_config(folder: str | pathlib.Path) -> dict:
    """config.json of the checkpoint in ``folder``, checked for what inspect and repair read: a JSON object;
    model_type a string; text_config an object whose head counts are whole numbers; quantization_config absent or
    an object with bits, group_size, flags, names and module lists of their types. -> the config."""
    path = pathlib.Path(folder) / "config.json"
    try:
        config = json.loads(read_text_bounded(path, MAX_CONFIG_BYTES, "config"))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not JSON ({str(e)[:200]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise ValueError(f"{path}: model_type must be a string, got {config['model_type']!r:.80}")
    text = config.get("text_config") or config
    if not isinstance(text, dict):
        raise ValueError(f"{path}: text_config must be an object, got {text!r:.80}")
    prefix = "text_config." if text is not config else ""
    for name in HEADS:
        _whole(text.get(name), f"{path}: {prefix}{name}")
    if "num_attention_heads" in text and "num_key_value_heads" not in text:
        raise ValueError(f"{path}: {prefix}num_key_value_heads is missing beside num_attention_heads")
    read_quantization_config(config.get("quantization_config"), str(path))  # its fields, each of its type
    return config


def _whole(value, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{what} must be a whole number of at least 1, got {value!r:.80}")
