"""Where an export may be written: the rule for ``--output``, and publishing a finished folder atomically.

The rule (RELIABILITY.md 28). An existing ``--output`` is replaced only when it is an empty folder or a qvlquant
export (it holds ``qvlquant_manifest.json`` and nothing the export did not write), or when the user passed
``--overwrite``. Some paths are never replaced, overwrite or not:

- a path that is, or contains, an input of the run (``protected``: every file the run reads, as named and where its
  symlinks lead: the base model's folder and files, the calibration data and every image it names);
- a path that contains the current folder, the home folder, or is a filesystem root (``--output .``);
- anything that is not a folder (a regular file, a FIFO, a device).

Everything else is an ``OutputError`` naming the path and what to do. ``check_output_target`` is pure and cheap (it
also checks that every name the run makes beside the output fits the filesystem), and ``check_output_writable``
probes the folder with one file, so a bad ``--output`` fails before any work starts; ``publish`` checks again (the
folder may have changed during a long run), gives the files the user's umask, and renames the new folder into
place, keeping the old one until it is.

A killed export leaves ``.NAME.tmp-PID`` (and, between the two renames, ``.NAME.old-PID``) beside the output.
``clean_stale_temps`` removes those whose process is gone, never a live process's, after ``restore_stranded`` puts
a stranded ``.old-PID`` back when the output itself is missing (inspect, eval and push call it too).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterable

from qvlquant.storage.manifest import MANIFEST, is_qvlquant_export, unlisted_entries


class OutputError(ValueError):
    """``--output`` names a path qvlquant must not replace."""


# What a run creates beside --output NAME, as ``.NAME.<what>``: the export being written (tmp-PID), the previous
# export while the new one is renamed into place (old-PID), the finished layers of a run (partial), its lock. A PID
# has at most 7 digits (Linux's largest is 4194304).
SIBLINGS = ("tmp-PID", "old-PID", "partial", "lock")
PID_DIGITS = 7


def beside(out: os.PathLike | str, what: str) -> pathlib.Path:
    """``.NAME.<what>`` beside the resolved ``out`` (``what``: one of SIBLINGS, with a real PID)."""
    target = pathlib.Path(out).expanduser().resolve()
    return target.with_name(f".{target.name}.{what}")


def _contains(outer: pathlib.Path, inner: pathlib.Path) -> bool:
    return inner == outer or outer in inner.parents


def _where(path: os.PathLike | str) -> set[pathlib.Path]:
    """Where an input lives: the path itself (its folder resolved) and, when it is a symlink, where it leads (the
    Hugging Face cache's snapshots/REV/model.safetensors -> ../../blobs/SHA). Replacing either loses the input."""
    given = pathlib.Path(os.path.abspath(pathlib.Path(path).expanduser()))
    itself = given.parent.resolve() / given.name if given.name else given
    return {itself, given.resolve()}


def _never_replaced(target: pathlib.Path, protected: Iterable[os.PathLike | str]) -> str | None:
    """Why ``target`` may never be replaced, or None."""
    if target == pathlib.Path(target.anchor):
        return "is a filesystem root"
    for path in protected:
        if path is None:
            continue
        for inner in sorted(_where(path)):
            if _contains(target, inner):
                return f"is or contains {inner}, an input of this run"
    for what, inner in (("the current folder", pathlib.Path.cwd()), ("your home folder", pathlib.Path.home())):
        if _contains(target, inner.resolve()):
            return f"is or contains {what} ({inner})"
    return None


def check_output_target(out: os.PathLike | str, protected: Iterable[os.PathLike | str] = (),
                        overwrite: bool = False) -> pathlib.Path:
    """-> the resolved output folder, if an export may be published there; else ``OutputError``. No side effects."""
    target = pathlib.Path(out).expanduser().resolve()
    why = _never_replaced(target, protected)
    if why:
        raise OutputError(f"--output {target} {why}; it is never replaced, even with --overwrite: "
                          "choose another folder")
    if os.path.lexists(target) and not target.is_dir():
        raise OutputError(f"--output {target} exists and is not a folder; it is never replaced: choose a folder path")
    above = _existing_above(target)
    if not above.is_dir():
        raise OutputError(f"--output {target}: {above} is a file, so no folder can be made there: choose another path")
    too_long = _name_too_long(target, above)
    if too_long:
        raise OutputError(f"--output {target}: {too_long}; choose a shorter name")
    if not target.exists() or overwrite or not any(target.iterdir()):
        return target
    if not is_qvlquant_export(target):
        raise OutputError(f"--output {target} exists and is not a qvlquant export (it has no {MANIFEST}); "
                          "pass --overwrite to replace it and everything in it, or choose another folder")
    extra = unlisted_entries(target)
    if extra:
        raise OutputError(f"--output {target} is a qvlquant export but also holds {extra}, which it did not write; "
                          "move them out, pass --overwrite to replace them too, or choose another folder")
    return target


def _existing_above(target: pathlib.Path) -> pathlib.Path:
    """The nearest folder above ``target`` that exists (where the missing ones will be made)."""
    above = target.parent
    while not os.path.lexists(above):
        above = above.parent
    return above


def _name_too_long(target: pathlib.Path, above: pathlib.Path) -> str | None:
    """Which name the run would make is longer than the filesystem allows ("File name too long" at export,
    after all the work, and again on every resume), or None."""
    try:
        limit = os.pathconf(above, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    names = [(part, part) for part in target.relative_to(above).parts]  # the folders to make, and the output
    names += [(f".{target.name}.{what}", f".{target.name}.{what}".replace("PID", "9" * PID_DIGITS))
              for what in SIBLINGS]
    for shown, name in names:
        size = len(os.fsencode(name))
        if size > limit:
            return f"{shown} has {size} bytes, over the {limit} this filesystem allows in a name"
    return None


def check_output_writable(out: os.PathLike | str) -> None:
    """``OutputError`` unless a file can be made where ``out`` goes (its parent, or the nearest folder above it that
    exists): found before any work, not at the first write after calibration. Makes and removes one empty file."""
    target = pathlib.Path(out).expanduser().resolve()
    above = _existing_above(target)
    try:
        fd, probe = tempfile.mkstemp(prefix=".qvlquant-probe-", dir=above)
    except OSError as e:
        raise OutputError(f"--output {target}: cannot create files in {above} ({e.strerror}); choose a folder "
                          "you can write to") from None
    os.close(fd)
    os.unlink(probe)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(target: pathlib.Path, kinds: str = "tmp|old") -> list[pathlib.Path]:
    """``.NAME.tmp-PID`` / ``.NAME.old-PID`` folders beside ``target`` whose process is gone."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.({kinds})-(\d+)")
    return [path for path in sorted(target.parent.iterdir())
            if (match := pattern.fullmatch(path.name)) and not path.is_symlink() and path.is_dir()
            and not pid_alive(int(match[2]))]


def restore_stranded(out: os.PathLike | str) -> pathlib.Path | None:
    """When ``out`` is missing, put back the previous export that a kill between the two renames of ``publish``
    left in ``.NAME.old-PID`` (its process gone; the newest, if several). -> the folder it came from, or None."""
    try:
        target = pathlib.Path(out).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # not a path (a NUL byte, a loop): whoever reads it says so
        return None
    if not target.name or os.path.lexists(target) or not target.parent.is_dir():
        return None
    stranded = _stale(target, "old")
    if not stranded:
        return None
    newest = max(stranded, key=lambda p: p.stat().st_mtime_ns)
    os.replace(newest, target)
    return newest


def clean_stale_temps(out: os.PathLike | str) -> list[pathlib.Path]:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` folders beside ``out`` left by exports that are no longer running,
    after putting a stranded ``.old-PID`` back when ``out`` is missing (``restore_stranded``). -> the folders
    removed or restored."""
    target = pathlib.Path(out).expanduser().resolve()
    if not target.parent.is_dir():
        return []
    restored = restore_stranded(target)
    removed = _stale(target)
    for path in removed:
        shutil.rmtree(path)
    return sorted(removed + ([restored] if restored else []))


def temp_dir(out: os.PathLike | str) -> pathlib.Path:
    """A fresh ``.NAME.tmp-PID`` folder beside ``out`` (same filesystem, so ``publish`` can rename it), after
    cleaning up stale ones."""
    target = pathlib.Path(out).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = beside(target, f"tmp-{os.getpid()}")
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)  # our own PID's, from an earlier export in this process
    tmp.mkdir()
    return tmp


def current_umask() -> int:
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, then put it back
    os.umask(mask)
    return mask


def apply_umask(folder: os.PathLike | str) -> None:
    """Give every file 0o666 and every folder 0o777, less the umask, as any other program's files get
    (safetensors' ``save_file`` creates 0600 files that another user or a container cannot read)."""
    mask = current_umask()
    folder = pathlib.Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def publish(tmp: os.PathLike | str, out: os.PathLike | str, overwrite: bool = False,
            protected: Iterable[os.PathLike | str] = ()) -> pathlib.Path:
    """Move the finished folder ``tmp`` to ``out`` under the rule of ``check_output_target`` (checked again now);
    an existing ``out`` is kept until the new one is in place. -> the published folder."""
    tmp = pathlib.Path(tmp)
    target = check_output_target(out, protected, overwrite)
    apply_umask(tmp)
    old = beside(target, f"old-{os.getpid()}")
    if os.path.lexists(target):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)  # our own PID's, left by an earlier publish whose cleanup failed
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if os.path.lexists(old):
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def replace_dir(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Deprecated name of ``publish`` without ``--overwrite`` (kept for callers not yet moved to ``publish``)."""
    publish(tmp, out)
