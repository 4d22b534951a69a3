"""The shape of one calibration sample, checked in one place where samples enter (``sources.load_samples`` for files and
data sets, ``dataset.build_batches`` for the Python API), so that encoding never meets a malformed one.

A sample is a text string (tokenized as is) or a non-empty list of chat messages in the Qwen2-VL README format::

    {"role": "system" | "user" | "assistant", "content": "text" | [item, ...]}

with at least one user message. An item holds exactly one of::

    {"type": "text", "text": "..."}
    {"type": "image", "image": path | file:// or data: URI | PIL image, "max_pixels": n, "min_pixels": n}
    {"type": "image_url", "image_url": {"url": ...}}
    {"type": "video", "video": [frame, ...]}

(``type`` may be left out: the key decides; ``max_pixels`` / ``min_pixels`` are optional numbers >= 1). Texts are valid
Unicode and not blank (a sample with nothing to calibrate on is reported), and no string that reaches the chat template
holds one of the model's reserved markers: a role comes from the fixed set, a text has no ``<|im_start|>`` and the like,
so no sample can inject a turn or a visual placeholder. Every error is a CalibrationError that names the sample, the
message and item, what is wrong and what to do. Whether an image file exists and decodes is checked when it loads.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable

from PIL import Image

from qvlquant.calib.errors import CalibrationError

ROLES = ("system", "user", "assistant")
RESERVED_MARKERS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
)
ITEM_TYPES = {"text": "text", "image": "image", "image_url": "image", "video": "video"}  # "type" -> kind
PAYLOAD_KEYS = {"image": "image", "image_url": "image", "video": "video", "text": "text"}  # key -> kind
NEEDS = {"text": "a text item needs 'text'", "image": "an image item needs 'image' (a path or URI)",
         "image_url": "an image_url item needs 'image_url'", "video": "a video item needs 'video' (a list of frames)"}
PIXEL_KEYS = ("max_pixels", "min_pixels")


def marker_pattern(markers: Iterable[str], extra: str | None = None) -> re.Pattern:
    """One regex finding any of ``markers`` (literal strings) or ``extra`` (a regex, e.g. a numbered token family)."""
    parts = [re.escape(m) for m in sorted(set(markers), key=len, reverse=True)] + ([extra] if extra else [])
    return re.compile("|".join(parts))


QWEN2_MARKERS = marker_pattern(RESERVED_MARKERS)


def tokenizer_markers(tokenizer) -> tuple[str, ...]:
    """The tokenizer's added tokens that look like markup (``<...>``): in user text it would read them as control
    tokens, so they are reserved too."""
    added = getattr(tokenizer, "get_added_vocab", None)
    vocab = added() if callable(added) else {}
    return tuple(sorted(t for t in vocab if isinstance(t, str) and len(t) > 2 and t.startswith("<") and t.endswith(">")))


def reserved_pattern(tokenizer) -> re.Pattern:
    """The fixed Qwen2-VL markers plus the markup-like added tokens of ``tokenizer``."""
    return marker_pattern(RESERVED_MARKERS + tokenizer_markers(tokenizer))


def content_items(turn: dict) -> list[dict]:
    """A validated message's content as a list of items (string content is one text item)."""
    content = turn["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def item_kind(item: dict) -> str:
    """'text', 'image' or 'video' for a validated content item (it holds exactly one payload key)."""
    return next(PAYLOAD_KEYS[key] for key in PAYLOAD_KEYS if key in item)


def image_source(item: dict):
    """The image of a validated image item: a path / URI string, a PathLike or a PIL image (``{"url": ...}`` unwrapped)."""
    source = item.get("image", item.get("image_url"))
    return source.get("url") if isinstance(source, dict) else source


def check_text(text, where: str, markers: re.Pattern = QWEN2_MARKERS) -> None:
    """A string that reaches the template: valid Unicode, not blank, no reserved marker."""
    if not isinstance(text, str):
        raise CalibrationError(f"{where}: the text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CalibrationError(f"{where}: the text is not valid Unicode (a lone surrogate at character {e.start}); "
                               "fix the file's encoding") from None
    if not text.strip():
        raise CalibrationError(f"{where}: the text is empty; add text or remove it")
    found = sorted(set(markers.findall(text)))
    if found:
        raise CalibrationError(f"{where}: the text contains the reserved marker(s) {found}; remove them")


def check_pixels(value, where: str, key: str) -> None:
    """A per-image pixel budget: a number >= 1 (JSON's 1e400 is inf, NaN is not a number; both refused)."""
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)))
    if not ok or value < 1:
        raise CalibrationError(f"{where}: {key} must be a number >= 1, got {value!r:.40}")


