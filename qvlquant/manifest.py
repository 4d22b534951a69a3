"""The sha256 manifest every qvlquant export carries, and what counts as one.

``qvlquant_manifest.json`` lists each file the export wrote, by plain file name, with its sha256 and size. Loading,
``inspect`` and ``push`` verify it; ``--output`` replaces an existing folder only when it holds one. The one list of
pickle suffixes qvlquant refuses everywhere lives here too.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

MANIFEST = "qvlquant_manifest.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # refused as inputs and outputs: safetensors only


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: pathlib.Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"files": {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify_manifest(folder: pathlib.Path) -> None:
    """Every file the manifest lists exists with its recorded hash; a checkpoint without manifest passes (not ours)."""
    path = pathlib.Path(folder) / MANIFEST
    if not path.exists():
        return
    for name, entry in json.loads(path.read_text())["files"].items():
        f = pathlib.Path(folder) / name
        if not f.exists():
            raise FileNotFoundError(f"{folder}: {name} is listed in {MANIFEST} but missing")
        if sha256(f) != entry["sha256"]:
            raise ValueError(f"{folder}: {name} does not match its sha256 in {MANIFEST} (corrupted or edited)")
