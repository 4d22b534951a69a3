"""Test-wide settings: offline hub, 2 threads, and any non-loopback network connection is a failure."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["QVLQUANT_QUIET"] = "1"
os.environ.setdefault("QVLQUANT_CACHE", tempfile.mkdtemp(prefix="qvlquant-cache-"))  # checkpoint hashes, per run
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # Triton kernels run in the interpreter on CPU (read when they are defined)
torch.set_num_threads(min(2, os.cpu_count() or 1))

_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or self.family == socket.AF_UNIX):
        raise AssertionError(f"test tried to reach the network: {address!r}")
    return _connect(self, address)


socket.socket.connect = _guarded_connect


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (pyproject's markers) need a CUDA device: skipped, saying so, without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@contextlib.contextmanager
def _deadline(seconds: int):
    def expire(signum, frame):
        raise AssertionError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def deadline():
    """``with deadline(5): ...``: a call that blocks (open() of a FIFO with no writer) fails the test after that many
    seconds instead of hanging it (SIGALRM interrupts the blocked call)."""
    return _deadline


@pytest.fixture(scope="session")
def demo():
    """The embedded demo model (fp32 compute) and its processor, loaded once."""
    import qvlquant

    model, processor = qvlquant.load("demo")
    return model, processor


@pytest.fixture(scope="session")
def demo_batches(demo):
    """Real calibration batches through the demo processor: 3 easy-vqa chats (one batch of 2, padded) + 1 text."""
    from qvlquant.calib.dataset import CalibConfig, build_batches
    from qvlquant.calib.sources import load_samples

    _, processor = demo
    samples, names, _ = load_samples("demo", 4, seed=3)
    return build_batches(processor, samples, CalibConfig(batch_size=2), names)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be created in, even by root (chattr +i where chmod does not stop it); skipped where
    neither works."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = (os.geteuid() == 0 and shutil.which("chattr") is not None
                 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0)
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
    else:
        (folder / "probe").unlink()
        pytest.skip("cannot make a read-only folder here")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
