"""Where an export may be written: the rule for ``--output``, and publishing a finished folder atomically."""

from __future__ import annotations

import os
import pathlib
import shutil


def replace_dir(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is kept until the new one is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