def _check_image(item: dict, where: str) -> None:
    source = image_source(item)
    if not isinstance(source, (str, os.PathLike, Image.Image)):
        raise CalibrationError(f"{where}: the image must be a path, a file:// or data: URI, or a PIL image, "
                               f"got {type(source).__name__}")


def _check_video(item: dict, where: str) -> None:
    frames = item["video"]
    if not isinstance(frames, list) or not frames:
        raise CalibrationError(f"{where}: a video item needs a non-empty list of frames (paths or images)")
    for k, frame in enumerate(frames, 1):
        if not isinstance(frame, (str, os.PathLike, Image.Image)):
            raise CalibrationError(f"{where}: video frame {k} must be a path or a PIL image, got {type(frame).__name__}")


def check_item(item, where: str, markers: re.Pattern = QWEN2_MARKERS) -> None:
    """One content item: an object holding exactly one of text / image / image_url / video, agreeing with its type."""
    if not isinstance(item, dict):
        raise CalibrationError(f"{where} is {type(item).__name__}, not an object like {{\"type\": \"text\", \"text\": ...}}")
    kind = item.get("type")
    if kind is not None and not isinstance(kind, str):
        raise CalibrationError(f"{where}: 'type' must be a string, got {type(kind).__name__}")
    if kind is not None and kind not in ITEM_TYPES:
        raise CalibrationError(f"{where}: unknown content item type {kind!r:.40}; use text, image, image_url or video")
    keys = [key for key in PAYLOAD_KEYS if key in item]
    if not keys:
        raise CalibrationError(f"{where}: {NEEDS[kind]}" if kind else
                               f"{where}: unknown content item (no 'text', 'image', 'image_url' or 'video' key)")
    if len(keys) > 1:
        raise CalibrationError(f"{where} holds both {keys[0]!r} and {keys[1]!r}; use one item for each")
    if kind is not None and ITEM_TYPES[kind] != PAYLOAD_KEYS[keys[0]]:
        raise CalibrationError(f"{where}: 'type' {kind!r} but holds {keys[0]!r}; make them agree")
    found = PAYLOAD_KEYS[keys[0]]
    if found == "text":
        check_text(item["text"], where, markers)
        return
    if found == "image":
        _check_image(item, where)
    else:
        _check_video(item, where)
    for key in PIXEL_KEYS:
        if key in item:
            check_pixels(item[key], where, key)


def check_message(turn, where: str, markers: re.Pattern = QWEN2_MARKERS) -> None:
    """One chat message: a role from the fixed set and content that is a text or a non-empty list of items."""
    if not isinstance(turn, dict):
        raise CalibrationError(f"{where} is {type(turn).__name__}, not an object with 'role' and 'content'")
    if "role" not in turn or "content" not in turn:
        raise CalibrationError(f"{where} needs 'role' and 'content', got {turn!r:.80}")
    if not (isinstance(turn["role"], str) and turn["role"] in ROLES):
        raise CalibrationError(f"{where}: role must be one of {', '.join(ROLES)}, got {turn['role']!r:.60}")
    content = turn["content"]
    if isinstance(content, str):
        check_text(content, where, markers)
        return
    if not isinstance(content, list):
        raise CalibrationError(f"{where}: content must be a string or a list of items, got {type(content).__name__}")
    if not content:
        raise CalibrationError(f"{where} has no content; add text or an image, or remove the message")
    for j, item in enumerate(content, 1):
        check_item(item, f"{where} item {j}", markers)


def validate_sample(sample, name: str, markers: re.Pattern = QWEN2_MARKERS) -> None:
    """Raise a CalibrationError naming ``name`` unless ``sample`` is a usable text or chat sample (see the module doc).
    ``markers``: what no string may contain (``reserved_pattern(tokenizer)`` for a model's own set)."""
    if isinstance(sample, str):
        if not sample.strip():
            raise CalibrationError(f"{name}: empty text sample; add text or remove the sample")
        check_text(sample, name, markers)
        return
    if not isinstance(sample, list):
        raise CalibrationError(f"{name}: not a chat sample (a list of messages) or a text string, "
                               f"got {type(sample).__name__}")
    if not sample:
        raise CalibrationError(f"{name}: chat messages must be a non-empty list; add a user message or remove the sample")
    for i, turn in enumerate(sample, 1):
        check_message(turn, f"{name}: message {i}", markers)
    if not any(turn["role"] == "user" for turn in sample):
        roles = [turn["role"] for turn in sample]
        raise CalibrationError(f"{name}: no user message (roles {roles}), nothing to calibrate the prompt side on; "
                               "add a user message with text or an image, or remove the sample")
