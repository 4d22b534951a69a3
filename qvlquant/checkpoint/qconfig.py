"""Reading a checkpoint's ``quantization_config``."""

from __future__ import annotations


def weight_format(qc: dict) -> tuple[int, int, bool]:
    """(bits, group size, symmetric) of a GPTQ / AWQ / compressed-tensors ``quantization_config``."""
    if qc.get("quant_method") == "compressed-tensors":
        weights = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}
        return int(weights.get("num_bits", 0)), int(weights.get("group_size") or -1), bool(weights.get("symmetric", True))
    return int(qc.get("bits", qc.get("w_bit", 0))), int(qc.get("group_size", -1)), bool(qc.get("sym", True))
