"""What both peer runners share: their dense results mapped back to the input folder's own keys. Imported from the
runners' folder (on sys.path when a runner runs as a script); needs only torch and safetensors, so it loads in
every peer venv."""

from __future__ import annotations

import pathlib

import torch
from safetensors import safe_open


def candidates(key: str) -> list[str]:
    """Names a checkpoint key may have in a transformers-5 Qwen-VL state dict (the legacy layout is renamed)."""
    out = [key]
    if key.startswith("model."):
        out.append("model.language_model." + key[len("model."):])
    if key.startswith("visual."):
        out.append("model." + key)
    return out


def to_input_layout(state: dict[str, torch.Tensor], model_dir: pathlib.Path,
                    step: str = "dequantization") -> tuple[dict, dict[str, str]]:
    """``state`` under exactly the keys (and shapes) of the input folder's model.safetensors, float32.
    -> (that state dict, each used key of ``state`` -> its input-folder key)."""
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    out, renamed = {}, {}
    for key, shape in shapes.items():
        found = [c for c in candidates(key) if c in state]
        if len(found) != 1:
            raise SystemExit(f"{key}: {len(found)} matches in the quantized checkpoint ({found}); cannot map it back")
        t = state[found[0]]
        if list(t.shape) != list(shape):
            raise SystemExit(f"{key}: shape {list(t.shape)} after {step}, {list(shape)} in {model_dir}")
        out[key] = t.float().contiguous()
        renamed[found[0]] = key
    return out, renamed
