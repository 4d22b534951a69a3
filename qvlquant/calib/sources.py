"""Where calibration samples come from (``--calib``).

- ``demo`` (default for the demo model): easy-vqa train chats mixed half and half with natural-text documents from
  the demo's calibration text (the same kind of text its language model was trained on, none of it held out).
- ``easyvqa``: easy-vqa train chats only.
- a ``.json`` / ``.jsonl`` file whose samples are any of: a list of chat messages (Qwen2-VL README format);
  ``{"messages": [...]}``; LLaMA-Factory sharegpt rows (``messages`` with ``role``/``content`` or ``conversations``
  with ``from``/``value``, ``<image>`` placeholders in the text and an ``images`` list); ``{"text": ...}`` or a plain
  string (text-only). Relative image paths are taken from the file's folder and may not leave it.
- a folder of images with ``captions.jsonl`` (``{"image": ..., "caption": ...}`` per line) or ``captions.tsv``
  (``file<TAB>caption``): one "describe this image" conversation per image.
- ``hf:PATH_OR_ID`` (``--split``, column flags): a Hugging Face dataset, saved with ``save_to_disk`` or loadable
  with ``load_dataset``; image columns hold PIL images or paths.

Files are read as regular files under caps (qvlquant.storage.files): a .json file of at most 64 MiB (parsed whole),
a .jsonl / captions file of at most 1 GiB read a line at a time, lines of at most 8 MiB ending at "\\n" only. Each
row is checked as it is read, so the first bad row ends the read, naming its line.
"""

from __future__ import annotations

import base64
import json
import pathlib
import random
from collections.abc import Iterable, Iterator

from qvlquant.assets.paths import DATA_DIR
from qvlquant.calib.easyvqa import VqaItem, load_split
from qvlquant.calib.errors import CalibrationError
from qvlquant.calib.samples import validate_sample
from qvlquant.storage.files import InputFileError, read_lines_bounded, read_text_bounded
from qvlquant.storage.manifest import is_pickle


def _check_count(num_samples: int, what: str, available: int) -> None:
    if num_samples > available:
        raise CalibrationError(f"--num-samples {num_samples}: {what} holds at most {available} samples; "
                               f"lower --num-samples or add data")


def _easyvqa(items: list[VqaItem], n: int, rng: random.Random) -> tuple[list, list[str]]:
    picks = rng.sample(range(len(items)), n)
    return [items[i].messages() for i in picks], [f"easy-vqa train question {i}" for i in picks]


def _demo_docs() -> list[str]:
    return [d for d in (DATA_DIR / "calib_text.txt").read_text(encoding="utf-8").splitlines() if d.strip()]


def _demo_text(docs: list[str], n: int, rng: random.Random) -> tuple[list, list[str]]:
    picks = rng.sample(range(len(docs)), n)
    return [" ".join(docs[i].split()[:200]) for i in picks], [f"calib_text.txt line {i + 1}" for i in picks]


