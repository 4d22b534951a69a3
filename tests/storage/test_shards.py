"""Safetensors written and read one tensor at a time: the bytes of safetensors' own save_file, exactly."""

import errno
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qvlquant.storage import shards
from qvlquant.storage.shards import (
    ShardError,
    ShardReader,
    checkpoint_files,
    write_safetensors,
)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 4, generator=g).bfloat16(), "a.x": torch.arange(5, dtype=torch.int32),
        "c": torch.randn(2, 2, generator=g), "z.h": torch.ones(1, dtype=torch.float16),
        "i64": torch.tensor([1, -2]), "u8": torch.arange(3, dtype=torch.uint8), "flag": torch.tensor([True, False]),
        "i8": torch.tensor([-1, 2], dtype=torch.int8), "i16": torch.tensor([7, -7], dtype=torch.int16),
        "f64": torch.tensor([1.5, 2.5], dtype=torch.float64), "scalar": torch.tensor(3.0),
    }


def test_streamed_file_is_byte_identical_to_save_file(tmp_path):
    t = sample_tensors()
    save_file(t, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    fetched = []
    write_safetensors(tmp_path / "model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in t.items()],
                      lambda k: (fetched.append(k), t[k])[1], {"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(fetched) == sorted(t)  # each tensor fetched exactly once
    reader = ShardReader(tmp_path, ["model.safetensors"])
    for k, v in t.items():
        assert reader.meta(k) == (v.dtype, tuple(v.shape)) and torch.equal(reader.get(k), v)


def test_fp8_exports_are_written_as_save_file_writes_them_and_read_back_only_when_asked(tmp_path):
    """e4m3 weights sit between I8 and I16 in safetensors' order; a base model holding them is still refused."""
    t = sample_tensors()
    t["w.weight"] = torch.randn(4, 8).to(torch.float8_e4m3fn)
    t["a.weight"] = torch.randn(2, 3).to(torch.float8_e4m3fn)
    save_file(t, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    write_safetensors(tmp_path / "model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in t.items()],
                      t.__getitem__, {"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    reader = ShardReader(tmp_path, ["model.safetensors"], dtypes=shards.EXPORT_DTYPES)
    assert reader.meta("w.weight") == (torch.float8_e4m3fn, (4, 8))
    assert torch.equal(reader.get("w.weight").view(torch.uint8), t["w.weight"].view(torch.uint8))
    with pytest.raises(ShardError, match=r"tensor 'a.weight' is F8_E4M3, which qvlquant does not read"):
        ShardReader(tmp_path, ["model.safetensors"])


def test_a_tensor_that_does_not_match_its_plan_is_refused(tmp_path):
    with pytest.raises(ShardError, match=r"x is torch.float32 \[3\], planned F32 \[2\]"):
        write_safetensors(tmp_path / "m.safetensors", [("x", torch.float32, (2,))], lambda k: torch.zeros(3))


def test_disk_full_names_the_file(tmp_path, monkeypatch):
    class Full:
        def __init__(self, *a):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "open", Full, raising=False)
    with pytest.raises(OSError, match=r"no space left on device writing .*m\.safetensors; free space"):
        write_safetensors(tmp_path / "m.safetensors", [("x", torch.float32, (2,))], lambda k: torch.zeros(2))


def test_folders_without_safetensors_name_what_they_hold(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*pickle checkpoints are refused"):
        checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    with pytest.raises(FileNotFoundError, match="shard model-1.safetensors listed in the index is missing"):
        checkpoint_files(tmp_path)


def test_truncated_file_is_an_error_naming_it(tmp_path):
    save_file({"x": torch.zeros(100)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ShardError, match=r"model\.safetensors: .*truncated"):  # seen in the header, on opening
        ShardReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data)
    reader = ShardReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:-10])  # and when it shrinks after that
    with pytest.raises(ShardError, match="x is truncated"):
        reader.get("x")


def test_rows_of_a_table_are_those_of_the_whole_tensor(tmp_path):
    table = torch.randn(50, 6).bfloat16()
    save_file({"embed": table}, str(tmp_path / "model.safetensors"))
    rows = ShardReader(tmp_path).get_rows("embed", [7, 0, 49, 7])
    assert torch.equal(rows, table[[7, 0, 49, 7]])
    with pytest.raises(ShardError, match="row 50 of embed is outside its 50 rows"):
        ShardReader(tmp_path).get_rows("embed", [50])


def test_one_entry_of_a_fused_tensor_is_read_alone(tmp_path):
    """An expert's slice of a fused [E, H, 2I] tensor: its entry of the first axis, beside other tensors."""
    fused = torch.randn(5, 3, 8).bfloat16()
    save_file({"a": torch.randn(4), "experts": fused, "z": torch.randn(2, 2)}, str(tmp_path / "model.safetensors"))
    reader = ShardReader(tmp_path)
    assert torch.equal(reader.get_rows("experts", [3])[0], fused[3])
    assert torch.equal(reader.get_rows("experts", [4, 0]), fused[[4, 0]])
    with pytest.raises(ShardError, match="row 5 of experts is outside its 5 rows"):
        reader.get_rows("experts", [5])


def raw_safetensors(path, header, data: bytes) -> None:
    """A safetensors file with exactly this header (a dict, or raw bytes) and data, however wrong."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED = {  # name -> (header, data, what the error says)
    "empty file": (None, b"", r"0 bytes; a safetensors file starts with"),
    "under 8 bytes": (None, b"\x01\x02\x03", r"3 bytes; a safetensors file starts with"),
    "header past the end": (b"", b"", None),  # the length field claims more than the file holds (set below)
    "header not JSON": (b"{not json}", b"", r"header is not JSON"),
    "header a list": ([1, 2], b"", r"header is not a JSON object"),
    "entry a list": ({"w": [1]}, b"", r"tensor 'w': not an entry"),
    "float8": ({"w": entry("F8_E4M3", (8,), (0, 8))}, bytes(8), r"tensor 'w' is F8_E4M3, which qvlquant does not "
               r"read \(it reads BOOL, U8, .*\)"),
    "unknown dtype": ({"w": entry("Q4")}, bytes(8), r"tensor 'w' has dtype 'Q4', not one of safetensors'"),
    "negative dim": ({"w": entry(shape=(-2,))}, bytes(8), r"tensor 'w': shape \[-2\] must be a list of"),
    "offsets of the wrong type": ({"w": entry(offsets=("0", 8))}, bytes(8), r"tensor 'w': data_offsets"),
    "size is not dtype x shape": ({"w": entry(shape=(3,))}, bytes(8), r"tensor 'w': 8 bytes for F32 \[3\] \(12 "
                                  r"bytes\)"),
    "overlapping": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, bytes(12),
                    r"tensors 'a' and 'b' overlap"),
    "same bytes twice": ({"a": entry(), "b": entry()}, bytes(8), r"tensors 'a' and 'b' overlap"),
    "a gap": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}, bytes(20), r"4 bytes between 'a' and 'b'"),
    "truncated": ({"a": entry(shape=(4,), offsets=(0, 16))}, bytes(10), r"data up to byte 16 .* holds 10: "
                  r"truncated"),
    "trailing bytes": ({"a": entry()}, bytes(12), r"4 bytes after the last tensor"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_headers_are_refused_on_opening_naming_the_file(tmp_path, case):
    """Everything safetensors itself refuses (checked below with its own reader) is refused when the reader opens
    the file: never a tensor read from overlapping or missing bytes, never an exception other than ShardError."""
    header, data, message = MALFORMED[case]
    path = tmp_path / "model.safetensors"
    if header is None:
        path.write_bytes(data)
    elif case == "header past the end":
        path.write_bytes(struct.pack("<Q", 1000) + b"{}")
        message = r"header of 1000 bytes in a file of 10"
    else:
        raw_safetensors(path, header, data)
    with pytest.raises(ShardError, match=rf"{path}: .*{message}"):
        ShardReader(tmp_path)
    if case == "float8":  # safetensors reads it, qvlquant does not quantize it; inspect reads its shape
        assert shards.read_checkpoint_header(tmp_path) == {"w": ((8,), "F8_E4M3")}
        return
    with pytest.raises(Exception):
        safe_open(str(path), "pt")  # safetensors refuses each one too


def test_well_formed_headers_still_read_zero_sized_tensors_included(tmp_path):
    raw_safetensors(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}, "e": entry(shape=(0, 3),
                    offsets=(0, 0)), "a": entry(offsets=(0, 8)), "b": entry("BF16", (2, 2), (8, 16))}, bytes(16))
    reader = ShardReader(tmp_path)
    assert reader.meta("e") == (torch.float32, (0, 3)) and reader.meta("b") == (torch.bfloat16, (2, 2))
    assert torch.equal(reader.get("b"), torch.zeros(2, 2, dtype=torch.bfloat16))


def index_of(tmp_path, weight_map) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("name", ["../x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors", "..", ".", "",
                                  "sub\\x.safetensors"])
def test_index_entries_must_be_plain_names_inside_the_folder(tmp_path, name):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    for where in (tmp_path / "x.safetensors", model / "sub" / "x.safetensors"):
        save_file({"w": torch.zeros(2)}, str(where))
    index_of(model, {"w": name})
    with pytest.raises(ShardError, match=r"index\.json: shard .* is not a plain file name inside"):
        ShardReader(model)
    with pytest.raises(ShardError, match="not a plain file name"):
        shards.read_checkpoint_header(model)


@pytest.mark.parametrize("text,message", [
    ("[1]", "not a JSON object with a weight_map"),
    ('{"weight_map": [1]}', "weight_map must map tensor names to shard file names"),
    ('{"weight_map": {"w": 1}}', "weight_map must map tensor names to shard file names"),
    ('{"metadata": {}}', "not a JSON object with a weight_map"),
    ("{", "not JSON"),
])
def test_malformed_index_is_named(tmp_path, text, message):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ShardError, match=rf"model\.safetensors\.index\.json: .*{message}"):
        checkpoint_files(tmp_path)


def test_a_plain_name_that_is_a_symlink_is_followed(tmp_path):
    """The Hugging Face cache keeps each shard as a symlink into its blob store: a plain name, read."""
    blobs, model = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir(), model.mkdir()
    save_file({"w": torch.ones(2)}, str(blobs / "abc123"))
    (model / "model-1.safetensors").symlink_to("../blobs/abc123")
    index_of(model, {"w": "model-1.safetensors"})
    assert torch.equal(ShardReader(model).get("w"), torch.ones(2))


def test_the_digest_taken_while_writing_is_the_files_and_is_used_once(tmp_path, monkeypatch):
    """write_safetensors hashes the bytes as it writes them; the manifest entry of that file uses the digest (no read
    back: ``sha256`` is not called), which equals the file's own sha256, and only for the unchanged file: after an
    edit, or a second time, the file is read again."""
    import hashlib
    import os

    from qvlquant.storage import manifest

    t = sample_tensors()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, [(k, v.dtype, tuple(v.shape)) for k, v in t.items()], t.__getitem__, {"format": "pt"})
    truth = hashlib.sha256(path.read_bytes()).hexdigest()
    reads = []
    real = manifest.sha256
    monkeypatch.setattr(manifest, "sha256", lambda p: (reads.append(p), real(p))[1])
    assert manifest.manifest_entry(path) == {"sha256": truth, "bytes": path.stat().st_size}
    assert reads == []
    assert manifest.manifest_entry(path)["sha256"] == truth and reads == [path]  # used once: then read
    write_safetensors(path, [(k, v.dtype, tuple(v.shape)) for k, v in t.items()], t.__getitem__, {"format": "pt"})
    with open(path, "r+b") as f:  # edited after writing, same size, a later modification time
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert manifest.manifest_entry(path)["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() != truth
