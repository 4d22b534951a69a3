"""How calibration samples are encoded: the sequence and pixel budgets, the batch size, where images may come from."""

from __future__ import annotations

import dataclasses

# The most pixels an image may be given: qwen-vl-utils' own maximum (16384 visual tokens of 28x28 pixels). Budgets of
# 1e8-1e9 pixels upscale every image past what any Qwen-VL was trained on, and past the machine's memory.
MAX_PIXELS_CEILING = 16384 * 28 * 28


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
        if self.max_pixels > MAX_PIXELS_CEILING:
            raise ValueError(f"max_pixels must be at most {MAX_PIXELS_CEILING} (16384 * 28 * 28, qwen-vl-utils' "
                             f"maximum), got {self.max_pixels}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError("batch_size and max_length must be positive")
