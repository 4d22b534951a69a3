"""Where finished layers go: in memory, or into ``.<output>.partial/`` on disk, from which an interrupted run resumes.

A layer's record is what the export needs of it and nothing more: the packed tensors of its linears and its other
parameters (norms, biases, AWQ-folded norms) in the storage dtype, under checkpoint names. On disk each finished
layer is one ``layer_NNNN.safetensors`` (written, then renamed), followed by ``inputs.safetensors``: the hidden
states the next layer receives, so a rerun starts at the next layer directly, without replaying the earlier ones.
Everything sits under a fingerprint of what decides the result (settings, the calibration batches' contents, the
base checkpoint's sha256); a different fingerprint is refused rather than mixed in. Each record carries the sha256
of its tensors and metadata in its own metadata (``record_digest``), and a rerun checks every record it resumes from
against it, so a flipped byte is an error naming the file, never part of an export. The export reads the records
tensor by tensor, and the folder is removed once the export is in place. Only one run at a time uses the folder
(``qvlquant.storage.lock``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil

import torch

from qvlquant.parallel.distributed import (
    World,
    broadcast_json,
    recv_tensors,
    send_tensors,
)
from qvlquant.storage.files import read_text_bounded
from qvlquant.storage.manifest import sha256
from qvlquant.storage.shards import (
    ShardError,
    ShardReader,
    checkpoint_files,
    read_metadata,
    write_safetensors,
)

FINGERPRINT = "fingerprint.json"
INPUTS = "inputs.safetensors"
CHECKSUM = "sha256"  # the metadata entry holding a record's checksum


class DamagedRecord(ValueError):
    """A file of the partial folder does not hold what this run wrote into it."""


@dataclasses.dataclass
class LayerRecord:
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # checkpoint key -> export tensor
    info: dict[str, dict] = dataclasses.field(default_factory=dict)  # linear -> what the method recorded
    in_features: dict[str, int] = dataclasses.field(default_factory=dict)  # linear -> K (to unpack its codes)
    aux: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # AWQ's folded scales, not exported
    seconds: float = 0.0


class MemoryStore:
    """Finished layers kept in memory (packed: an eighth of float32 at 4 bits). For models already in memory."""

    def __init__(self):
        self.records: dict[int, LayerRecord] = {}

    def resume_point(self) -> tuple[int, None]:
        return 0, None

    def save(self, i: int, record: LayerRecord, hidden: list[torch.Tensor]) -> None:
        self.records[i] = record

    def finished(self) -> list[int]:
        return sorted(self.records)

    def load(self, i: int) -> LayerRecord:
        return self.records[i]

    def load_info(self, i: int) -> dict:
        return self.records[i].info

    def tensor_meta(self, i: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {k: (t.dtype, tuple(t.shape)) for k, t in self.records[i].tensors.items()}

    def get(self, i: int, key: str) -> torch.Tensor:
        return self.records[i].tensors[key]

    def remove(self) -> None:
        self.records.clear()


class DiskStore:
    """Finished layers in ``folder`` (``.<output>.partial``), resumable under ``fingerprint``."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        self.folder = pathlib.Path(folder)
        self.fingerprint = fingerprint
        stamp = self.folder / FINGERPRINT
        if self.folder.exists() and not stamp.exists():
            raise FileExistsError(f"{self.folder} exists but is not a qvlquant partial run (no {FINGERPRINT}); "
                                  "move it away or choose another --output")
        if stamp.exists() and _read_stamp(stamp) != fingerprint:
            raise ValueError(
                f"{self.folder} holds a partial run of a different model, calibration set or settings; "
                "rerun with the same settings to resume, or pass --no-resume to start over"
            )
        self._readers: dict[int, ShardReader] = {}

    def path(self, i: int) -> pathlib.Path:
        return self.folder / f"layer_{i:04d}.safetensors"

    def resume_point(self) -> tuple[int, list[torch.Tensor] | None]:
        """(first layer to quantize, the hidden states it receives) from the last layer whose inputs were saved;
        every record resumed from is checked against its checksum first (``DamagedRecord`` naming the file)."""
        last = self._last()
        if last is None:
            return 0, None
        for i in range(last + 1):
            _verified(self.path(i))  # read back here once; what this process writes itself is not
        hidden = _verified(self.folder / INPUTS)
        return last + 1, [hidden[f"hidden.{b}"] for b in range(len(hidden))]

    def _last(self) -> int | None:
        path = self.folder / INPUTS
        if not path.exists():
            return None
        last = _stored(path, "layer", int)
        if last < 0:
            raise PartialRunError(f"{path}: layer {last} is no layer; {NO_RESUME}")
        return last if all(self.path(i).exists() for i in range(last + 1)) else None

    def finished(self) -> list[int]:
        last = self._last()
        return [] if last is None else list(range(last + 1))

    def save(self, i: int, record: LayerRecord, hidden: list[torch.Tensor]) -> None:
        if not (self.folder / FINGERPRINT).exists():  # created with the first finished layer
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / FINGERPRINT).write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n")
        tensors = {f"t.{k}": v for k, v in record.tensors.items()} | {f"aux.{k}": v for k, v in record.aux.items()}
        meta = {"info": json.dumps(record.info), "in_features": json.dumps(record.in_features),
                "seconds": str(record.seconds)}
        _write_atomic(self.path(i), tensors, meta)
        _write_atomic(self.folder / INPUTS, {f"hidden.{b}": h for b, h in enumerate(hidden)},
                      {"layer": json.dumps(i)})
        self._readers.pop(i, None)

    def _reader(self, i: int) -> ShardReader:
        if i not in self._readers:
            self._readers = {i: _open(self.folder, self.path(i).name)}  # one layer's header at a time
        return self._readers[i]

    def load(self, i: int) -> LayerRecord:
        reader, path = self._reader(i), self.path(i)
        tensors = {k[2:]: reader.get(k) for k in reader.keys() if k.startswith("t.")}
        aux = {k[4:]: reader.get(k) for k in reader.keys() if k.startswith("aux.")}
        return LayerRecord(tensors, _stored(path, "info", dict), _stored(path, "in_features", dict), aux,
                           float(_stored(path, "seconds", (int, float))))

    def load_info(self, i: int) -> dict:
        return _stored(self.path(i), "info", dict)

    def tensor_meta(self, i: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        reader = self._reader(i)
        return {k[2:]: reader.meta(k) for k in reader.keys() if k.startswith("t.")}

    def get(self, i: int, key: str) -> torch.Tensor:
        return self._reader(i).get(f"t.{key}")

    def remove(self) -> None:
        self.discard(self.folder)

    @staticmethod
    def discard(folder: pathlib.Path) -> None:
        """Delete a partial folder, whatever run it holds: only when it is ours (holds the fingerprint stamp)."""
        if (pathlib.Path(folder) / FINGERPRINT).exists():
            shutil.rmtree(folder)


class RankStore:
    """The store as one rank of a distributed run sees it. Rank 0 holds the real store (``inner``) and saves, after
    each layer, every batch's hidden states in batch order, received from the ranks that ran them, so the partial
    folder is the one a single process writes (and resumes with any number of processes). The other ranks send
    theirs and keep nothing; on resume rank 0 sends each rank its batches' states."""

    def __init__(self, inner: DiskStore | None, world: World, shards: list[range]):
        self.inner, self.world, self.shards = inner, world, shards

    def resume_point(self) -> tuple[int, list[torch.Tensor] | None]:
        world = self.world
        start, hidden = self.inner.resume_point() if world.leader else (None, None)
        start, resumed = broadcast_json([start, hidden is not None] if world.leader else None, 0, world)
        if not resumed:
            return start, None
        if world.leader:
            for r in range(1, world.size):
                send_tensors({f"hidden.{b}": hidden[b].cpu() for b in self.shards[r]}, r)
            return start, [hidden[b] for b in self.shards[0]]
        got = recv_tensors(0)
        return start, [got[f"hidden.{b}"] for b in self.shards[world.rank]]

    def save(self, i: int, record: LayerRecord, hidden: list[torch.Tensor]) -> None:
        world = self.world
        if not world.leader:
            send_tensors({f"hidden.{b}": h.cpu() for b, h in zip(self.shards[world.rank], hidden)}, 0)
            return
        everyone = list(hidden)
        for r in range(1, world.size):
            got = recv_tensors(r)
            everyone += [got[f"hidden.{b}"] for b in self.shards[r]]
        self.inner.save(i, record, everyone)

    # what the export and the report read: rank 0's store
    def finished(self) -> list[int]:
        return self._leader("finished").finished()

    def load(self, i: int) -> LayerRecord:
        return self._leader("load").load(i)

    def load_info(self, i: int) -> dict:
        return self._leader("load_info").load_info(i)

    def tensor_meta(self, i: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return self._leader("tensor_meta").tensor_meta(i)

    def get(self, i: int, key: str) -> torch.Tensor:
        return self._leader("get").get(i, key)

    def remove(self) -> None:
        self._leader("remove").remove()

    def _leader(self, what: str) -> DiskStore:
        if self.inner is None:
            raise RuntimeError(f"rank {self.world.rank} keeps no finished layers (only rank 0 does): {what}")
        return self.inner


NO_RESUME = "pass --no-resume to start over"


class PartialRunError(ValueError):
    """A file of the partial folder that is not as qvlquant writes it (edited, damaged, another tool's); the message
    names the file and the way out."""


def _read_stamp(stamp: pathlib.Path) -> str:
    """The fingerprint a partial folder's stamp holds."""
    try:
        data = json.loads(read_text_bounded(stamp, 1 << 16, "partial-run stamp"))
    except (ValueError, RecursionError):
        data = None
    fingerprint = data.get("fingerprint") if isinstance(data, dict) else None
    if not isinstance(fingerprint, str):
        raise PartialRunError(f"{stamp}: not the stamp of a partial run (a JSON object with a fingerprint); "
                              f"{NO_RESUME}")
    return fingerprint


def _open(folder: pathlib.Path, name: str) -> ShardReader:
    try:
        return ShardReader(folder, [name])
    except ShardError as e:
        raise PartialRunError(f"{e}; {NO_RESUME}") from None


def _metadata(path: pathlib.Path) -> dict[str, str]:
    """A safetensors file's metadata entry ({} when it has none)."""
    try:
        return read_metadata(path)
    except ShardError as e:
        raise PartialRunError(f"{e}; {NO_RESUME}") from None


def _stored(path: pathlib.Path, key: str, kinds):
    """The JSON value ``key`` of a partial file's metadata, of a type in ``kinds`` (never a bool)."""
    meta = _metadata(path)
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError, RecursionError):
        value = None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise PartialRunError(f"{path}: its metadata {key!r} is missing or of the wrong type; {NO_RESUME}")
    return value


def _hash_tensors(h, tensors: dict[str, torch.Tensor]) -> None:
    """Feed ``h`` each tensor's name, dtype, shape and bytes, in name order."""
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # read in place: no copy of a large hidden state


def record_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of a record: its metadata, then its tensors."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    _hash_tensors(h, tensors)
    return h.hexdigest()


def _write_atomic(path: pathlib.Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a record with its checksum among its metadata, then rename it into place (one rename: a kill leaves
    the old record or the new one, each with its own checksum)."""
    tmp = path.with_name(path.name + ".tmp")
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    write_safetensors(tmp, entries, tensors.__getitem__, {**metadata, CHECKSUM: record_digest(tensors, metadata)})
    os.replace(tmp, path)


def _verified(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """A record's tensors, read back whole and checked against the checksum it was written with."""
    redo = "rerun with --no-resume to start over"
    try:
        metadata = _metadata(path)
        reader = ShardReader(path.parent, [path.name])
        tensors = {k: reader.get(k) for k in reader.keys()}
    except (OSError, ValueError, KeyError) as e:
        raise DamagedRecord(f"{path}: cannot be read back ({e}); {redo}") from None
    expected = metadata.pop(CHECKSUM, None)
    if expected is None:
        raise DamagedRecord(f"{path}: has no checksum (written by an earlier qvlquant); {redo}")
    if expected != record_digest(tensors, metadata):
        raise DamagedRecord(f"{path}: its contents do not match the checksum written with it (changed or damaged "
                            f"since it was written); {redo}")
    return tensors


def settings_fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def batches_digest(batches: list[dict]) -> str:
    """sha256 of every calibration batch tensor (names, dtypes, shapes, bytes): the samples' texts, images and
    processing settings all end up here, so an edited file or image changes it."""
    h = hashlib.sha256()
    for b in batches:
        _hash_tensors(h, b)
    return h.hexdigest()


def _cache_path() -> pathlib.Path:
    root = os.environ.get("QVLQUANT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                             os.path.expanduser("~/.cache"), "qvlquant")
    return pathlib.Path(root) / "sha256.json"


def cache_key(path: pathlib.Path) -> str:
    """What identifies a file's contents without reading them: where it is (path, device, inode), its size and its
    mtime, which a user can set back (``os.utime``, ``touch -d``), and its ctime, which only the kernel sets (to now,
    on every write, and on ``utime`` itself). The remaining risk is in RELIABILITY.md 48."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_dev}:{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def file_sha256(path: pathlib.Path) -> str:
    """sha256 of a file, cached under ``cache_key``: a 15 GB checkpoint is hashed once (see the README for what
    that costs), later runs read the cache."""
    key = cache_key(path)
    cache_file = _cache_path()
    cache = _read_cache(cache_file)
    if key not in cache:
        cache[key] = sha256(path)
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # an unwritable cache only costs the hash again next time
    return cache[key]


def _read_cache(path: pathlib.Path) -> dict[str, str]:
    """The hash cache: key -> sha256 hex digest; anything else in it (a list, bad JSON, an entry that is no digest)
    is dropped: a cache only saves time, so a damaged one costs a hash, never a wrong fingerprint."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)}


def model_digest(folder: pathlib.Path) -> dict:
    """config.json's hash and the sha256 of each weight file."""
    return {
        "config": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        "weights": {name: file_sha256(folder / name) for name in checkpoint_files(folder)},
    }
