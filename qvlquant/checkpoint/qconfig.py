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
- compressed-tensors (its ``QuantizationArgs``): exactly one config group, ``format`` "pack-quantized" (on the group
  or the config), ``type`` "int"; ``num_bits`` 8, ``symmetric`` true, ``strategy`` inferred from ``group_size``
  (a size: "group", -1: "channel"), ``actorder`` null.

- FP8, Qwen's block format (vLLM's ``Fp8Config``): ``activation_scheme`` required (vLLM reads it without a
  default) and "dynamic"; ``fmt`` "e4m3"; ``weight_block_size`` [128, 128] (per-tensor FP8 is not read).
- compressed-tensors ``float-quantized``: FP8_DYNAMIC only (8-bit float weights per channel, symmetric; 8-bit float
  input activations per token, dynamic).

A present field of the wrong type (``"bits": "4"``), an unknown method, a layout qvlquant has no ``PackFormat`` for,
or a width ``QuantSpec`` refuses is a ValueError naming the file and the field; never a KeyError.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from qvlquant.quant.formats import Fp8Format, PackFormat
from qvlquant.quant.fp8 import BLOCK as FP8_BLOCK
from qvlquant.quant.spec import QuantSpec
from qvlquant.storage.files import read_text_bounded

REQUIRED = object()  # _get's default for a field the format's library has no default for
KINDS = {int: "a whole number", bool: "true or false", str: "a string", dict: "a JSON object"}


@dataclasses.dataclass(frozen=True)
class CheckpointQuant:
    """What a checkpoint's ``quantization_config`` says, read once by ``read_quantization_config``."""

    method: str  # quant_method: "gptq", "awq", "compressed-tensors" or "fp8"
    pack_format: PackFormat | Fp8Format  # the layout of the packed tensors on disk (Fp8Format: FP8 e4m3 weights)
    spec: QuantSpec  # bits; group_size (-1: per channel); sym (AWQ: not zero_point)
    act_order: bool  # the groups are permuted at load time (GPTQ desc_act, compressed-tensors actorder "group")
    checkpoint_format: str  # GPTQ checkpoint_format "gptq", AWQ version "gemm", compressed-tensors "pack-quantized"
    not_converted: tuple[str, ...] = ()  # GPTQ / AWQ modules_to_not_convert (each client matches them its own way)
    in_block: tuple[str, ...] = ()  # GPTQ modules_in_block_to_quantize, flattened; empty: every linear of a block
    ignore: tuple[str, ...] = ()  # compressed-tensors ignore (exact names, or regexes after "re:")

    def summary(self) -> dict:
        """The settings the eval table and ``inspect`` show, spelled the same for every format."""
        summary = {"quant_method": self.method, "bits": self.spec.bits, "group_size": self.spec.group_size,
                   "sym": self.spec.sym}
        return {**summary, "weights": "fp8_e4m3"} if isinstance(self.pack_format, Fp8Format) else summary


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
    return CheckpointQuant("gptq", PackFormat.GPTQ, spec, _get(qc, "desc_act", bool, False, path), layout,
                           not_converted=_names(qc, "modules_to_not_convert", path),
                           in_block=_names(qc, "modules_in_block_to_quantize", path))


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
    if len(groups) != 1:
        raise ValueError(f"{path}.config_groups holds {len(groups)} groups; qvlquant reads one (a single scheme for "
                         "every quantized Linear)")
    name, group = next(iter(groups.items()))
    gpath = f"{path}.config_groups.{name}"
    if not isinstance(group, dict):
        raise ValueError(f"{gpath} must be a JSON object, got {group!r}")
    layout = _get(group, "format", str, None, gpath) or _get(qc, "format", str, "dense", path)
    if layout == "float-quantized":
        return read_float_quantized(qc, group, gpath, path)
    if layout != "pack-quantized":
        raise ValueError(f"{path}.format {layout!r} is not supported; qvlquant reads 'pack-quantized' (integer "
                         "weights packed in int32)")
    weights = _get(group, "weights", dict, REQUIRED, gpath)
    wpath = f"{gpath}.weights"
    if _get(weights, "type", str, "int", wpath) != "int":
        raise ValueError(f"{wpath}.type {weights['type']!r} is not supported; qvlquant reads integer weights ('int')")
    actorder = weights.get("actorder")
    if not (actorder is None or isinstance(actorder, (bool, str))):
        raise ValueError(f"{wpath}.actorder must be null, a string or true/false, got {actorder!r}")
    spec = _spec(path, _get(weights, "num_bits", int, 8, wpath), _ct_group_size(weights, wpath),
                 _get(weights, "symmetric", bool, True, wpath))
    return CheckpointQuant("compressed-tensors", PackFormat.COMPRESSED, spec,
                           actorder is True or actorder in ("group", "dynamic"), layout,
                           ignore=_names(qc, "ignore", path))


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


def read_float_quantized(qc: dict, group: dict, gpath: str, path: str) -> CheckpointQuant:
    """compressed-tensors ``float-quantized`` as FP8_DYNAMIC writes it: 8-bit float weights per channel,
    symmetric; 8-bit float input activations per token, dynamic. Anything else (static or per-tensor scales,
    weight-only) is refused, naming the field."""
    wpath, apath = f"{gpath}.weights", f"{gpath}.input_activations"
    weights = _get(group, "weights", dict, REQUIRED, gpath)
    acts = _get(group, "input_activations", dict, None, gpath)
    if acts is None:
        raise ValueError(f"{apath} is missing; qvlquant reads FP8 with dynamic per-token activations (FP8_DYNAMIC)")
    expected = ((weights, wpath, {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True}),
                (acts, apath, {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}))
    for d, where, fields in expected:
        for key, value in fields.items():
            got = _get(d, key, type(value), None, where)
            if got != value:
                raise ValueError(f"{where}.{key} is {got!r}; qvlquant reads float-quantized FP8_DYNAMIC "
                                 f"({key} {value!r})")
    return CheckpointQuant("compressed-tensors", Fp8Format.CHANNEL, QuantSpec(8, -1, True), False,
                           "float-quantized", ignore=_names(qc, "ignore", path))


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
