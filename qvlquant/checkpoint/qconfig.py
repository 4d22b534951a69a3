"""Reading a checkpoint's config.json and its ``quantization_config``: the one reader inspect and repair use, which
checks the type of every field they read (a config.json of another tool, or edited by hand, is one error naming
the field, never a TypeError deep in the report)."""

from __future__ import annotations

import json
import pathlib

from qvlquant.storage.files import read_text_bounded

MAX_CONFIG_BYTES = 16 * 2**20
HEADS = ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim")  # text_config sizes vLLM's rules read
FLAGS = ("sym", "desc_act", "zero_point", "static_groups", "true_sequential")
NAMES = ("quant_method", "version", "checkpoint_format")
NAME_LISTS = ("modules_to_not_convert", "ignore")


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
    qc = config.get("quantization_config")
    if qc is not None:
        check_quantization_config(qc, f"{path}: quantization_config")
    return config


def check_quantization_config(qc, where: str) -> None:
    """The fields of a ``quantization_config`` that qvlquant reads, each of its type where present."""
    if not isinstance(qc, dict):
        raise ValueError(f"{where} must be an object, got {qc!r:.80}")
    for name in ("bits", "w_bit"):
        _whole(qc.get(name), f"{where}.{name}")
    _group(qc.get("group_size"), f"{where}.group_size")
    for name in FLAGS:
        if qc.get(name) is not None and not isinstance(qc[name], bool):
            raise ValueError(f"{where}.{name} must be true or false, got {qc[name]!r:.80}")
    for name in NAMES:
        if qc.get(name) is not None and not isinstance(qc[name], str):
            raise ValueError(f"{where}.{name} must be a string, got {qc[name]!r:.80}")
    for name in NAME_LISTS:
        value = qc.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{where}.{name} must be a list of strings, got {value!r:.80}")
    blocks = qc.get("modules_in_block_to_quantize")
    if blocks is not None and not (isinstance(blocks, list) and all(
            isinstance(b, str) or isinstance(b, list) and all(isinstance(v, str) for v in b) for b in blocks)):
        raise ValueError(f"{where}.modules_in_block_to_quantize must be a list of lists of strings")
    _check_groups(qc.get("config_groups"), f"{where}.config_groups")


def _check_groups(groups, where: str) -> None:
    """compressed-tensors ``config_groups``: name -> {"weights": {num_bits, group_size, symmetric, ...}}."""
    if groups is None:
        return
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise ValueError(f"{where} must map group names to objects, got {groups!r:.80}")
    for name, group in groups.items():
        weights = group.get("weights")
        if weights is None:
            continue
        if not isinstance(weights, dict):
            raise ValueError(f"{where}.{name}.weights must be an object, got {weights!r:.80}")
        _whole(weights.get("num_bits"), f"{where}.{name}.weights.num_bits")
        _group(weights.get("group_size"), f"{where}.{name}.weights.group_size")
        if weights.get("symmetric") is not None and not isinstance(weights["symmetric"], bool):
            raise ValueError(f"{where}.{name}.weights.symmetric must be true or false")


def _whole(value, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{what} must be a whole number of at least 1, got {value!r:.80}")


def _group(value, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1)):
        raise ValueError(f"{what} must be -1 or a whole number of at least 1, got {value!r:.80}")


def weight_format(qc: dict) -> tuple[int, int, bool]:
    """(bits, group size, symmetric) of a GPTQ / AWQ / compressed-tensors ``quantization_config``."""
    if qc.get("quant_method") == "compressed-tensors":
        weights = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}
        return int(weights.get("num_bits", 0)), int(weights.get("group_size") or -1), bool(weights.get("symmetric", True))
    group = qc.get("group_size")
    return int(qc.get("bits") or qc.get("w_bit") or 0), -1 if group is None else int(group), bool(qc.get("sym", True))
