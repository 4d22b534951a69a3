"""Calibration samples -> real multimodal batches through the model's own processor.

A sample is either chat messages in the Qwen2-VL README format (a user turn whose content lists
``{"type": "image", "image": ...}`` and ``{"type": "text", "text": ...}`` items, then usually an assistant answer) or a
plain string of natural text (tokenized as is, no chat template); ``calib.samples`` checks the shape, the roles and
the reserved markers (the model tokenizer's own added tokens included) before anything is encoded. Images go through qvlquant's safe loader; a pixel
budget bounds the visual tokens; a sample longer than ``max_length`` is refused, naming it, and never truncated
(cutting through image tokens would desynchronise them from ``pixel_values``).
"""

from __future__ import annotations

import math
import pathlib

import torch
from PIL import Image

from qvlquant.calib.config import CalibConfig
from qvlquant.calib.errors import CalibrationError
from qvlquant.calib.images import load_image, local_path
from qvlquant.calib.qwen_vl_v1 import V1_PATTERN, encode_v1
from qvlquant.calib.samples import (
    content_items,
    image_source,
    item_kind,
    reserved_pattern,
    validate_sample,
)
from qvlquant.calib.template import render_chat


def _resize_within(img: Image.Image, max_pixels: int) -> Image.Image:
    w, h = img.size
    if w * h <= max_pixels:
        return img
    f = math.sqrt(max_pixels / (w * h))
    return img.resize((max(1, int(w * f)), max(1, int(h * f))), Image.BICUBIC)


def _load(source, cfg: CalibConfig, where: str) -> Image.Image:
    try:
        return load_image(source, root=cfg.image_root, allow_urls=cfg.allow_urls)
    except ValueError as e:  # ImageError, or PIL refusing a conversion
        raise CalibrationError(f"{where}: {e}") from None


def _frames(item: dict, cfg: CalibConfig, where: str) -> list[Image.Image]:
    frames = [_resize_within(_load(f, cfg, where), cfg.max_pixels) for f in item["video"]]
    sizes = list(dict.fromkeys(f.size for f in frames))
    if len(sizes) > 1:
        shown = " and ".join(f"{w}x{h}" for w, h in sizes[:2])
        raise CalibrationError(f"{where}: video frames differ in size ({shown}); give every frame one size")
    return frames


def min_visual_tokens(processor, cfg: CalibConfig, images: int, frames: list[int]) -> int:
    """The fewest visual tokens ``images`` images and videos of ``frames`` frames can become: the processor scales
    each to at least ``min_pixels``, one token per (patch * merge)**2 pixels, and a video's frames in pairs
    (temporal_patch_size). A lower bound, known before any image is opened."""
    vision = processor.image_processor
    video = getattr(processor, "video_processor", None) or vision
    per_image = max(1, cfg.min_pixels // (vision.patch_size * vision.merge_size) ** 2)
    steps = sum(-(-n // video.temporal_patch_size) for n in frames)  # frames per step, rounded up
    return per_image * (images + steps)


def check_visual_count(processor, messages: list[dict], cfg: CalibConfig, name: str) -> None:
    """Refuse a sample whose images and video frames cannot fit in ``max_length`` before loading any of them (1,500
    frames took 12.8 GiB before the token count refused them)."""
    items = [item for turn in messages for item in content_items(turn)]
    images = sum(item_kind(item) == "image" for item in items)
    frames = [len(item["video"]) for item in items if item_kind(item) == "video"]
    need = min_visual_tokens(processor, cfg, images, frames)
    if need > cfg.max_length:
        raise CalibrationError(f"{name}: {sum(frames)} video frames and {images} images need at least {need} visual "
                               f"tokens, over max_length {cfg.max_length}; use fewer frames or images, or raise "
                               "max_length")


def prepare_messages(messages: list[dict], cfg: CalibConfig, name: str) -> tuple[list[dict], list, list]:
    """Load the images and video frames of a chat sample that ``validate_sample`` accepted (a per-image
    ``max_pixels`` is clamped to the budget; the global ``min_pixels`` applies). -> (messages, images, videos as
    lists of frames)."""
    images, videos = [], []
    for i, turn in enumerate(messages, 1):
        for j, item in enumerate(content_items(turn), 1):
            where, kind = f"{name}: message {i} item {j}", item_kind(item)
            if kind == "video":
                videos.append(_frames(item, cfg, where))
            elif kind == "image":
                budget = min(int(item.get("max_pixels", cfg.max_pixels)), cfg.max_pixels)
                images.append(_resize_within(_load(image_source(item), cfg, where), budget))
    return messages, images, videos


def encode_sample(processor, sample, cfg: CalibConfig, name: str) -> dict[str, torch.Tensor]:
    """One sample -> a batch of one: input_ids, attention_mask, mm_token_type_ids [1, S] (+ pixel_values,
    image_grid_thw when it has images)."""
    validate_sample(sample, name, reserved_pattern(processor.tokenizer))
    budget = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}  # the pixel budget
    kw = {"images_kwargs": {"size": budget}}
    if isinstance(sample, str):
        enc = processor(text=[sample], return_tensors="pt")
    else:
        check_visual_count(processor, sample, cfg, name)
        messages, images, videos = prepare_messages(sample, cfg, name)
        text = render_chat(processor, messages, cfg, name)
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


def image_files(samples: list, root: str | None) -> list[pathlib.Path]:
    """Every local file the (validated) samples' images and video frames name, joined to ``root``, none opened:
    what the run reads besides the calibration file itself."""
    files = []
    for sample in samples:
        for turn in sample if isinstance(sample, list) else ():
            for item in content_items(turn):
                kind = item_kind(item)
                sources = item["video"] if kind == "video" else [image_source(item)] if kind == "image" else []
                files += [p for p in (local_path(s, root) for s in sources) if p is not None]
    return files


def _names(samples, names: list[str] | None) -> list[str]:
    if not isinstance(samples, (list, tuple)):
        raise CalibrationError(f"build_batches needs a list of samples, got {type(samples).__name__}")
    if not samples:
        raise CalibrationError("the calibration set is empty; add samples (--calib, --num-samples)")
    if names is None:
        return [f"sample {i}" for i in range(len(samples))]
    if len(names) != len(samples):
        raise CalibrationError(f"{len(samples)} samples but {len(names)} names; give one name per sample")
    return list(names)


def build_batches(processor, samples: list, cfg: CalibConfig, names: list[str] | None = None, v1: bool = False) -> list[dict]:
    """All samples validated first (errors naming the sample), then encoded and grouped into padded batches of
    ``batch_size``. ``v1``: Qwen-VL-Chat, whose "processor" is its remote tokenizer reading ``<img>`` tags."""
    names = _names(samples, names)
    markers = V1_PATTERN if v1 else reserved_pattern(processor.tokenizer)
    for sample, name in zip(samples, names):
        validate_sample(sample, name, markers)
    if v1:
        encoded = [encode_v1(processor, s, cfg, n) for s, n in zip(samples, names)]
        pad_id = processor.pad_token_id if processor.pad_token_id is not None else processor.eod_id
    else:
        encoded = [encode_sample(processor, s, cfg, n) for s, n in zip(samples, names)]
        pad_id = processor.tokenizer.pad_token_id
    return [collate(encoded[i:i + cfg.batch_size], pad_id) for i in range(0, len(encoded), cfg.batch_size)]
