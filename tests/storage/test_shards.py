"""Safetensors written and read one tensor at a time: the bytes of safetensors' own save_file, exactly."""

import errno

import pytest
import torch
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
    with pytest.raises(ShardError, match="x is truncated"):
        ShardReader(tmp_path).get("x")


def test_rows_of_a_table_are_those_of_the_whole_tensor(tmp_path):
    table = torch.randn(50, 6).bfloat16()
    save_file({"embed": table}, str(tmp_path / "model.safetensors"))
    rows = ShardReader(tmp_path).get_rows("embed", [7, 0, 49, 7])
    assert torch.equal(rows, table[[7, 0, 49, 7]])
    with pytest.raises(ShardError, match="row 50 of embed is outside its 50 rows"):
        ShardReader(tmp_path).get_rows("embed", [50])
