"""One run at a time per --output (RELIABILITY.md 45): a second run is refused naming the first, the lock of a dead
run is taken over, and the lock is gone however the run ends."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

import qvlquant.storage.lock as lock_module
from qvlquant.storage.lock import OutputLocked, lock_path, output_lock

HOLD = """
import sys, time
from qvlquant.storage.lock import output_lock
with output_lock(sys.argv[1], "quantize --output held"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def holder(pid, host=None):
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00",
                       "command": "qvlquant quantize"})


def test_a_second_run_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "q"
    with output_lock(out, "qvlquant quantize --output q"):
        record = json.loads(lock_path(out).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(OutputLocked, match=rf"{re.escape(str(out))} is in use by another run: pid {os.getpid()} "
                                               rf"on {re.escape(socket.gethostname())}, since .* \(qvlquant quantize "
                                               r"--output q\)"):
            with output_lock(out):
                pass
        code = "import sys\nfrom qvlquant.storage.lock import output_lock\nwith output_lock(sys.argv[1]): pass"
        other = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)
        assert other.returncode == 1 and f"pid {os.getpid()}" in other.stderr
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()  # the refused run left it alone
    assert not lock_path(out).exists()


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "q"
    lock_path(out).write_text(holder(dead_pid()))
    with output_lock(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_a_record_naming_a_live_process_that_holds_no_lock_is_taken_over(tmp_path):
    """The flock decides, not the record: a dead run's pid reused by another program does not block the output."""
    out = tmp_path / "q"
    lock_path(out).write_text(holder(os.getppid()))
    with output_lock(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_sigkilled_run_leaves_a_lock_the_next_run_takes_over(tmp_path):
    out = tmp_path / "q"
    held = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked, match=f"pid {held.pid} "):
            with output_lock(out):
                pass
    finally:
        held.send_signal(signal.SIGKILL)
        held.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == held.pid  # left behind
    with output_lock(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


@pytest.mark.parametrize("error", [RuntimeError("failed mid-run"), KeyboardInterrupt()])
def test_the_lock_is_released_on_errors_and_interrupts(tmp_path, error):
    out = tmp_path / "q"
    with pytest.raises(type(error)):
        with output_lock(out):
            raise error
    assert not lock_path(out).exists()
    with output_lock(out):  # and can be taken again
        pass


def test_without_working_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", unsupported)
    out = tmp_path / "q"
    lock_path(out).write_text(holder(os.getppid()))  # alive, on this host
    with pytest.raises(OutputLocked, match=f"pid {os.getppid()} on "):
        with output_lock(out):
            pass
    lock_path(out).write_text(holder(os.getppid(), host="another-host"))  # cannot be told dead from here
    with pytest.raises(OutputLocked, match="pid .* on another-host"):
        with output_lock(out):
            pass
    lock_path(out).write_text(holder(dead_pid()))
    with output_lock(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_a_lock_file_that_is_not_a_lock_is_never_followed(tmp_path):
    out = tmp_path / "q"
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    lock_path(out).symlink_to(precious)
    with pytest.raises(OutputLocked, match="not a regular file"):
        with output_lock(out):
            pass
    assert precious.read_text() == "mine" and lock_path(out).is_symlink()
