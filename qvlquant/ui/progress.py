"""Progress bars on stderr (tqdm), quiet when QVLQUANT_QUIET=1 or stderr is not a terminal and CI is set."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def quiet() -> bool:
    return os.environ.get("QVLQUANT_QUIET") == "1" or bool(os.environ.get("CI") and not sys.stderr.isatty())


def progress(iterable, desc: str, unit: str = "it", total: int | None = None, leave: bool = True, **kwargs):
    """A tqdm bar that stays visible when it ends (``leave``), unless output is quiet."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=quiet(), file=sys.stderr, leave=leave, **kwargs)


def say(message: str) -> None:
    """One line of progress on stderr (what is being loaded, estimated, written), unless output is quiet."""
    if not quiet():
        print(message, file=sys.stderr, flush=True)
