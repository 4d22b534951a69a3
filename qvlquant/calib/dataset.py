"""Calibration samples -> real multimodal batches through the model's own processor.

A sample is either chat messages in the Qwen2-VL README format (a user turn whose content lists
``{"type": "image", "image": ...}`` and ``{"type": "text", "text": ...}`` items, then usually an assistant answer) or a
plain string of natural text (tokenized as is, no chat template). Images go through qvlquant's safe loader; a pixel
budget bounds the visual tokens; a sample longer than ``max_length`` is refused, naming it, and never truncated
(cutting through image tokens would desynchronise them from ``pixel_values``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from PIL import Image

from qvlquant.calib.images import load_image

RESERVED_MARKERS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
)


class CalibrationError(ValueError):
    """A calibration sample that cannot be used; the message names the sample and the reason."""


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    max_length: int = 2048
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448  # qwen-vl-utils' default (16384 * 28 * 28) is what makes calibration OOM
    batch_size: int = 1
    image_root: str | None = None  # relative image paths are taken from here and may not leave it
    allow_urls: bool = False  # http(s) images are fetched only when the user opts in

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError("batch_size and max_length must be positive")


def _image_items(messages: list[dict], name: str):
    if not isinstance(messages, list) or not messages:
        raise CalibrationError(f"{name}: expected a non-empty list of chat messages")
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise CalibrationError(f"{name}: every message needs 'role' and 'content', got {turn!r:.80}")
        content = turn["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, list):
            raise CalibrationError(f"{name}: content must be a string or a list of items")
        for item in items:
            if not isinstance(item, dict):
                raise CalibrationError(f"{name}: content item {item!r:.60} is not a dict")
            yield item


def _resize_within(img: Image.Image, max_pixels: int) -> Image.Image:
    w, h = img.size
    if w * h <= max_pixels:
        return img
    f = math.sqrt(max_pixels / (w * h))
    return img.resize((max(1, int(w * f)), max(1, int(h * f))), Image.BICUBIC)


def prepare_messages(messages: list[dict], cfg: CalibConfig, name: str) -> tuple[list[dict], list, list]:
    """Validate one chat sample and load its images and video frames (a per-image ``max_pixels`` is clamped to the
    budget). -> (messages, images, videos as lists of frames)."""
    images, videos = [], []
    for item in _image_items(messages, name):
        kind = item.get("type")
        if kind == "video" or "video" in item:
            frames = item.get("video")
            if not isinstance(frames, list) or not frames:
                raise CalibrationError(f"{name}: a video item needs a non-empty list of frames (paths or images)")
            try:
                videos.append([_resize_within(load_image(f, root=cfg.image_root, allow_urls=cfg.allow_urls), cfg.max_pixels)
                               for f in frames])
            except ValueError as e:
                raise CalibrationError(f"{name}: {e}") from None
        elif kind in ("image", "image_url") or "image" in item or "image_url" in item:
            source = item.get("image", item.get("image_url"))
            if isinstance(source, dict):
                source = source.get("url")
            try:
                img = load_image(source, root=cfg.image_root, allow_urls=cfg.allow_urls)
            except ValueError as e:
                raise CalibrationError(f"{name}: {e}") from None
            budget = min(int(float(item.get("max_pixels", cfg.max_pixels))), cfg.max_pixels)
            images.append(_resize_within(img, budget))
        elif kind == "text" or "text" in item:
            text = item.get("text")
            if not isinstance(text, str):
                raise CalibrationError(f"{name}: a text item holds {type(text).__name__}, not a string")
            found = [m for m in RESERVED_MARKERS if m in text]
            if found:
                raise CalibrationError(f"{name}: text contains the reserved marker(s) {found}; remove them")
        else:
            raise CalibrationError(f"{name}: unknown content item type {kind!r}")
    return messages, images, videos


def encode_sample(processor, sample, cfg: CalibConfig, name: str) -> dict[str, torch.Tensor]:
    """One sample -> a batch of one: input_ids, attention_mask, mm_token_type_ids [1, S] (+ pixel_values,
    image_grid_thw when it has images)."""
    budget = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}  # the pixel budget
    kw = {"images_kwargs": {"size": budget}}
    if isinstance(sample, str):
        if not sample.strip():
            raise CalibrationError(f"{name}: empty text")
        found = [m for m in RESERVED_MARKERS if m in sample]
        if found:
            raise CalibrationError(f"{name}: text contains the reserved marker(s) {found}; remove them")
        enc = processor(text=[sample], return_tensors="pt")
    else:
        messages, images, videos = prepare_messages(sample, cfg, name)
        text = processor.apply_chat_template(messages, tokenize=False)
        if text.count("<|image_pad|>") != len(images) or text.count("<|video_pad|>") != len(videos):
            raise CalibrationError(f"{name}: {len(images)} images / {len(videos)} videos but the chat template wrote "
                                   f"{text.count('<|image_pad|>')} / {text.count('<|video_pad|>')} placeholders")
        if videos:
            kw["videos_kwargs"] = {"do_sample_frames": False, "size": budget}
        enc = processor(text=[text], images=images or None, videos=videos or None, return_tensors="pt", **kw)
    enc = dict(enc)
    length = enc["input_ids"].shape[1]
    if length > cfg.max_length:
        raise CalibrationError(
            f"{name}: {length} tokens, over max_length {cfg.max_length}; lower max_pixels or raise max_length "
            "(samples are never truncated through image tokens)"
        )
    enc.setdefault("mm_token_type_ids", torch.zeros_like(enc["input_ids"]))
    return enc


def collate(encoded: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad single-sample encodings into one batch; image tensors are concatenated in sample order."""
    n = max(e["input_ids"].shape[1] for e in encoded)
    batch = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if key not in encoded[0]:
            continue
        rows = [torch.nn.functional.pad(e[key], (0, n - e[key].shape[1]), value=fill) for e in encoded]
        batch[key] = torch.cat(rows)
    for values, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        present = [e for e in encoded if values in e]
        if present:
            batch[values] = torch.cat([e[values] for e in present])
            batch[grid] = torch.cat([e[grid] for e in present])
    return batch


def build_batches(processor, samples: list, cfg: CalibConfig, names: list[str] | None = None, v1: bool = False) -> list[dict]:
    """All samples encoded (each validated, errors naming it), then grouped into padded batches of ``batch_size``.
    ``v1``: Qwen-VL-Chat, whose "processor" is its remote tokenizer reading ``<img>`` tags."""
    if not samples:
        raise CalibrationError("the calibration set is empty")
    names = names or [f"sample {i}" for i in range(len(samples))]
    if v1:
        from qvlquant.calib.qwen_vl_v1 import encode_v1

        encoded = [encode_v1(processor, s, cfg, n) for s, n in zip(samples, names)]
        pad_id = processor.pad_token_id if processor.pad_token_id is not None else processor.eod_id
    else:
        encoded = [encode_sample(processor, s, cfg, n) for s, n in zip(samples, names)]
        pad_id = processor.tokenizer.pad_token_id
    return [collate(encoded[i:i + cfg.batch_size], pad_id) for i in range(0, len(encoded), cfg.batch_size)]
