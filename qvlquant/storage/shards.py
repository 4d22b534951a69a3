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
import hashlib
import json
import os
import pathlib
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import torch

from qvlquant.storage.files import read_text_bounded
from qvlquant.storage.manifest import is_pickle, remember_digest

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
}
# FP8 exports hold e4m3 weights: read from an export (``ShardReader(..., dtypes=EXPORT_DTYPES)``), never from a
# base model, which must be full precision
EXPORT_DTYPES = {**DTYPES, "F8_E4M3": torch.float8_e4m3fn}
NAMES = {v: k for k, v in EXPORT_DTYPES.items()}
# safetensors orders the data by dtype (its enum order, largest rank first), then by name
_RANK = {name: i for i, name in enumerate(["BOOL", "U8", "I8", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64",
                                           "I64"])}


# safetensors' dtypes (its Dtype enum) and their bits per element: every file's header is checked against these;
# DTYPES are the ones qvlquant reads
BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
        "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64,
        "C64": 64}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
MAX_INDEX_BYTES = 64 * 2**20  # a 72B model's index is about 100 KB


class ShardError(ValueError):
    """A checkpoint file or folder is missing, malformed, or not safetensors; the message names the file."""


def read_header(path: pathlib.Path, readable: bool = True) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} of one safetensors file (metadata left out), checked
    (``parse_header``)."""
    return parse_header(path, readable)[1]


def parse_header(path: pathlib.Path, readable: bool = True, dtypes: dict = DTYPES) -> tuple[int, dict[str, dict]]:
    """(where the data starts, name -> entry) of one safetensors file, refused (ShardError naming the file and the
    tensor) wherever safetensors itself would refuse it: a header that is not a JSON object or runs past the end,
    an unknown dtype, a size that is not dtype x shape, tensors that overlap, leave gaps or run past the end of the
    file. ``readable``: also refuse dtypes qvlquant does not read (``dtypes``: DTYPES, a base model's; float8 and
    the like are refused)."""
    header, n, size = _json_header(path)
    header.pop("__metadata__", None)
    entries = {name: _entry(path, name, e, dtypes if readable else None) for name, e in header.items()}
    _check_layout(path, entries, size - 8 - n)
    return 8 + n, entries


def read_metadata(path: pathlib.Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} when it has none): strings to strings, as safetensors
    requires, else a ShardError naming the file."""
    meta = _json_header(path)[0].get("__metadata__")
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ShardError(f"{path}: its __metadata__ must map names to strings")
    return meta


