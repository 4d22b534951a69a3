"""``qvlquant quantize --nproc N``: start N ranks of the same command on this machine with the environment torchrun
gives them (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), wait for them, and when one
fails stop the others and say which one failed and how. What the ranks do is ``qvlquant.parallel.distributed``'s business.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from qvlquant.parallel.devices import cpu_quota
from qvlquant.parallel.distributed import World

STOP_GRACE_SECONDS = 10.0


def without_option(argv: list[str], flag: str) -> list[str]:
    """argv without ``flag VALUE`` / ``flag=VALUE`` (what each rank runs: the same command, minus --nproc)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_quota() // nproc)))  # the ranks share the CPUs
    env.setdefault("PYTHONFAULTHANDLER", "1")  # a rank that crashes (SIGSEGV, SIGABRT) prints where it was
    return env


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def check_batches(batches: int, nproc: int) -> None:
    """Every process needs at least one calibration batch (checked before any starts, and again by the ranks)."""
    if batches < nproc:
        raise ValueError(f"{batches} calibration batches for {nproc} processes: every process needs at least one; "
                         "use more samples (--num-samples), a smaller --batch-size or fewer processes")


def run_ranks(nproc: int, command: list[str], poll_seconds: float = 0.1) -> int:
    """Run ``command`` as ranks 0..nproc-1 and wait. -> 0 when all succeed, else the failed rank's exit status
    (128 + signal for a killed one), after stopping the other ranks (SIGTERM, then SIGKILL)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if World.from_env().distributed:
        raise ValueError("--nproc inside a distributed run (WORLD_SIZE is set): use torchrun or --nproc, not both")
    port = free_port()
    procs = [subprocess.Popen(command, env=rank_env(r, nproc, port)) for r in range(nproc)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))  # a killed rank is the likely cause
                _stop(procs)
                print(f"qvlquant quantize: error: rank {rank} of {nproc} {describe(code)}; the other ranks were "
                      "stopped. Nothing was published to --output; the layers already finished stay in its "
                      "partial folder (.OUTPUT.partial): rerun the same command to resume.", file=sys.stderr)
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        _stop(procs)
        raise


def _stop(procs: list[subprocess.Popen]) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.time() + STOP_GRACE_SECONDS
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
