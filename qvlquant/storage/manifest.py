"""The sha256 manifest every qvlquant export carries, and what counts as one.

``qvlquant_manifest.json`` lists each file the export wrote, by plain file name (no folder part, no ``..``), with its
sha256 and size. Loading, ``inspect`` and ``push`` verify it; ``--output`` replaces an existing folder only when it is
a qvlquant export (``is_qvlquant_export``). The one list of pickle suffixes qvlquant refuses everywhere lives here.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

MANIFEST = "qvlquant_manifest.json"
# Refused as inputs and as outputs, in every command: safetensors only. Compare lower-cased names against it.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ManifestError(ValueError):
    """An export whose manifest is malformed, names a path outside the export, or does not match its files."""


class ManifestFileMissing(ManifestError, FileNotFoundError):
    """A file the manifest lists is not in the export."""


# sha256 of files this process has just written, computed from the bytes as they were written
# (``shards.write_safetensors``): file identity (device, inode, size, modification time) -> digest. Read once, by the
# manifest of the export being written (``manifest_entry``), so 7 GB of shards are not read back to be hashed;
# verification always reads the file.
_WRITTEN: dict[tuple[int, int, int, int], str] = {}


def _identity(path: os.PathLike | str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def remember_digest(path: os.PathLike | str, digest: str) -> None:
    """Record ``digest``, the sha256 of the bytes this process wrote to ``path`` (closed, unchanged since)."""
    _WRITTEN[_identity(path)] = digest


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def is_plain_name(name) -> bool:
    """A file name with no folder part: not empty, not ``.``/``..``, no ``/`` or ``\\``, no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and pathlib.PurePath(name).name == name)


def manifest_entry(path: pathlib.Path) -> dict:
    """The file's sha256 and size: the digest taken while it was written when there is one (``remember_digest``,
    the same file unchanged), else read from the file."""
    digest = _WRITTEN.pop(_identity(path), None)
    return {"sha256": digest or sha256(path), "bytes": path.stat().st_size}


def dump_manifest(files: dict[str, dict]) -> str:
    """The manifest's text: the exact bytes every export has written so far."""
    return json.dumps({"files": files}, indent=2) + "\n"


def write_manifest(folder: pathlib.Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    (folder / MANIFEST).write_text(dump_manifest({p.name: manifest_entry(p) for p in files}))


def read_manifest(folder: pathlib.Path) -> dict[str, dict]:
    """name -> {"sha256", "bytes"}, after checking the manifest's shape and that every name is a plain file name."""
    path = pathlib.Path(folder) / MANIFEST
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: not a qvlquant manifest ({type(e).__name__}: {e}); re-export the model") from None
    if not isinstance(files, dict):
        raise ManifestError(f"{path}: 'files' must map file names to hashes; re-export the model")
    for name, entry in files.items():
        if not is_plain_name(name) or name == MANIFEST:
            raise ManifestError(f"{path}: entry {name!r} is not a plain file name inside the export (refused)")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ManifestError(f"{path}: entry {name!r} has no sha256; re-export the model")
    return files


def verify_manifest(folder: pathlib.Path) -> None:
    """Every file the manifest lists is a regular file of the export with its recorded size and hash; a checkpoint
    without manifest passes (not ours)."""
    folder = pathlib.Path(folder)
    if not (folder / MANIFEST).exists():
        return
    for name, entry in read_manifest(folder).items():
        f = folder / name
        if not os.path.lexists(f):
            raise ManifestFileMissing(f"{folder}: {name} is listed in {MANIFEST} but missing")
        if f.is_symlink() or not f.is_file():
            raise ManifestError(f"{folder}: {name} is not a regular file (a link or folder); re-export the model")
        if "bytes" in entry and f.stat().st_size != entry["bytes"]:
            raise ManifestError(f"{folder}: {name} has {f.stat().st_size} bytes, {MANIFEST} records {entry['bytes']} "
                                "(does not match its sha256: truncated or edited)")
        if sha256(f) != entry["sha256"]:
            raise ManifestError(f"{folder}: {name} does not match its sha256 in {MANIFEST} (corrupted or edited)")


def is_qvlquant_export(folder: pathlib.Path) -> bool:
    """A folder (not a link) holding a well-formed qvlquant manifest. Says nothing about whether it verifies."""
    folder = pathlib.Path(folder)
    if folder.is_symlink() or not folder.is_dir() or not (folder / MANIFEST).is_file():
        return False
    try:
        read_manifest(folder)
    except ManifestError:
        return False
    return True


def unlisted_entries(folder: pathlib.Path) -> list[str]:
    """Names in an export folder that its manifest does not list (files or folders someone else put there)."""
    listed = set(read_manifest(folder)) | {MANIFEST}
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if p.name not in listed)


def update_entry(folder: pathlib.Path, name: str) -> None:
    """Re-hash one listed file after qvlquant itself rewrote it (``inspect --repair``); the manifest is replaced
    atomically and every other entry is kept as it was."""
    files = read_manifest(folder)
    if name not in files:
        raise ManifestError(f"{folder}: {name} is not listed in {MANIFEST}")
    files[name] = manifest_entry(pathlib.Path(folder) / name)
    atomic_write_text(pathlib.Path(folder) / MANIFEST, dump_manifest(files))


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Write ``path`` through a temporary file beside it, so a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