def _builtin(source: str, num_samples: int, rng: random.Random) -> tuple[list, list[str]]:
    """``demo``: easy-vqa chats and demo text documents, half and half (the odd one a chat); ``easyvqa``: chats."""
    items = load_split("train")
    if source == "easyvqa":
        _check_count(num_samples, "the easyvqa source (easy-vqa train questions)", len(items))
        return _easyvqa(items, num_samples, rng)
    docs = _demo_docs()
    half = "the demo source (easy-vqa chats and calib_text.txt documents, half and half)"
    _check_count(num_samples, half, min(2 * len(items), 2 * len(docs) + 1))
    chats, chat_names = _easyvqa(items, num_samples - num_samples // 2, rng)
    texts, text_names = _demo_text(docs, num_samples // 2, rng)
    return chats + texts, chat_names + text_names


# A .json file is parsed whole (in memory a JSON value takes up to ~20x its text); larger sets go in .jsonl files,
# read a line at a time with each row checked as it is read. One row: a 50 MB line took 5.7 GiB to parse, and 8 MiB
# still holds a photograph as a data URI.
MAX_JSON_BYTES = 64 << 20
MAX_JSONL_BYTES = 1 << 30
MAX_LINE_BYTES = 8 << 20


def _parse(text: str, where: str, one_line: bool = False):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f" at column {e.colno}" if one_line else f" at line {e.lineno}"
        raise CalibrationError(f"{where}: invalid JSON ({e.msg}{at})") from None
    except RecursionError:
        raise CalibrationError(f"{where}: invalid JSON (nested too deeply)") from None


def _rows(path: pathlib.Path) -> Iterator[tuple[object, str]]:
    """(parsed row, name) of a .json / .jsonl file: ``file.jsonl:LINE`` or ``file.json[INDEX]``."""
    if path.suffix == ".jsonl":
        for n, line in read_lines_bounded(path, MAX_JSONL_BYTES, MAX_LINE_BYTES, "calibration file"):
            if line.strip():
                yield _parse(line, f"{path}:{n}", one_line=True), f"{path.name}:{n}"
        return
    rows = _parse(read_text_bounded(path, MAX_JSON_BYTES, "calibration file"), str(path))
    if not isinstance(rows, list):
        raise CalibrationError(f"{path}: expected a JSON list of samples")
    yield from ((row, f"{path.name}[{i}]") for i, row in enumerate(rows))


def _file(path: pathlib.Path) -> Iterator[tuple[object, str]]:
    return ((normalise_row(row, name), name) for row, name in _rows(path))


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CAPTION_PROMPT = "Describe this image."


def _kind(value) -> str:
    return "an empty list" if value == [] else type(value).__name__


def _turns(row: dict, name: str) -> list[dict]:
    """A sharegpt row's turns: a non-empty list of objects."""
    key = next((k for k in ("messages", "conversations") if row.get(k) is not None), None)
    if key is None:
        raise CalibrationError(f"{name}: a sharegpt row needs 'messages' or 'conversations' (a non-empty list of turns)")
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise CalibrationError(f"{name}: {key!r} must be a non-empty list of turns, got {_kind(turns)}")
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise CalibrationError(f"{name}: turn {i} is {type(turn).__name__}, not an object with role and content")
    return turns


def _turn_text(turn: dict, where: str) -> str:
    text = turn["content"] if "content" in turn else turn.get("value")
    if not isinstance(text, str):
        raise CalibrationError(f"{where}: the text must be a string (with <image> placeholders), got {type(text).__name__}")
    return text


def _images(row: dict, name: str) -> list[str]:
    images = row.get("images")
    if images is None:
        return []
    if not isinstance(images, list):
        raise CalibrationError(f"{name}: 'images' must be a list of paths, got {type(images).__name__}")
    for i, image in enumerate(images, 1):
        if not isinstance(image, str):
            raise CalibrationError(f"{name}: image {i} must be a path string, got {type(image).__name__}")
    return images


def from_sharegpt(row: dict, name: str) -> list[dict]:
    """LLaMA-Factory sharegpt -> chat messages, each ``<image>`` replaced by the next entry of ``images``."""
    turns, images = _turns(row, name), _images(row, name)
    texts = [_turn_text(turn, f"{name}: turn {i}") for i, turn in enumerate(turns, 1)]
    placeholders = sum(text.count("<image>") for text in texts)
    if placeholders != len(images):
        raise CalibrationError(f"{name}: {placeholders} <image> placeholders but {len(images)} images")
    messages, it = [], iter(images)
    for i, (turn, text) in enumerate(zip(turns, texts), 1):
        raw = turn.get("role", turn.get("from"))
        role = SHAREGPT_ROLES.get(raw) if isinstance(raw, str) else None
        if role is None:
            raise CalibrationError(f"{name}: turn {i}: unknown role {raw!r:.60}; use one of {', '.join(SHAREGPT_ROLES)}")
        items = []
        for k, piece in enumerate(text.split("<image>")):
            if k:
                items.append({"type": "image", "image": next(it)})
            if piece.strip():
                items.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": items})
    return messages


def _is_sharegpt(row: dict) -> bool:
    messages = row.get("messages")
    return "images" in row or "conversations" in row or (isinstance(messages, list) and any(
        isinstance(t, dict) and isinstance(t.get("content"), str) and "<image>" in t["content"] for t in messages))


def normalise_row(row, name: str):
    """One sample of any accepted shape -> chat messages or a text string (``validate_sample`` checks it next)."""
    if isinstance(row, (str, list)):
        return row
    if isinstance(row, dict):
        if _is_sharegpt(row):
            return from_sharegpt(row, name)
        if "messages" in row:
            if not isinstance(row["messages"], list) or not row["messages"]:
                raise CalibrationError(f"{name}: 'messages' must be a non-empty list, got {_kind(row['messages'])}")
            return row["messages"]
        if "text" in row:
            if not isinstance(row["text"], str):
                raise CalibrationError(f"{name}: 'text' must be a string, got {type(row['text']).__name__}")
            return row["text"]
    raise CalibrationError(f"{name}: not a chat sample, a sharegpt row or a text sample; see --calib in the README")


def _captions(path: pathlib.Path) -> Iterator[tuple[str, str, str]]:
    """(image, caption, name) of each line of an image folder's captions.jsonl or captions.tsv."""
    jsonl, tsv = path / "captions.jsonl", path / "captions.tsv"
    if not jsonl.exists() and not tsv.exists():
        raise CalibrationError(f"{path}: an image folder needs captions.jsonl or captions.tsv")
    lines = read_lines_bounded(jsonl if jsonl.exists() else tsv, MAX_JSONL_BYTES, MAX_LINE_BYTES, "captions file")
    for i, line in lines:
        if not line.strip():
            continue
        if jsonl.exists():
            try:
                entry = json.loads(line)
                image, caption = entry["image"], entry["caption"]
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                raise CalibrationError(f"{jsonl}:{i}: expected {{\"image\": ..., \"caption\": ...}}") from None
            yield image, caption, f"captions.jsonl:{i}"
        else:
            image, sep, caption = line.partition("\t")
            if not sep:
                raise CalibrationError(f"{tsv}:{i}: expected file<TAB>caption")
            yield image, caption, f"captions.tsv:{i}"


def _folder(path: pathlib.Path) -> Iterator[tuple[list, str]]:
    """One "describe this image" conversation per captioned image."""
    for image, caption, name in _captions(path):
        prompt = [{"type": "image", "image": image}, {"type": "text", "text": CAPTION_PROMPT}]
        yield [{"role": "user", "content": prompt},
               {"role": "assistant", "content": [{"type": "text", "text": caption}]}], name


def open_hf_dataset(spec: str, split: str, flag: str):
    """A Hugging Face dataset from ``hf:PATH_OR_ID``: a folder saved with save_to_disk (a Dataset, or a DatasetDict
    from which ``split`` is taken) or anything ``load_dataset`` reads. Errors are ValueErrors naming ``flag``."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{flag} hf:...: the datasets package is not installed "
                         "(pip install 'qvlquant[datasets]')") from None
    path = spec[len("hf:"):]
    local = pathlib.Path(path)
    try:
        if (local / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(local))[split]
        if local.exists():
            return datasets.load_from_disk(str(local))
        return datasets.load_dataset(path, split=split)
    except Exception as e:  # datasets raises many types; the message names the problem
        raise ValueError(f"{flag} {spec}: cannot load the dataset ({type(e).__name__}: {e})") from None


def undecoded_images(ds, column: str | None):
    """``ds`` with its image column left as bytes: the datasets library would open them with PIL, every plugin
    allowed (EPS starts Ghostscript); qvlquant's own loader decides the format from the bytes (calib.images)."""
    from datasets import (
        Image,  # optional: the datasets extra; open_hf_dataset checked it is installed
    )

    feature = ds.features.get(column) if column else None
    if isinstance(feature, Image) and feature.decode:
        return ds.cast_column(column, Image(decode=False))
    return ds


def image_item(value, where: str):
    """An undecoded image cell ({"bytes", "path"}) as what calib.images.load_image reads: its bytes as a data URI
    (the format is still decided from the bytes), else its path; anything else (a path string) as it is."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return "data:image/unknown;base64," + base64.b64encode(value["bytes"]).decode("ascii")
        if value.get("path"):
            return value["path"]
        raise CalibrationError(f"{where}: an image cell with neither bytes nor a path")
    return value


def _hf(spec: str, split: str, columns: dict) -> tuple[list, list[str], str | None]:
    try:
        ds = open_hf_dataset(spec, split, "--calib")
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    local = pathlib.Path(spec[len("hf:"):])
    missing = [c for c in columns.values() if c and c not in ds.column_names]
    if missing:
        raise CalibrationError(f"--calib {spec}: no column(s) {missing}; it has {ds.column_names}")
    ds = undecoded_images(ds, columns.get("image"))
    samples = []
    for i, row in enumerate(ds):
        if columns.get("image") and row.get(columns["image"]) is not None:
            content = [{"type": "image", "image": image_item(row[columns["image"]], f"--calib {spec} row {i}")}]
            if columns.get("question"):
                content.append({"type": "text", "text": str(row[columns["question"]])})
            sample = [{"role": "user", "content": content}]
            if columns.get("answer"):
                sample.append({"role": "assistant", "content": [{"type": "text", "text": str(row[columns["answer"]])}]})
        elif columns.get("text"):
            sample = str(row[columns["text"]])
        else:
            raise CalibrationError(f"--calib {spec} row {i}: no image in {columns['image']!r} and no --text-column")
        samples.append(sample)
    return samples, [f"{spec} row {i}" for i in range(len(samples))], str(local.resolve()) if local.exists() else None


def _checked(rows: Iterable[tuple[object, str]]) -> tuple[list, list[str]]:
    """Each (sample, name) checked as it is read, so that a bad row stops the read there; file errors
    (storage.files: not a regular file, over a cap, not UTF-8) become CalibrationErrors."""
    samples, names = [], []
    try:
        for sample, name in rows:
            validate_sample(sample, name)
            samples.append(sample)
            names.append(name)
    except InputFileError as e:
        raise CalibrationError(str(e)) from None
    return samples, names


def load_samples(source: str, num_samples: int, seed: int = 0, split: str = "train",
                 columns: dict | None = None) -> tuple[list, list[str], str | None]:
    """-> (samples, names, image_root). Exactly ``num_samples`` or an error: never a silently smaller set. Every
    sample of the source is checked (``validate_sample``), not only the ones drawn."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise CalibrationError(f"--num-samples must be an integer >= 1, got {num_samples!r}")
    rng = random.Random(seed)
    if source in ("demo", "easyvqa"):
        samples, names = _builtin(source, num_samples, rng)
        return samples, names, None
    path = pathlib.Path(source)
    root = str(path.resolve().parent)
    if is_pickle(path.name):
        raise CalibrationError(f"{path}: pickle-based files are refused; use JSON or JSONL")
    if source.startswith("hf:"):
        cols = {"image": "image", "question": "question", "answer": "answer", "text": None, **(columns or {})}
        samples, names, root = _hf(source, split, cols)
        rows = zip(samples, names)
    elif path.is_dir():
        rows, root = _folder(path), str(path.resolve())
    elif path.is_file():
        rows = _file(path)
    else:
        raise CalibrationError(f"--calib {source!r}: not 'demo', 'easyvqa', hf:..., a folder or an existing .json/.jsonl file")
    samples, names = _checked(rows)
    if len(samples) < num_samples:
        raise CalibrationError(f"{path} holds {len(samples)} samples, fewer than --num-samples {num_samples}")
    order = rng.sample(range(len(samples)), num_samples)
    return [samples[i] for i in order], [names[i] for i in order], root
