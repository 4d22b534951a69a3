"""How calibration samples are encoded: the sequence and pixel budgets, the batch size, where images may come from."""

from __future__ import annotations

import dataclasses


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
