"""Putting quantized modules in place of a skeleton's nn.Linear layers, by runtime path."""

from __future__ import annotations

from typing import Callable

import torch


def replace_linears(model, names, build: Callable[[str, torch.nn.Linear], torch.nn.Module]) -> None:
    """Replace the nn.Linear at each runtime path in ``names`` by ``build(name, old)``, made on the old layer's
    device (the meta device when the model's parameters are: the checkpoint fills the new buffers)."""
    for name in names:
        parent_name, leaf = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        if not isinstance(old, torch.nn.Linear):
            raise ValueError(f"{name} is a {type(old).__name__}, not a Linear: the checkpoint does not fit this model")
        with torch.device(old.weight.device):
            setattr(parent, leaf, build(name, old))
