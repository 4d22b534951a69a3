"""Reading the files a user hands in (recipes, eval reports, calibration data): regular files under a size cap only.

``/dev/zero`` as a recipe would be read until memory runs out, and a FIFO with no writer blocks ``open`` forever. So
the path is checked before it is opened (``stat``: a FIFO, a device or a folder is refused unopened), opened with
O_NONBLOCK (a FIFO swapped in after the check cannot block), and checked again on the open descriptor (``fstat``);
then at most the cap is read. Every error is an InputFileError naming the file, the cap and what to do.

    text = read_text_bounded("recipe.yaml", 1 << 20, "recipe")
    for number, line in read_lines_bounded("data.jsonl", 1 << 30, 8 << 20, "calibration file"): ...
"""

from __future__ import annotations

import io
import itertools
import os
import stat
from collections.abc import Iterator


class InputFileError(ValueError):
    """A file handed in that is not a regular file, is over its cap, is not UTF-8 or cannot be read."""


def size_text(n: int) -> str:
    """``n`` bytes as people write it: 1 MiB, 64 MiB, or a plain count."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def _check(st: os.stat_result, path, max_bytes: int, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{what} {path} is not a regular file (a FIFO, a device or a folder); give a file")
    if st.st_size > max_bytes:
        raise InputFileError(f"{what} {path} is {st.st_size} bytes, over the {size_text(max_bytes)} cap")


def open_regular(path, max_bytes: int, what: str) -> io.BufferedReader:
    """``path`` opened for binary reading when it is a regular file of at most ``max_bytes``."""
    try:
        _check(os.stat(path), path, max_bytes, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputFileError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        _check(os.fstat(fd), path, max_bytes, what)  # the file opened is the file checked
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _over_cap(path, max_bytes: int, what: str) -> InputFileError:
    return InputFileError(f"{what} {path} grew past the {size_text(max_bytes)} cap while it was read")


def read_bytes_bounded(path, max_bytes: int, what: str) -> bytes:
    with open_regular(path, max_bytes, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _over_cap(path, max_bytes, what)
    return data


def _utf8(data: bytes, where: str, column: bool = False) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = f"column {e.start + 1}" if column else f"offset {e.start}"
        byte = data[e.start]
        raise InputFileError(f"{where}: not UTF-8 text (byte 0x{byte:02x} at {at}); save it as UTF-8") from None


def read_text_bounded(path, max_bytes: int, what: str) -> str:
    """The UTF-8 text of ``path`` (see the module doc for what is refused)."""
    return _utf8(read_bytes_bounded(path, max_bytes, what), f"{what} {path}")


def read_lines_bounded(path, max_bytes: int, max_line_bytes: int, what: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of ``path``, read one at a time: a line is never longer than
    ``max_line_bytes`` in memory, nor the file larger than ``max_bytes``. Lines end at "\\n" only (``str.splitlines``
    also splits at U+2028, U+0085 and others that JSON allows raw inside a string); a CRLF's "\\r" is dropped."""
    total = 0
    with open_regular(path, max_bytes, what) as f:
        for number in itertools.count(1):
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            total += len(raw)
            if total > max_bytes:
                raise _over_cap(path, max_bytes, what)
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise InputFileError(f"{what} {path}:{number}: the line is over the {size_text(max_line_bytes)} cap "
                                     "per line")
            yield number, _utf8(raw.removesuffix(b"\n").removesuffix(b"\r"), f"{what} {path}:{number}", column=True)
