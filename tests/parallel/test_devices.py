"""qvlquant.parallel.devices: the heap bound (glibc's mmap threshold) that keeps freed layer temporaries out of the
process's memory. Run in child processes: the setting is process-wide."""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import sys, torch
    from qvlquant.parallel.devices import bound_heap, _proc_bytes
    torch.set_num_threads(1)
    print("set", bound_heap() if sys.argv[1] == "bound" else None)
    def rss():
        return _proc_bytes("/proc/self/status", "VmRSS")
    big = torch.ones(2**22); del big  # a freed 16 MiB block: glibc raises its mmap threshold past 4 MiB
    base = rss()
    kept = [torch.ones(2**20) for _ in range(64)]  # 64 x 4 MiB, like a MoE layer's per-expert tensors
    last = kept[-1]
    kept = None  # every block freed but the last, which sits at the heap's top: a heap cannot give the rest back
    print("held_mib", (rss() - base) / 2**20)
""")


def _probe(mode: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc")
def test_bound_heap_returns_freed_layer_temporaries():
    plain, bound = _probe("plain"), _probe("bound")
    assert bound["set"] == "True"
    assert float(plain["held_mib"]) > 200  # without it, 63 freed 4 MiB blocks stay resident
    assert float(bound["held_mib"]) < 32  # with it, only the live one (and small change)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc")
def test_bound_heap_leaves_the_users_own_setting():
    probe = _probe("bound", {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)})
    assert probe["set"] == "False"
    assert float(probe["held_mib"]) > 200  # the user's 64 MiB threshold rules: the 4 MiB blocks stay in the heap
