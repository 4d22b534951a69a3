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

from qvlquant.calib.config import CalibConfig
from qvlquant.calib.errors import CalibrationError
from qvlquant.calib.images import load_image
from qvlquant.calib.samples import (
    RESERVED_MARKERS,
    content_items,
    item_kind,
    marker_pattern,
    validate_sample,
)

V1_MARKERS = ("<img>", "</img>", "<imgpad>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<|im_start|>",
              "<|im_end|>", "<|endoftext|>")
# its tiktoken tokenizer reads every special token in text (allowed_special="all"), <|extra_0|> ... <|extra_204|> included
V1_PATTERN = marker_pattern(V1_MARKERS + RESERVED_MARKERS, extra=r"<\|extra_\d+\|>")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
TOKENS_PER_PICTURE = 256  # its visual encoder's fixed output per image


def _image_path(source, cfg: CalibConfig, where: str) -> str:
    if not isinstance(source, (str, os.PathLike)) or str(source).startswith(("data:", "http://", "https://")):
        raise CalibrationError(f"{where}: Qwen-VL v1 reads images from local files only (its own code opens them)")
    text = str(source).removeprefix("file://")
    path = pathlib.Path(text)
    if cfg.image_root is not None and not path.is_absolute():
        path = pathlib.Path(cfg.image_root) / path
    try:
        load_image(path, root=cfg.image_root)  # checks: inside the root, regular file, decodes
    except ValueError as e:
        raise CalibrationError(f"{where}: {e}") from None
    resolved = str(path.resolve())
    found = sorted(set(V1_PATTERN.findall(resolved)))
    if found:  # the path is written between <img> tags: a file name may not close them or open a turn
        raise CalibrationError(f"{where}: the image path {resolved!r} contains the reserved marker(s) {found}; rename it")
    return resolved


def v1_text(messages: list[dict], cfg: CalibConfig, name: str) -> str:
    """ChatML text with ``Picture i: <img>/abs/path</img>`` for each image, as Qwen-VL-Chat's chat() builds it."""
    validate_sample(messages, name, V1_PATTERN)
    pictures = sum(item_kind(item) == "image" for turn in messages for item in content_items(turn))
    if pictures * TOKENS_PER_PICTURE > cfg.max_length:  # refused before any image is opened
        raise CalibrationError(f"{name}: {pictures} pictures take {pictures * TOKENS_PER_PICTURE} tokens "
                               f"({TOKENS_PER_PICTURE} each), over max_length {cfg.max_length}; use fewer pictures")
    out, picture = [SYSTEM], 0
    for i, turn in enumerate(messages, 1):
        parts = []
        for j, item in enumerate(content_items(turn), 1):
            kind = item_kind(item)
            if kind == "video":
                raise CalibrationError(f"{name}: message {i} item {j}: Qwen-VL v1 has no video input; remove the item")
            if kind == "image":
                picture += 1
                path = _image_path(item.get("image", item.get("image_url")), cfg, f"{name}: message {i} item {j}")
                parts.append(f"Picture {picture}: <img>{path}</img>\n")
            else:
                parts.append(item["text"])
        out.append(f"<|im_start|>{turn['role']}\n{''.join(parts)}<|im_end|>\n")
    return "".join(out)


def encode_v1(tokenizer, sample, cfg: CalibConfig, name: str) -> dict[str, torch.Tensor]:
    if isinstance(sample, str):
        validate_sample(sample, name, V1_PATTERN)
        text = sample
    else:
        text = v1_text(sample, cfg, name)
    enc = tokenizer(text, return_tensors="pt")
    if enc["input_ids"].shape[1] > cfg.max_length:
        raise CalibrationError(f"{name}: {enc['input_ids'].shape[1]} tokens ({TOKENS_PER_PICTURE} per picture), over max_length {cfg.max_length}")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
