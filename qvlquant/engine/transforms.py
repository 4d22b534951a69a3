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


def padded_size(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``; more than doubling it is refused (the padded MLP is held
    and quantized: --pad-intermediate-to 1e9 would allocate billions of rows)."""
    if multiple < 1:
        raise ValueError(f"--pad-intermediate-to must be positive, got {multiple}")
    target = -(-size // multiple) * multiple
    if target > 2 * size:
        raise ValueError(f"--pad-intermediate-to {multiple} would pad the MLP's intermediate size {size} to {target}, "
                         "more than double it; pad to a multiple of tensor-parallel ranks x group size (e.g. 1024)")
    return target


@torch.no_grad()
def pad_layer(layer: torch.nn.Module, family: ModelFamily, multiple: int) -> int:
    """Zero-pad one decoder layer's MLP intermediate size up to a multiple of ``multiple`` (gate/up rows, down
    columns). The padded channels compute silu(0) * 0 = 0, so outputs do not change. -> the new size."""
    size = layer.get_submodule(family.mlp_out).in_features
    target = padded_size(size, multiple)
    if target == size:
        return size
    for name in family.mlp_in:
        parent, leaf = name.rsplit(".", 1)
        setattr(layer.get_submodule(parent), leaf, _pad_linear(layer.get_submodule(name), rows=target - size))
    parent, leaf = family.mlp_out.rsplit(".", 1)
    setattr(layer.get_submodule(parent), leaf, _pad_linear(layer.get_submodule(family.mlp_out), cols=target - size))
    return target


def pad_config(config, multiple: int) -> int:
    """Record the padded intermediate size in the (text) config. -> the new size."""
    text_config = getattr(config, "text_config", config)
    text_config.intermediate_size = padded_size(text_config.intermediate_size, multiple)
    return text_config.intermediate_size


@torch.no_grad()
def pad_intermediate(model, family: ModelFamily, multiple: int) -> int:
    """``pad_layer`` for every decoder layer of a model in memory, and its config: Qwen2-VL-72B's 29568 -> 29696
    with multiple 1024 (= 8 ranks x 128), so it splits across tensor-parallel ranks with whole groups. The vision
    tower is not touched. -> the new intermediate size."""
    padded_size(getattr(model.config, "text_config", model.config).intermediate_size, multiple)  # before any change
    for layer in model.get_submodule(family.decoder_layers):
        pad_layer(layer, family, multiple)
    return pad_config(model.config, multiple)
