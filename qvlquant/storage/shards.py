"""Safetensors files read and written one tensor at a time, so that memory holds one tensor, never a checkpoint.

The format is 8 bytes of little-endian header length, a JSON header (name -> dtype, shape, byte offsets), then the
raw bytes. ``ShardReader`` parses the headers of a checkpoint folder (one file or an index of shards) and reads a
tensor with one positioned read into a fresh tensor: no mmap, so the checkpoint never counts towards the
process's resident memory. ``write_safetensors`` writes a file from a list of (name, dtype, shape) and a function
that fetches each tensor when its turn comes; its bytes are exactly those of ``safetensors.torch.save_file`` for
the same tensors (same order, header and padding: tested), so streamed and in-memory exports are identical.

Why not huggingface_hub's ``save_torch_state_dict``: it takes a state dict of real tensors and writes each shard with
``safetensors.torch.save_file``, so a whole shard (up to ``max_shard_size``) sits in memory at once; the export holds
one tensor. ``split_torch_state_dict_into_shards`` only plans (names and sizes) and does accept meta tensors, so it
could replace ``export.plan_shards``; writing stays here.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import struct
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from qvlquant.storage.manifest import is_pickle

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
}
NAMES = {v: k for k, v in DTYPES.items()}
# safetensors orders the data by dtype (its enum order, largest rank first), then by name
_RANK = {name: i for i, name in enumerate(["BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"])}


class ShardError(ValueError):
    """A checkpoint file or folder is missing, malformed, or not safetensors; the message names the file."""


def read_header(path: pathlib.Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} of one safetensors file (metadata left out)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                raise ShardError(f"{path}: header of {n} bytes; not a safetensors file")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise ShardError(f"{path}: cannot read it as safetensors ({e})") from None
    header.pop("__metadata__", None)
    return header


def checkpoint_files(folder: pathlib.Path) -> list[str]:
    """The weight files of a checkpoint folder: the shards its index names, or model.safetensors. Pickle
    checkpoints, stray shards and missing shards are errors naming the file."""
    index = folder / INDEX
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ShardError(f"{index}: unreadable index ({e})") from None
        stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in files)
        if stray:
            raise ShardError(f"{folder}: {stray} are not in {INDEX} (mixed checkpoints?)")
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: shard {missing[0]} listed in the index is missing")
        return files
    if (folder / SINGLE).is_file():
        return [SINGLE]
    pickles = sorted(p.name for p in folder.iterdir() if is_pickle(p.name)) if folder.is_dir() else []
    hint = f" (found {pickles}: pickle checkpoints are refused; convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX}{hint}")


class ShardReader:
    """The tensors of a checkpoint folder, by checkpoint key, read one at a time from disk."""

    def __init__(self, folder: str | os.PathLike, files: list[str] | None = None):
        """``files``: read these files of ``folder`` instead of its checkpoint (index or model.safetensors)."""
        self.folder = pathlib.Path(folder)
        self.where: dict[str, tuple[pathlib.Path, dict]] = {}
        for name in checkpoint_files(self.folder) if files is None else files:
            path = self.folder / name
            data_start = 8 + struct.unpack("<Q", path.open("rb").read(8))[0]
            for key, entry in read_header(path).items():
                self.where[key] = (path, dict(entry, start=data_start))

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self._entry(key)[1]
        return DTYPES[entry["dtype"]], tuple(entry["shape"])

    def get(self, key: str) -> torch.Tensor:
        path, entry = self._entry(key)
        begin, end = entry["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(entry["start"] + begin)
            if f.readinto(memoryview(buf.numpy())) != end - begin:
                raise ShardError(f"{path}: {key} is truncated")
        return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def get_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of the 2-D tensor ``key`` (an embedding table), one positioned read each. -> [len, D]."""
        path, entry = self._entry(key)
        dtype, (n, d) = DTYPES[entry["dtype"]], entry["shape"]
        size = d * torch.tensor([], dtype=dtype).element_size()
        out = torch.empty(len(rows), size, dtype=torch.uint8)
        with open(path, "rb") as f:
            for j, r in enumerate(rows):
                if not 0 <= r < n:
                    raise ShardError(f"{path}: row {r} of {key} is outside its {n} rows")
                f.seek(entry["start"] + entry["data_offsets"][0] + r * size)
                f.readinto(memoryview(out[j].numpy()))
        return out.view(dtype).reshape(len(rows), d)

    def _entry(self, key: str):
        try:
            return self.where[key]
        except KeyError:
            raise ShardError(f"{self.folder}: the checkpoint has no tensor {key!r}") from None


def _layout(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[tuple[str, str, list[int], int]]:
    """(name, dtype name, shape, bytes) in the order safetensors stores them."""
    rows = []
    for name, dtype, shape in entries:
        size = torch.tensor([], dtype=dtype).element_size()
        for d in shape:
            size *= d
        rows.append((name, NAMES[dtype], list(shape), size))
    return sorted(rows, key=lambda r: (-_RANK[r[1]], r[0]))


def write_safetensors(path: pathlib.Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                      fetch: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``path`` holding the tensors ``entries`` names; ``fetch(name)`` is called once per tensor, in file
    order, and its result released before the next one. A full disk is an error naming the file."""
    rows = _layout(entries)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, size in rows:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name, dtype, shape, size in rows:
                t = fetch(name)
                if NAMES.get(t.dtype) != dtype or list(t.shape) != shape:
                    raise ShardError(f"{path}: {name} is {t.dtype} {list(t.shape)}, planned {dtype} {shape}")
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
                del t
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"no space left on device writing {path}; free space there and rerun "
                          "(finished layers are kept and resume)") from None
        raise


def read_checkpoint_header(folder: pathlib.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) for every tensor of the checkpoint in ``folder`` (one file or an index)."""
    index = folder / "model.safetensors.index.json"
    if not index.exists() and not (folder / "model.safetensors").exists():
        pickles = sorted(p.name for p in folder.iterdir() if is_pickle(p.name)) if folder.is_dir() else []
        found = f"it holds pickle weights {pickles}, which qvlquant never reads" if pickles else "it holds none"
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json ({found}); "
                                "qvlquant reads safetensors checkpoints only")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return out
