"""Quantizing with several processes over torch.distributed (gloo on CPUs, nccl on GPUs), launched by torchrun
or ``qvlquant quantize --nproc N`` (``qvlquant.parallel.launch``).

Every rank streams the same decoder layer onto its own device and runs its contiguous share of the calibration
batches (``shard``). Statistics are summed across ranks in a fixed order (``total``: rank order; ``fold``: the
solving rank's part first), never with an all-reduce whose order the library picks, so a run is reproducible.
Hessians are accumulated in float64 and rounded to float32 once, after the sum over every rank: how the batches
are grouped changes a float64 sum only in its last bits (2e-15 relative on the 2B's shapes), so nearly every
entry of the float32 Hessian equals the single process's. Nearly: a few entries in a million land on the other
side of a float32 rounding boundary (2 of 2.4 M in a 2B gate/up Hessian), and GPTQ, which feeds each rounding
error forward, then picks other codes of equal quality (README: measured). On the demo nothing flips and the
exports are byte-identical (tests). Each linear's solve runs on one rank (``assign``: largest first, to the least
loaded rank), and its packed tensors are broadcast (``broadcast_tensors``) so every rank replays the same
quantized layer. Rank 0 alone writes the resume folder and the export; the other ranks send it their batches'
hidden states after each layer (``send_tensors``).

Collectives carry tensors and JSON (as uint8 tensors) only: nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=60)  # rank 0 may hash a checkpoint or write a layer while the others wait


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job: rank of size, and its rank among the processes of its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "World":
        """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one process without it."""
        env = os.environ
        size = int(env.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        world = cls(int(env["RANK"]), size, int(env.get("LOCAL_RANK", env["RANK"])),
                    int(env.get("LOCAL_WORLD_SIZE", size)))
        if not (0 <= world.rank < size and 0 <= world.local_rank < world.local_size):
            raise ValueError(f"bad torchrun environment: RANK {world.rank}, WORLD_SIZE {size}, LOCAL_RANK "
                             f"{world.local_rank}, LOCAL_WORLD_SIZE {world.local_size}")
        return world


SINGLE = World()


def backend_for(device: torch.device) -> str:
    """gloo for CPU tensors always; nccl for CUDA tensors when the ranks compute on GPUs."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def start(world: World, device: torch.device) -> None:
    """Join the process group (rendezvous from MASTER_ADDR / MASTER_PORT); non-leader ranks print nothing."""
    if not world.distributed or dist.is_initialized():
        return
    if world.rank:
        os.environ["QVLQUANT_QUIET"] = "1"  # one set of progress bars and messages: rank 0's
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend_for(device), rank=world.rank, world_size=world.size, timeout=TIMEOUT, **kwargs)


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shard(n: int, world: World, rank: int | None = None) -> range:
    """The contiguous share of ``n`` items (calibration batches) that ``rank`` (default: this one) runs."""
    r = world.rank if rank is None else rank
    return range(n * r // world.size, n * (r + 1) // world.size)


def assign(sizes: dict[str, int], world: World) -> dict[str, int]:
    """name -> the rank that solves it: largest first, each to the least loaded rank (ties: the lower rank), so
    that every rank computes the same assignment. A single process solves everything."""
    load = [0] * world.size
    owner = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world.size), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += sizes[name]
    return {name: owner[name] for name in sizes}  # in the caller's order


def total(t: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's ``t`` summed in rank order, on every rank (for small tensors: it gathers all of them)."""
    if not world.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(world.size)]
    dist.all_gather(parts, t.contiguous())
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def each(n: int, world: World) -> list[int]:
    """Every rank's integer ``n``, in rank order, on every rank."""
    if not world.distributed:
        return [n]
    parts = [torch.empty(1, dtype=torch.int64) for _ in range(world.size)]
    dist.all_gather(parts, torch.tensor([n], dtype=torch.int64))
    return [int(p.item()) for p in parts]


def total_count(n: int, world: World) -> int:
    return sum(each(n, world))


