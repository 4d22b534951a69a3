"""Files a user hands in: regular files under a cap, checked before and after opening; a FIFO never blocks."""

import os

import pytest

from qvlquant.storage.files import (
    InputFileError,
    open_regular,
    read_bytes_bounded,
    read_lines_bounded,
    read_text_bounded,
)


@pytest.mark.parametrize("read", [
    lambda p: read_text_bounded(p, 1 << 20, "recipe"),
    lambda p: list(read_lines_bounded(p, 1 << 20, 1024, "recipe")),
])
def test_not_regular_files_are_refused_unopened(tmp_path, read, deadline):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # no writer: a plain open() would block forever
    for path in ("/dev/zero", str(fifo), str(tmp_path)):
        with deadline(5), pytest.raises(InputFileError, match=rf"^recipe {path} is not a regular file"):
            read(path)


def test_a_fifo_swapped_in_after_the_check_does_not_block(tmp_path, monkeypatch, deadline):
    """The race: stat() saw a file, open() meets a FIFO. O_NONBLOCK opens it at once and fstat() refuses it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(__file__) if str(p) == str(fifo) else real_stat(p, *a, **k))
    with deadline(5), pytest.raises(InputFileError, match="is not a regular file"):
        open_regular(str(fifo), 1 << 20, "report")


def test_cap_is_checked_before_and_while_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: nothing is written, only the size is claimed
    with pytest.raises(InputFileError, match=rf"^report {path} is 67108865 bytes, over the 64 MiB cap$"):
        read_bytes_bounded(path, 64 << 20, "report")
    path.write_bytes(b"x" * 10)
    assert read_bytes_bounded(path, 10, "report") == b"x" * 10
    real_fstat = os.fstat  # a file that grows after the checks: reading stops at the cap
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 5, *real_fstat(fd)[7:])))
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: os.stat_result((*os.lstat(p)[:6], 5, *os.lstat(p)[7:])))
    with pytest.raises(InputFileError, match="grew past the 9 bytes cap"):
        read_bytes_bounded(path, 9, "report")


def test_missing_and_undecodable_files_are_named(tmp_path):
    with pytest.raises(InputFileError, match=rf"cannot read recipe {tmp_path}/nope.yaml: No such file"):
        read_text_bounded(tmp_path / "nope.yaml", 1 << 20, "recipe")
    (tmp_path / "latin1.yaml").write_bytes("a: caf\xe9".encode("latin-1"))
    with pytest.raises(InputFileError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset 6\)"):
        read_text_bounded(tmp_path / "latin1.yaml", 1 << 20, "recipe")


def test_lines_split_at_newline_only_with_a_cap_per_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes("a\u2028b\r\nc\u0085d\n\ne\x0cf\rg".encode())
    assert list(read_lines_bounded(path, 1 << 20, 64, "data")) == [
        (1, "a\u2028b"), (2, "c\u0085d"), (3, ""), (4, "e\x0cf\rg")]
    path.write_bytes(b"1234\n12345\n123456\n")
    lines = read_lines_bounded(path, 1 << 20, 5, "data")
    assert next(lines) == (1, "1234") and next(lines) == (2, "12345")  # exactly the cap is allowed
    with pytest.raises(InputFileError, match=rf"^data {path}:3: the line is over the 5 bytes cap per line$"):
        next(lines)
    path.write_bytes(b"ok\n\xff\n")
    with pytest.raises(InputFileError, match=r"rows\.jsonl:2: not UTF-8 text \(byte 0xff at column 1\)"):
        list(read_lines_bounded(path, 1 << 20, 64, "data"))
    path.write_bytes(b"12\n" * 4)
    with pytest.raises(InputFileError, match=r"rows\.jsonl is 12 bytes, over the 11 bytes cap"):
        list(read_lines_bounded(path, 11, 64, "data"))
