"""Function-preserving model edits done before quantization."""

from __future__ import annotations

import torch

from qvlquant.families import ModelFamily


def _pad_linear(linear: torch.nn.Linear, rows: int = 0, cols: int = 0) -> torch.nn.Linear:
    """A copy of ``linear`` with ``rows`` zero outputs and ``cols`` zero inputs appended."""
    w = torch.nn.functional.pad(linear.weight.data, (0, cols, 0, rows))  # [N + rows, K + cols]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype, device=w.device)
    new.weight.data = w
    if linear.bias is not None:
        new.bias.data = torch.nn.functional.pad(linear.bias.data, (0, rows))
    return new


@torch.no_grad()
def pad_intermediate(model, family: ModelFamily, multiple: int) -> int:
    """Zero-pad the MLP intermediate size of every decoder layer up to a multiple of ``multiple`` (gate/up rows,
    down columns), so it splits across tensor-parallel ranks with whole groups: Qwen2-VL-72B's 29568 -> 29696 with
    multiple 1024 (= 8 ranks x 128). The padded channels compute silu(0) * 0 = 0, so outputs do not change.
    The vision tower is not touched. -> the new intermediate size."""
    if multiple < 1:
        raise ValueError(f"--pad-intermediate-to must be positive, got {multiple}")
    text_config = getattr(model.config, "text_config", model.config)
    size = text_config.intermediate_size
    target = -(-size // multiple) * multiple
    if target == size:
        return size
    for layer in model.get_submodule(family.decoder_layers):
        for name in family.mlp_in:
            parent, leaf = name.rsplit(".", 1)
            setattr(layer.get_submodule(parent), leaf, _pad_linear(layer.get_submodule(name), rows=target - size))
        parent, leaf = family.mlp_out.rsplit(".", 1)
        setattr(layer.get_submodule(parent), leaf, _pad_linear(layer.get_submodule(family.mlp_out), cols=target - size))
    text_config.intermediate_size = target
    return target