def _json_header(path: pathlib.Path) -> tuple[dict, int, int]:
    """(the header as JSON, its length, the file's size), the length checked against the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ShardError(f"{path}: {size} bytes; a safetensors file starts with 8 bytes of header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ShardError(f"{path}: header of {n} bytes in a file of {size}; not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise ShardError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise ShardError(f"{path}: its header is not JSON; not a safetensors file") from None
    if not isinstance(header, dict):
        raise ShardError(f"{path}: its header is not a JSON object; not a safetensors file")
    return header, n, size


def _entry(path: pathlib.Path, name: str, e, readable: dict | None) -> dict:
    """One header entry, checked on its own: dtype, shape, offsets, and size = dtype x shape."""
    if not isinstance(e, dict):
        raise ShardError(f"{path}: tensor {name!r:.100}: not an entry of dtype, shape and data_offsets")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in BITS:
        raise ShardError(f"{path}: tensor {name!r:.100} has dtype {dtype!r:.40}, not one of safetensors'")
    if readable is not None and dtype not in readable:
        raise ShardError(f"{path}: tensor {name!r:.100} is {dtype}, which qvlquant does not read (it reads "
                         f"{', '.join(readable)}); quantize the bf16 / fp16 / fp32 base model instead")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise ShardError(f"{path}: tensor {name!r:.100}: shape {shape!r:.60} must be a list of whole numbers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets) or \
            offsets[0] > offsets[1]:
        raise ShardError(f"{path}: tensor {name!r:.100}: data_offsets {offsets!r:.60} must be [begin, end], "
                         "0 <= begin <= end")
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * BITS[dtype]
    if expected % 8 or offsets[1] - offsets[0] != expected // 8:
        raise ShardError(f"{path}: tensor {name!r:.100}: {offsets[1] - offsets[0]} bytes for {dtype} {shape} "
                         f"({expected / 8:g} bytes); the file is corrupt")
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: pathlib.Path, entries: dict[str, dict], data_size: int) -> None:
    """The tensors tile the data exactly, as safetensors requires: in offset order, each begins where the one
    before ends, and the last ends at the end of the file."""
    end, before = 0, None
    for name, e in sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin = e["data_offsets"][0]
        if begin < end:
            raise ShardError(f"{path}: tensors {before!r:.100} and {name!r:.100} overlap (bytes {begin} to {end}); "
                             "the file is corrupt")
        if begin > end:
            raise ShardError(f"{path}: {begin - end} bytes between {before!r:.100} and {name!r:.100} belong to no "
                             "tensor; the file is corrupt")
        end, before = e["data_offsets"][1], name
    if end > data_size:
        raise ShardError(f"{path}: the header places tensor data up to byte {end} after it, the file holds "
                         f"{data_size}: truncated, or not a safetensors file")
    if end < data_size:
        raise ShardError(f"{path}: {data_size - end} bytes after the last tensor belong to no tensor; the file is "
                         "corrupt")


def index_files(index: pathlib.Path) -> list[str]:
    """The shard file names a ``model.safetensors.index.json`` maps tensors to: plain names of files beside it
    (``../x``, an absolute path or a sub-folder is refused; a plain name that is a symlink, as in the Hugging Face
    cache, is followed)."""
    try:
        data = json.loads(read_text_bounded(index, MAX_INDEX_BYTES, "checkpoint index"))
    except (ValueError, RecursionError) as e:
        raise ShardError(f"{index}: not JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise ShardError(f"{index}: not a JSON object with a weight_map (tensor name -> shard file)")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ShardError(f"{index}: weight_map must map tensor names to shard file names")
    files = sorted(set(weight_map.values()))
    for name in files:
        _plain_name(index.parent, name, index)
    return files


def _plain_name(folder: pathlib.Path, name: str, where: pathlib.Path) -> None:
    inside = name not in ("", ".", "..") and not any(c in name for c in "/\\\0") and \
        (folder / name).parent.resolve() == folder.resolve()
    if not inside:
        raise ShardError(f"{where}: shard {name!r:.100} is not a plain file name inside {folder}; an index may only "
                         "name files beside it")


def checkpoint_files(folder: pathlib.Path) -> list[str]:
    """The weight files of a checkpoint folder: the shards its index names, or model.safetensors. Pickle
    checkpoints, stray shards, missing shards and index entries outside the folder are errors naming the file."""
    index = folder / INDEX
    if index.exists():
        files = index_files(index)
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

    def __init__(self, folder: str | os.PathLike, files: list[str] | None = None, dtypes: dict = DTYPES):
        """``files``: read these files of ``folder`` instead of its checkpoint (index or model.safetensors);
        ``dtypes``: those it may hold (a base model's; EXPORT_DTYPES for an FP8 export)."""
        self.folder = pathlib.Path(folder)
        self.where: dict[str, tuple[pathlib.Path, dict]] = {}
        for name in checkpoint_files(self.folder) if files is None else files:
            path = self.folder / name
            data_start, header = parse_header(path, dtypes=dtypes)
            for key, entry in header.items():
                self.where[key] = (path, dict(entry, start=data_start))

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self._entry(key)[1]
        return EXPORT_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def get(self, key: str) -> torch.Tensor:
        path, entry = self._entry(key)
        begin, end = entry["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(entry["start"] + begin)
            if f.readinto(memoryview(buf.numpy())) != end - begin:
                raise ShardError(f"{path}: {key} is truncated")
        return buf.view(EXPORT_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def get_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Entries ``rows`` of the first axis of tensor ``key`` (rows of an embedding table, experts of a fused
        [E, ...] tensor), one positioned read each. -> [len(rows), *its other axes]."""
        path, entry = self._entry(key)
        dtype, (n, *inner) = EXPORT_DTYPES[entry["dtype"]], entry["shape"]
        size = int(torch.Size(inner).numel()) * torch.tensor([], dtype=dtype).element_size()
        out = torch.empty(len(rows), size, dtype=torch.uint8)
        with open(path, "rb") as f:
            for j, r in enumerate(rows):
                if not 0 <= r < n:
                    raise ShardError(f"{path}: row {r} of {key} is outside its {n} rows")
                f.seek(entry["start"] + entry["data_offsets"][0] + r * size)
                if f.readinto(memoryview(out[j].numpy())) != size:
                    raise ShardError(f"{path}: {key} is truncated")
        return out.view(dtype).reshape(len(rows), *inner)

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


def file_order(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[str]:
    """The names of ``entries`` in the order ``write_safetensors`` fetches and stores them."""
    return [row[0] for row in _layout(entries)]


def write_safetensors(path: pathlib.Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                      fetch: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``path`` holding the tensors ``entries`` names; ``fetch(name)`` is called once per tensor, in file
    order, one call at a time, in a worker thread one tensor ahead of the writing: the next tensor is read (and, in
    a data-free export, quantized) while this one is written, so memory holds two fetched tensors, each released
    once written. A fetch's error is raised here. A full disk is an error naming the file."""
    rows = _layout(entries)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, size in rows:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    try:
        digest = hashlib.sha256()  # of the bytes as written: the manifest's, without reading the file back
        with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="fetch") as ahead:
            f.write(head := struct.pack("<Q", len(text)) + text)
            digest.update(head)
            pending = ahead.submit(fetch, rows[0][0]) if rows else None
            for i, (name, dtype, shape, size) in enumerate(rows):
                t = pending.result()
                pending = ahead.submit(fetch, rows[i + 1][0]) if i + 1 < len(rows) else None
                if NAMES.get(t.dtype) != dtype or list(t.shape) != shape:
                    raise ShardError(f"{path}: {name} is {t.dtype} {list(t.shape)}, planned {dtype} {shape}")
                data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                f.write(data)
                digest.update(data)
                del t, data
        remember_digest(path, digest.hexdigest())
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"no space left on device writing {path}; free space there and rerun "
                          "(finished layers are kept and resume)") from None
        raise


def read_checkpoint_header(folder: pathlib.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name) for every tensor of the checkpoint in ``folder`` (one file or an index), from
    the checked headers (``parse_header``; any safetensors dtype, float8 included)."""
    index = folder / INDEX
    if not index.exists() and not (folder / SINGLE).exists():
        pickles = sorted(p.name for p in folder.iterdir() if is_pickle(p.name)) if folder.is_dir() else []
        found = f"it holds pickle weights {pickles}, which qvlquant never reads" if pickles else "it holds none"
        raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX} ({found}); qvlquant reads safetensors "
                                "checkpoints only")
    out = {}
    for name in index_files(index) if index.exists() else [SINGLE]:
        for key, e in read_header(folder / name, readable=False).items():
            out[key] = (tuple(e["shape"]), e["dtype"])
    return out