CHUNK_ELEMENTS = 2**23  # point-to-point messages of at most 64 MB of float64: the receiving buffer stays small


def _chunks(t: torch.Tensor) -> list[torch.Tensor]:
    flat = t.view(-1)
    return [flat[i:i + CHUNK_ELEMENTS] for i in range(0, flat.numel(), CHUNK_ELEMENTS)]


def fold(t: torch.Tensor, owners: list[int], world: World) -> torch.Tensor | None:
    """Every rank's ``t`` summed in a fixed order (the first owner's own part, then the other ranks' in rank
    order), delivered to the ranks in ``owners`` only (None elsewhere). ``t`` (contiguous) is consumed: the first
    owner adds the others into it, receiving them in 64 MB pieces, and the other owners receive the sum into it,
    so a [K, K] Hessian is never held twice."""
    if not world.distributed:
        return t
    first = owners[0]
    pieces = _chunks(t)
    if world.rank == first:
        buf = torch.empty_like(pieces[0])
        for r in range(world.size):
            if r != world.rank:
                for piece in pieces:
                    dist.recv(buf[:piece.numel()], src=r)
                    piece.add_(buf[:piece.numel()])
        for r in owners[1:]:
            for piece in pieces:
                dist.send(piece, dst=r)
        return t
    for piece in pieces:
        dist.send(piece, dst=first)
    if world.rank not in owners:
        return None
    for piece in pieces:
        dist.recv(piece, src=first)
    return t


def _header(tensors: dict[str, torch.Tensor], extra) -> torch.Tensor:
    entries = [[k, str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors.items()]
    data = json.dumps({"tensors": entries, "extra": extra}).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _empty(entries) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, dtype=getattr(torch, dtype)) for k, dtype, shape in entries}


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, extra, src: int, world: World):
    """``src``'s CPU tensors and a JSON-able ``extra``, on every rank. -> (tensors, extra)."""
    if not world.distributed:
        return tensors, extra
    if world.rank == src:
        head = _header(tensors, extra)
        dist.broadcast(torch.tensor([head.numel()], dtype=torch.int64), src=src)
        dist.broadcast(head, src=src)
        for t in tensors.values():
            dist.broadcast(t.contiguous(), src=src)
        return tensors, extra
    n = torch.empty(1, dtype=torch.int64)
    dist.broadcast(n, src=src)
    head = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.broadcast(head, src=src)
    meta = json.loads(head.numpy().tobytes())
    out = _empty(meta["tensors"])
    for t in out.values():
        dist.broadcast(t, src=src)
    return out, meta["extra"]


def broadcast_json(obj, src: int, world: World):
    return broadcast_tensors({}, obj, src, world)[1]


def send_tensors(tensors: dict[str, torch.Tensor], dst: int) -> None:
    """CPU tensors to one rank (point to point; the receiver learns names, dtypes and shapes from a header)."""
    head = _header(tensors, None)
    dist.send(torch.tensor([head.numel()], dtype=torch.int64), dst=dst)
    dist.send(head, dst=dst)
    for t in tensors.values():
        dist.send(t.contiguous(), dst=dst)


def recv_tensors(src: int) -> dict[str, torch.Tensor]:
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src=src)
    head = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.recv(head, src=src)
    out = _empty(json.loads(head.numpy().tobytes())["tensors"])
    for t in out.values():
        dist.recv(t, src=src)
    return out


def check_same(value: str, what: str, world: World) -> None:
    """Every rank must hold rank 0's ``value`` (a digest): ranks that built different calibration batches, or
    read a different checkpoint, would quantize from different data."""
    if not world.distributed:
        return
    ours = broadcast_json(value if world.leader else None, 0, world)
    agree = total(torch.tensor([int(ours == value)], dtype=torch.int64), world)
    if int(agree.item()) != world.size:
        raise RuntimeError(f"the ranks disagree about {what} (rank {world.rank}: {'same' if ours == value else 'different'}"
                           f"); every rank must see the same model and calibration data")
