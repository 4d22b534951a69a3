"""One run at a time per ``--output``: a lock file beside it, ``.NAME.lock``, held from before the run reads its
partial folder until after its export is published.

Two runs into one output shared ``.NAME.partial`` and mixed their layers (RELIABILITY.md 45). The lock is an
``fcntl.flock`` on the open lock file: the kernel drops it when its process ends, however it ends (SIGKILL
included), so a lock file left by a dead run holds nothing and the next run takes it over, and no two processes can
both hold it. The file records the holder (pid, host, start time, command) for the message refusing a second run.
Where the filesystem has no flock (ENOLCK, EOPNOTSUPP), the record decides: a live pid on this host, or any pid on
another host (whose processes cannot be seen from here), holds the output.

    with output_lock(out):
        ...  # read and write .NAME.partial, publish NAME
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import shlex
import socket
import stat
import sys
from collections.abc import Iterator

from qvlquant.storage.outputs import OutputError, beside, pid_alive

NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
MAX_RECORD_BYTES = 64 << 10  # a record is a few hundred bytes; anything longer is not ours
MAX_SHOWN = 300  # characters of the holder's command in a message


class OutputLocked(OutputError):
    """Another run holds ``--output``, or its lock file is not a lock file."""


def lock_path(out: os.PathLike | str) -> pathlib.Path:
    """``.NAME.lock`` beside the resolved ``out``."""
    return beside(out, "lock")


@contextlib.contextmanager
def output_lock(out: os.PathLike | str, command: str | None = None) -> Iterator[pathlib.Path]:
    """Hold ``out`` for this process until the block ends (errors and interrupts included), creating its parent
    folder if needed; ``OutputLocked`` naming the holder when another run has it. -> the lock file."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path)
    try:
        _write_record(fd, command or _command_line())
        yield path
    finally:
        _release(fd, path)


def _acquire(path: pathlib.Path) -> int:
    """An open, locked descriptor of ``path``."""
    for _ in range(10):  # a retry only when the holder removed the file between our open and our lock
        fd = _open(path)
        try:
            locked = _flock(fd)
            held = not locked if locked is not None else _alive(_read(fd))
            if held:
                raise OutputLocked(_held_message(path, _read(fd)))
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OutputLocked(f"cannot lock {path}: it keeps being removed by another run; try again")


def _open(path: pathlib.Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise OutputLocked(f"{path} is not a regular file, so it cannot be the lock of --output; "
                               "move it away") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputLocked(f"{path} is not a regular file, so it cannot be the lock of --output; move it away")
    return fd


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in NO_FLOCK:
            return None
        raise
    return True


def _same_file(fd: int, path: pathlib.Path) -> bool:
    """Whether ``path`` still names the file ``fd`` holds (its holder removes it on release)."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _read(fd: int) -> dict:
    """The holder's record ({} while it is being written, or when it is not one)."""
    try:
        record = json.loads(os.pread(fd, MAX_RECORD_BYTES, 0))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _alive(record: dict) -> bool:
    """Without flock: whether the recorded holder may still run."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    return record.get("host") != socket.gethostname() or pid_alive(pid)


def _command_line() -> str:
    """This process's command line (``python -m qvlquant ...`` shown as ``qvlquant ...``)."""
    argv = list(sys.argv) or ["?"]
    head = pathlib.Path(argv[0])
    if head.name == "qvlquant" or (head.name == "__main__.py" and head.parent.name == "qvlquant"):
        argv[0] = "qvlquant"
    return shlex.join(argv)


def _write_record(fd: int, command: str) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command}
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _held_message(path: pathlib.Path, record: dict) -> str:
    out = path.with_name(path.name[1:-len(".lock")])
    if not record:
        who = "a run that is starting"
    else:
        command = " ".join(str(record.get("command", "?")).split())
        command = command if len(command) <= MAX_SHOWN else command[:MAX_SHOWN] + "..."
        who = (f"pid {record.get('pid', '?')} on {record.get('host', '?')}, since {record.get('started', '?')} "
               f"({command})")
    return (f"--output {out} is in use by another run: {who}; wait for it to end or choose another --output "
            f"(if no such run is going on, delete {path})")


def _release(fd: int, path: pathlib.Path) -> None:
    """Remove the lock file while still holding it, then let go."""
    try:
        if _same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass  # a lock file left behind holds nothing: the next run takes it over
    finally:
        os.close(fd)
