"""Copies of the embedded demo model with one thing wrong: an edited config.json, safetensors header or tensor."""

import json
import pathlib
import shutil
import struct

from qvlquant.assets.paths import MODEL_DIR


def demo_copy(folder: pathlib.Path) -> pathlib.Path:
    shutil.copytree(MODEL_DIR, folder)
    return folder


def edit_json(path: pathlib.Path, edit) -> None:
    """``path`` rewritten after ``edit`` changed its JSON in place (what edit returns is ignored)."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_text_config(folder: pathlib.Path, **fields) -> None:
    edit_json(folder / "config.json", lambda c: c["text_config"].update(fields))


def read_raw(path: pathlib.Path) -> tuple[dict, bytes]:
    """(header with metadata, data) of a safetensors file, unchecked."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: pathlib.Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(folder: pathlib.Path, edit) -> None:
    """The demo copy's model.safetensors with ``edit(header)`` applied to its header, the data bytes as they were."""
    path = folder / "model.safetensors"
    header, data = read_raw(path)
    edit(header)
    write_raw(path, header, data)


def drop_tensor(folder: pathlib.Path, key: str) -> None:
    """``key`` gone from the header: its bytes become the gap between its neighbours, so the file stays one that
    safetensors reads only when the tensor was the last; the tensors after it are moved down to keep it valid."""
    path = folder / "model.safetensors"
    header, data = read_raw(path)
    begin, end = header.pop(key)["data_offsets"]
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [o - (end - begin) for o in entry["data_offsets"]]
    write_raw(path, header, data[:begin] + data[end:])


def set_values(folder: pathlib.Path, key: str, index: tuple, value: float) -> None:
    """One element of tensor ``key`` set to ``value`` (NaN, inf), the file rewritten by safetensors."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors[key][index] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
