"""Where calibration samples come from (``--calib``).

- ``demo`` (default for the demo model): easy-vqa train chats mixed half and half with natural-text documents from
  the demo's calibration text (the same kind of text its language model was trained on, none of it held out).
- ``easyvqa``: easy-vqa train chats only.
- a ``.json`` / ``.jsonl`` file: a list of samples, each a list of chat messages (Qwen2-VL README format) or
  ``{"messages": [...]}``, or a plain string of text. Relative image paths are taken from the file's folder.
"""

from __future__ import annotations

import json
import pathlib
import random

from qvlquant.calib.dataset import CalibrationError
from qvlquant.calib.easyvqa import load_split
from qvlquant.demo.paths import DATA_DIR


def _easyvqa(n: int, rng: random.Random) -> tuple[list, list[str]]:
    items = load_split("train")
    picks = rng.sample(range(len(items)), n)
    return [items[i].messages() for i in picks], [f"easy-vqa train question {i}" for i in picks]


def _demo_text(n: int, rng: random.Random) -> tuple[list, list[str]]:
    docs = [d for d in (DATA_DIR / "calib_text.txt").read_text(encoding="utf-8").splitlines() if d.strip()]
    if n > len(docs):
        raise CalibrationError(f"asked for {n} text samples, the demo calibration text has {len(docs)}")
    picks = rng.sample(range(len(docs)), n)
    return [" ".join(docs[i].split()[:200]) for i in picks], [f"calib_text.txt line {i + 1}" for i in picks]


def _file(path: pathlib.Path) -> tuple[list, list[str]]:
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        names = [f"{path.name}:{i + 1}" for i in range(len(rows))]
    else:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise CalibrationError(f"{path}: expected a JSON list of samples")
        names = [f"{path.name}[{i}]" for i in range(len(rows))]
    samples = [r["messages"] if isinstance(r, dict) and "messages" in r else r for r in rows]
    return samples, names


def load_samples(source: str, num_samples: int, seed: int = 0) -> tuple[list, list[str], str | None]:
    """-> (samples, names, image_root). Exactly ``num_samples`` or an error: never a silently smaller set."""
    if num_samples < 1:
        raise CalibrationError(f"--num-samples must be at least 1, got {num_samples}")
    rng = random.Random(seed)
    if source == "demo":
        chats, chat_names = _easyvqa(num_samples - num_samples // 2, rng)
        texts, text_names = _demo_text(num_samples // 2, rng)
        return chats + texts, chat_names + text_names, None
    if source == "easyvqa":
        samples, names = _easyvqa(num_samples, rng)
        return samples, names, None
    path = pathlib.Path(source)
    if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle"):
        raise CalibrationError(f"{path}: pickle-based files are refused; use JSON or JSONL")
    if not path.is_file():
        raise CalibrationError(f"--calib {source!r}: not 'demo', 'easyvqa' or an existing .json/.jsonl file")
    samples, names = _file(path)
    if len(samples) < num_samples:
        raise CalibrationError(f"{path} holds {len(samples)} samples, fewer than --num-samples {num_samples}")
    order = rng.sample(range(len(samples)), num_samples)
    return [samples[i] for i in order], [names[i] for i in order], str(path.resolve().parent)
