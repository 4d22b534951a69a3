"""Calibration text for Qwen-VL / Qwen-VL-Chat (first generation).

Its remote tokenizer finds images as ``<img>path</img>`` inside the text and its model code opens them itself (URLs
included). So qvlquant writes those tags itself, only for local image files that its own loader has checked (inside
the data root, regular, decodable), as absolute paths; user text may not contain the tags, and URLs, data URIs and
in-memory images are refused: the model code would fetch or could not see them.
"""

from __future__ import annotations

import os
import pathlib

import torch

from qvlquant.calib.dataset import CalibConfig, CalibrationError, _image_items
from qvlquant.calib.images import load_image

V1_MARKERS = ("<img>", "</img>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<|im_start|>", "<|im_end|>")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _image_path(source, cfg: CalibConfig, name: str) -> str:
    if not isinstance(source, (str, os.PathLike)) or str(source).startswith(("data:", "http://", "https://")):
        raise CalibrationError(f"{name}: Qwen-VL v1 reads images from local files only (its own code opens them)")
    text = str(source).removeprefix("file://")
    path = pathlib.Path(text)
    if cfg.image_root is not None and not path.is_absolute():
        path = pathlib.Path(cfg.image_root) / path
    try:
        load_image(path, root=cfg.image_root)  # checks: inside the root, regular file, decodes
    except ValueError as e:
        raise CalibrationError(f"{name}: {e}") from None
    return str(path.resolve())


def v1_text(messages: list[dict], cfg: CalibConfig, name: str) -> str:
    """ChatML text with ``Picture i: <img>/abs/path</img>`` for each image, as Qwen-VL-Chat's chat() builds it."""
    for item in _image_items(messages, name):
        text = item.get("text")
        if isinstance(text, str) and any(m in text for m in V1_MARKERS):
            raise CalibrationError(f"{name}: text contains Qwen-VL markup ({[m for m in V1_MARKERS if m in text]})")
    out, picture = [SYSTEM], 0
    for turn in messages:
        content = turn["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        parts = []
        for item in items:
            if item.get("type") in ("image", "image_url") or "image" in item:
                picture += 1
                parts.append(f"Picture {picture}: <img>{_image_path(item.get('image', item.get('image_url')), cfg, name)}</img>\n")
            else:
                parts.append(item["text"])
        out.append(f"<|im_start|>{turn['role']}\n{''.join(parts)}<|im_end|>\n")
    return "".join(out)


def encode_v1(tokenizer, sample, cfg: CalibConfig, name: str) -> dict[str, torch.Tensor]:
    text = sample if isinstance(sample, str) else v1_text(sample, cfg, name)
    if isinstance(sample, str) and any(m in sample for m in V1_MARKERS):
        raise CalibrationError(f"{name}: text contains Qwen-VL markup")
    enc = tokenizer(text, return_tensors="pt")
    if enc["input_ids"].shape[1] > cfg.max_length:
        raise CalibrationError(f"{name}: {enc['input_ids'].shape[1]} tokens (256 per picture), over max_length {cfg.max_length}")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
