"""Where a job computes: the device, the compute dtype that follows it, the CPU thread count that the machine's
real CPU quota allows, and measured peaks (resident memory, GPU memory)."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import resource

import torch


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """auto: the first CUDA device when there is one, else the CPU; cuda / cuda:N must exist. In a distributed
    run (``local_rank`` given) cuda and auto mean cuda:LOCAL_RANK: one GPU per process."""
    if local_rank is not None and re.fullmatch(r"cuda:\d+", name):
        raise ValueError(f"--device {name} with several processes: pass --device cuda, and each process takes "
                         "cuda:LOCAL_RANK")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is visible (torch.cuda.is_available() is False); "
                             "use --device cpu, or auto")
        index = local_rank if local_rank is not None else (device.index or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
                             + (f" for local rank {index}: start at most that many processes per node"
                                if local_rank is not None else ""))
        return torch.device("cuda", index)
    return device


def compute_dtype(device: torch.device, name: str | None) -> torch.dtype:
    """float32 on the CPU, bfloat16 on a GPU, unless the job names one."""
    if name is not None:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cpu_quota() -> int:
    """CPUs this process may really use: its affinity, capped by a cgroup CPU quota (containers often see every
    core of the host but get two)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path in ("/sys/fs/cgroup/cpu.max",):  # cgroup v2: "<quota> <period>" or "max <period>"
        try:
            quota, period = open(path).read().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    try:  # cgroup v1
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        if quota > 0:
            n = min(n, max(1, quota // period))
    except (OSError, ValueError):
        pass
    return max(1, n)


def idle_cpus(quota: int) -> float:
    """CPUs of the quota that other work is not already using: the quota less the 1-minute load average."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform: assume a quiet machine
        return float(quota)
    return max(0.0, quota - load)


def default_threads(processes: int = 1) -> int:
    """Threads per process when none are asked for: this process's share of the CPU quota, cut to the CPUs that are
    idle. More threads than idle CPUs make torch's threads wait on each other: at load ~5-7 on 2 cores test-bed AWQ
    took 550.6 s with 2 threads against 37.0 s with this default's 1 (docs/REAL_SIZE.md, "Threads")."""
    quota = cpu_quota()
    idle = idle_cpus(quota) / processes
    return max(1, min(quota // processes, int(idle + 0.7)))  # a load of 0.5 left by the shell still gets both


def set_threads(threads: int | None, processes: int = 1) -> int:
    """torch's CPU threads: ``threads``, else OMP_NUM_THREADS when set, else ``default_threads`` (``processes`` on
    this machine share the quota). -> the count set."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    n = threads or (int(env) if env.isdigit() else default_threads(processes))
    torch.set_num_threads(n)
    return n


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``field: N kB`` line of a Linux /proc file, in bytes; None where the file or the field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_high_water_bytes() -> int | None:
    """The process's resident high-water mark now (Linux ``VmHWM``, cheap to read often); None where there is none."""
    return _proc_bytes("/proc/self/status", "VmHWM")


def peak_gpu_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def free_bytes(device: torch.device) -> int:
    """Memory available for activations on ``device``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    return 2**40 if available is None else available


def choose_offload(device: torch.device, activation_bytes: int, setting: str) -> str | None:
    """Where calibration activations wait between layers: None (on the device) or "cpu". auto keeps them on a
    GPU when they take at most a quarter of its free memory (the layer, its Hessians and the replay need the
    rest), else in CPU memory, moved one batch at a time."""
    if device.type == "cpu" or setting == "device":
        return None
    if setting == "cpu":
        return "cpu"
    return None if activation_bytes <= free_bytes(device) // 4 else "cpu"


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


# glibc's mallopt parameter, and what qvlquant sets it to: every allocation of 1 MiB or more gets pages of its own
M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 2**20


def bound_heap() -> bool:
    """Make glibc give every freed allocation of ``HEAP_MMAP_THRESHOLD`` or more straight back to the system.

    glibc serves a large allocation with pages of its own (returned when freed) only above its mmap threshold, and it
    raises that threshold each time such a block is freed, up to 32 MiB. After the first layer, the tensors of 1 to
    32 MiB that a layer's math frees (a MoE layer's per-expert weights, inputs and Hessian sums) stay in the heap,
    fragmented, and count in the process's memory until the heap's top is free (measured at a Qwen3.5-35B-A3B layer
    in docs/RESULTS.md). Fixing the threshold stops the raising. Process-wide; a ``MALLOC_MMAP_THRESHOLD_`` in the environment (glibc's own setting) wins. -> whether it
    was set (False without glibc, or where the environment sets it)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``). Tensors under glibc's mmap threshold
    (the vision tower's 26 MB matrices, a layer's temporaries) come from the heap, and freed ones stay counted in
    the process's memory: measured at a 7B GPTQ layer, 1.4 GB more before down_proj's 2.9 GB Hessian sum is
    allocated. Cheap (milliseconds); a no-op where there is no glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
