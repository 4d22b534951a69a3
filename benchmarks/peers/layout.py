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


def input_files(model_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Each tensor key of the input folder -> the safetensors file holding it (model.safetensors or shards)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{model_dir}: no .safetensors files")
    where = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    return where


def weight_errors(names: list[str], dequantize, model_dir: pathlib.Path) -> dict:
    """A sanity check of a quantized checkpoint: for each quantized linear (its name in the peer's model),
    ``dequantize(name)`` [N, K] against the input folder's weight, one linear at a time, as the relative error
    ||W_q - W|| / ||W||. -> {linears, median, max, worst, nonfinite, unmatched}."""
    where = input_files(model_dir)
    back = {c: key for key in where for c in candidates(key)}
    errors, nonfinite, unmatched = {}, [], []
    for name in names:
        key = back.get(name + ".weight")
        if key is None:
            unmatched.append(name)
            continue
        with safe_open(str(where[key]), "pt") as f:
            w = f.get_tensor(key).float()
        q = dequantize(name).float()
        if q.shape != w.shape:
            raise SystemExit(f"{name}: dequantized shape {list(q.shape)}, {list(w.shape)} in {model_dir}")
        if not torch.isfinite(q).all():
            nonfinite.append(name)
            continue
        errors[name] = float((q - w).norm() / w.norm().clamp_min(1e-30))
    values = sorted(errors.values())
    worst = max(errors, key=errors.get) if errors else None
    return {"linears": len(names), "median": values[len(values) // 2] if values else None,
            "max": values[-1] if values else None, "worst": worst, "nonfinite": nonfinite, "unmatched": unmatched}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (the kernel's VmHWM), GiB."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / 2**30, 3)
    return float("nan")


def to_input_layout(state: dict[str, torch.Tensor], model_dir: pathlib.Path,
                    step: str = "dequantization") -> tuple[dict, dict[str, str]]:
    """``state`` under exactly the keys (and shapes) of the input folder's safetensors, float32.
    -> (that state dict, each used key of ``state`` -> its input-folder key)."""
    shapes = {}
    for key, path in input_files(model_dir).items():
        with safe_open(str(path), "pt") as f:
            shapes[key] = f.get_slice(key).get_shape()
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
