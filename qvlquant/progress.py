"""Progress bars on stderr (tqdm), quiet when QVLQUANT_QUIET=1 or stderr is not a terminal and CI is set."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable, desc: str, unit: str = "it", total: int | None = None):
    quiet = os.environ.get("QVLQUANT_QUIET") == "1" or (os.environ.get("CI") and not sys.stderr.isatty())
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=bool(quiet), file=sys.stderr, leave=False)
