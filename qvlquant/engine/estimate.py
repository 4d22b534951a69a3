"""What a run will need, said before it starts: peak memory (RAM, GPU) and time per layer, from the config alone.

Memory: the capture pass holds the parts besides the decoder layers (vision tower in the compute dtype, the
token embedding in the checkpoint's); then one decoder layer in the compute dtype plus the method's working set
(GPTQ: its largest Hessian's float64 sum and float32 copy; AWQ: the inputs of the linear groups and the clipping temporaries);
the calibration activations; and about 0.7 GiB for Python, torch and transformers. Time: operation counts at
speeds measured on this machine when the run starts: the method's floating-point work per layer at the speed of
one matmul, plus its small torch calls (a pass through the layer per batch and replay, GPTQ's column steps) at the
time of one small module call, which is what a small model's layer mostly costs; a MoE layer's routed experts at
the time of one weight element of a few-token matmul, since each expert sees a few tokens per batch and its linears
cost the reading of their weights, not their flops (``expert_work``); then scaled by the machine's load
(its one-minute load average over this process's CPU quota), since the measured speed is this machine's best and
other processes take their share of it. A rough figure: the report records what was measured beside it.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from qvlquant.config import JobConfig
from qvlquant.families import ModelFamily
from qvlquant.parallel.devices import compute_dtype, cpu_quota
from qvlquant.parallel.distributed import World, assign
from qvlquant.quant.apply import EXPERT_HESSIAN_BYTES, gptq_steps

BASE_RSS = int(0.7 * 2**30)  # interpreter, torch, transformers and the processor, measured here
GiB = 2**30


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Small torch calls per unit of work, in units of one small nn.Linear call, counted on this project's 2-core CPU
# against the demo's measured layers: one decoder layer's forward on one batch with the loop's hooks and Hessian
# sums (a 1-token forward alone is ~53), and one step of GPTQ's column loop (gptq.gptq_quantize: ~80-100 us).
CALLS_PER_PASS = 90
CALLS_PER_COLUMN = 14
# One routed expert in one pass of one batch (``ExpertLinears.forward``: its tokens gathered, its three linears, the
# weighted index_add), in the same units: measured here on 256 experts of 8 x 8 linears (no matmul work to speak
# of), top-8 of 132 tokens (benchmarks/bench_estimate_rates.py): 25-30 in four runs, 12-14 in two more (the shared
# machine's load moves the ratio); the larger kept, a MoE pass's calls are a few % of its time at 35B-A3B
CALLS_PER_EXPERT = 27


@dataclasses.dataclass(frozen=True)
class Speed:
    """This machine's speed, measured when the run starts: the best of a few tries (its speed, not its share
    under load)."""
    flops: float  # floating-point operations per second of one square matmul (512 on a CPU, 4096 on a GPU)
    call_seconds: float  # one small nn.Linear call: Python, module and dispatch overhead
    # one weight element of a linear applied to a few (4) tokens: its matmul reads the whole weight whatever the
    # tokens, which is what a MoE expert's linear costs per batch
    weight_seconds: float


def _best_seconds(fn, device: torch.device, tries: int) -> float:
    fn()  # warm-up: first calls allocate
    best = float("inf")
    for _ in range(tries):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return max(best, 1e-9)


@torch.no_grad()
def measured_speed(device: torch.device, dtype: torch.dtype) -> Speed:
    """Time one square matmul, one small linear module call and expert-sized linears on 4 tokens on ``device`` in
    ``dtype`` (best of a few). The CPU's matmul is short (a few ms) so that one of the tries runs between other
    processes' time slices: the load is accounted for apart (``machine_load``); a GPU's is large enough to reach
    its throughput. The expert-sized weights ([512, 2048], a 35B-A3B expert's gate) take 64 MiB together (128 on
    a GPU), more than a cache holds, as a MoE layer's experts do."""
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    small = torch.nn.Linear(8, 8, device=device, dtype=dtype)
    x = torch.randn(4, 8, device=device, dtype=dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    count = (2**27 if device.type == "cuda" else 2**26) // (512 * 2048 * size)
    weights = [torch.full((512, 2048), 0.01, device=device, dtype=dtype) for _ in range(count)]
    few = torch.full((4, 2048), 0.01, device=device, dtype=dtype)
    experts = _best_seconds(lambda: [torch.nn.functional.linear(few, w) for w in weights], device, 3)
    return Speed(flops=2 * n**3 / _best_seconds(lambda: a @ a, device, 10),
                 call_seconds=_best_seconds(lambda: small(x), device, 50),
                 weight_seconds=experts / (count * 512 * 2048))


def machine_load() -> tuple[float, int]:
    """The one-minute load average and this process's CPU quota (``devices.cpu_quota``)."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform: assume no other load
        load = 0.0
    return load, cpu_quota()


def layer_calls(layer: torch.nn.Module, family: ModelFamily, qcfg, batches: int, processes: int = 1) -> int:
    """The small torch calls of one decoder layer, outside its large matmuls, as the slowest of ``processes``
    (each holding ``batches`` batches) makes them: a pass through the layer per batch and replay (the next layer's
    inputs, the Hessians' replays per true-sequential group, AWQ's input capture and its attention scale search
    per grid point), and GPTQ's column steps over the input columns of the linears it solves (each linear on one
    rank, ``distributed.assign``: a MoE layer's hundreds of expert linears spread over the ranks)."""
    gptq = qcfg.method == "gptq" or (qcfg.method == "awq" and qcfg.awq_rounding == "gptq")
    steps = gptq_steps(layer, list(family.linear_groups), family, qcfg.true_sequential) if gptq else []
    passes = 1 + len(steps) + ({"awq": 1 + qcfg.awq_grid}.get(qcfg.method, 0))
    shapes = {n: (layer.get_submodule(n).out_features, layer.get_submodule(n).in_features) for n in family.linears}
    columns = _slowest(shapes, [[n for g in step for n in g] for step in steps], processes, lambda n, k: k)
    return batches * passes * CALLS_PER_PASS + int(columns) * CALLS_PER_COLUMN


def layer_flops(layer: torch.nn.Module, family: ModelFamily, method: str, tokens: int, padded: int | None,
                processes: int = 1, true_sequential: bool = True) -> float:
    """The method's floating-point work on one decoder layer (replays, Hessians, solves, searches), as the slowest
    of ``processes`` ranks does it: each runs 1/processes of the tokens, and each linear's solve runs on one rank
    (``distributed.assign``), one linear group after the other when true-sequential. A MoE expert's linears see
    their share of the tokens (routed / experts of them, on average)."""
    shapes, share = {}, {}
    for name in family.linears:
        lin = layer.get_submodule(name)
        n, k = lin.out_features, lin.in_features
        if padded and name in family.mlp_in:
            n = padded
        if padded and name == family.mlp_out:
            k = padded
        shapes[name] = (n, k)
        share[name] = family.routed / family.expert_count if family.expert_of(name) is not None else 1.0
    tokens = -(-tokens // processes)
    forward = 2 * tokens * sum(n * k * share[name] for name, (n, k) in shapes.items())
    if method == "rtn":
        return forward + _slowest(shapes, [list(shapes)], processes, lambda n, k: 10 * n * k)
    if method == "gptq":
        hessians = sum(2 * tokens * k * k * share[name] for name, (n, k) in shapes.items())
        steps = [list(g) for g in family.linear_groups] if true_sequential else [list(shapes)]
        return 5 * forward + hessians + _slowest(shapes, steps, processes, lambda n, k: 2 * n * k * k + 2 * k**3)
    clip_tokens = min(tokens * processes, 512)
    return 41 * forward + _slowest(shapes, [list(shapes)], processes, lambda n, k: 2 * n * k * clip_tokens * 60)


def expert_work(layer: torch.nn.Module, family: ModelFamily, qcfg, tokens: int, batches: int,
                processes: int = 1) -> tuple[float, float]:
    """What a MoE layer's routed experts cost besides their floating-point work, as the slowest of ``processes``
    ranks (each holding 1/processes of the batches) does it: (weight elements, small calls); (0, 0) for a layer
    without experts. An expert sees a few tokens of a batch (tokens x routed / experts over the batches: 4 at 35B-A3B
    with 16 samples), so each pass of a batch through the block costs each expert it reaches the reading of its
    three weights (``Speed.weight_seconds`` per element) and ``CALLS_PER_EXPERT`` calls, whatever its tokens. The
    passes: every replay of GPTQ's steps, which stops at the step's last group (a chunk of gate/up groups runs the
    experts before its own), AWQ's input capture, and the replay for the next layer's inputs; AWQ's scale search
    adds its grid's calls of each expert's down linear. GPTQ adds, per expert group and batch, one pass over the
    group's float64 Hessian sum (``accumulate_hessian``'s addmm of a few rows into [K, K]: 1.0-1.1 times a
    few-token linear's time per element here, benchmarks/bench_estimate_rates.py; counted at that rate), and the
    in-block updates of each expert linear's column loop (hundreds of small solves, each at that pace)."""
    first = [n for n in family.linears if family.expert_of(n) == 0]  # one expert's linears, in execution order
    if not first:  # no experts, or a dense layer of a mixed model
        return 0.0, 0.0
    size = {n: layer.get_submodule(n).weight.numel() for n in family.linears}
    per_expert = sum(size[n] for n in first)
    groups = list(family.linear_groups)
    first_expert_group = min(i for i, g in enumerate(groups) if family.expert_of(g[0]) is not None)

    def run_before(name: str) -> float:
        """Expert weight elements a replay stopped at linear ``name`` has run (experts run one after another)."""
        e = family.expert_of(name)
        if e is None:  # a dense linear: before the experts, or after all of them
            after = next(i for i, g in enumerate(groups) if name in g) > first_expert_group
            return family.expert_count * per_expert if after else 0
        template = [family.expert_template(n) for n in first]
        return e * per_expert + sum(size[n] for n in first[:template.index(family.expert_template(name))])

    gptq = qcfg.method == "gptq" or (qcfg.method == "awq" and qcfg.awq_rounding == "gptq")
    steps = gptq_steps(layer, groups, family, qcfg.true_sequential) if gptq else []
    full = family.expert_count * per_expert
    elements = full * (1 + (qcfg.method == "awq")) + sum(run_before(step[-1][0]) for step in steps)  # a batch's
    hessians = sum(layer.get_submodule(g[0]).in_features ** 2 for step in steps for g in step
                   if family.expert_of(g[0]) is not None)  # one pass over each expert group's sum per batch
    reached = 1 - (1 - family.routed / family.expert_count) ** (tokens / max(1, batches))  # a batch, an expert
    mine = -(-batches // processes)
    searched = 0.0
    if qcfg.method == "awq":  # each expert's up -> down scale search: its grid's calls of the down linear
        searched = qcfg.awq_grid * sum(size[n] for g in family.scaling_groups
                                        if family.expert_of(g.linears[0]) is not None for n in g.linears)
    calls = mine * reached * elements / per_expert * CALLS_PER_EXPERT
    if qcfg.method == "awq":  # a grid point of an expert's search (weights scaled, its down linear, the loss)
        calls += qcfg.awq_grid * sum(family.expert_of(g.linears[0]) is not None for g in family.scaling_groups) \
            * CALLS_PER_EXPERT  # counted as one pass of the expert
    # GPTQ's column loop updates the rest of its block after each column: an outer product [N, b - i] written by
    # a matmul, then read and subtracted from the block's slice (4 accesses an element), b/2 columns on average:
    # 2 N K (b + 1) per linear; at matmul speed in the flop count, it runs at a few-token matmul's pace
    # (benchmarks/bench_estimate_rates.py: a row costs a column step 190-330 weight elements' time, 258 counted)
    experts = {n: (layer.get_submodule(n).out_features, layer.get_submodule(n).in_features)
               for step in steps for g in step for n in g if family.expert_of(n) is not None}
    blocks = _slowest(experts, [[n for g in step for n in g if n in experts] for step in steps], processes,
                      lambda n, k: 2 * n * k * (qcfg.block_size + 1))
    return mine * reached * (elements + hessians) + searched + blocks, calls


def _slowest(shapes: dict, steps: list[list[str]], processes: int, cost) -> float:
    """Per step, the most loaded rank's solve work under the loop's own assignment (by weight size)."""
    out = 0.0
    for step in steps:
        owner = assign({name: shapes[name][0] * shapes[name][1] for name in step}, World(0, processes))
        out += max(sum(cost(*shapes[name]) for name in step if owner[name] == r) for r in range(processes))
    return out


def estimate(skeleton, family: ModelFamily, config: JobConfig, device: torch.device, tokens: int,
             storage: torch.dtype, processes: int = 1, speed: Speed | None = None) -> dict:
    """Peak RAM / GPU memory (GiB, per process) and seconds per layer for this job, from the meta skeleton's
    shapes (its config holds the padded intermediate size, if any), ``tokens`` calibration tokens (over all
    ``processes``) and the checkpoint's dtype. ``speed``: the device's, for a figure computed for a device this
    machine is not (benchmarks/estimate_qwen3_5.py); then nothing is measured and this machine's load is not
    counted. None: measured now, scaled by the load."""
    dtype = compute_dtype(device, config.device.dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    stored = torch.tensor([], dtype=storage).element_size()
    text = getattr(skeleton.config, "text_config", skeleton.config)
    padded = text.intermediate_size if config.pad_intermediate_to else None
    layers = skeleton.get_submodule(family.decoder_layers)
    embed = _numel(skeleton.get_submodule(family.embed_tokens))
    lm_head_and_layers = _numel(layers) + (0 if _shares_embedding(skeleton, family) else
                                           _numel(skeleton.get_submodule(family.lm_head)))
    capture = (_numel(skeleton) - embed - lm_head_and_layers) * stored + embed * stored  # held as stored, see models
    # hybrid models: the costliest layer type's first layer stands for every layer
    kinds = [(layers[i], family.at(i)) for i in (family.first_layers() or {0: None})]
    layer_params = max(_numel(layer) for layer, _ in kinds) * size
    k_max = max(layer.get_submodule(n).in_features for layer, kind in kinds for n in kind.linears)
    k_max = max(k_max, padded or 0)
    hidden = text.hidden_size
    activations = 2 * -(-tokens // processes) * hidden * size
    method = config.quant.method
    # GPTQ: the float64 sum of the largest Hessian and its float32 copy, at the moment it is rounded; a MoE layer's
    # experts' sums collected together, at most EXPERT_HESSIAN_BYTES (or one expert's)
    work = {"rtn": layer_params, "gptq": (8 + 4) * k_max * k_max + layer_params // 2,
            "awq": tokens * (3 * hidden + (padded or k_max)) * size + 2**25 * 4 * 4}[method]
    if family.experts:
        k_expert = max(layer.get_submodule(n).in_features for layer, kind in kinds for n in kind.linears
                       if kind.expert_of(n) is not None)
        sums = min(EXPERT_HESSIAN_BYTES, family.expert_count * 8 * k_expert**2)
        # AWQ holds every expert's routed inputs: each token reaches ``routed`` experts' gate/up and down
        routed_inputs = tokens * family.routed * (hidden + k_expert) * size
        work = {"rtn": work, "gptq": max(work, max(sums, 8 * k_expert**2) + layer_params // 2),
                "awq": work + routed_inputs}[method]
    on_device = max(capture, layer_params + work) + activations
    given = speed is not None
    speed = speed or measured_speed(device, dtype)
    batches = -(-config.calib.num_samples // config.processing.batch_size)
    seconds = max(_layer_seconds(layer, kind, config, tokens, padded, batches, processes, speed)
                  for layer, kind in kinds)
    load, cpus = (0.0, 1) if given else machine_load()
    slowdown = max(1.0, load / cpus)  # other processes' share of the CPUs (a GPU's kernels also wait on the CPU)
    gpu = device.type == "cuda"
    return {
        "peak_ram_gib": round((BASE_RSS + (activations if gpu else on_device)) / GiB, 2),
        "peak_gpu_gib": round(on_device / GiB, 2) if gpu else None,
        "seconds_per_layer": round(seconds * slowdown, 3),
        "layers": len(layers),
        "measured_gflops": round(speed.flops / 1e9, 1),
        "measured_call_us": round(speed.call_seconds * 1e6, 1),
        "measured_weight_ns": round(speed.weight_seconds * 1e9, 3),
        "load": round(load, 1),
        "cpus": cpus,
        "tokens": tokens,
        "processes": processes,
    }


def _layer_seconds(layer, kind: ModelFamily, config: JobConfig, tokens: int, padded: int | None, batches: int,
                   processes: int, speed: Speed) -> float:
    """One decoder layer's seconds on the slowest rank at ``speed``: flops, small calls, the experts' weight passes."""
    qcfg = config.quant
    flops = layer_flops(layer, kind, qcfg.method, tokens, padded, processes, qcfg.true_sequential)
    calls = layer_calls(layer, kind, qcfg, -(-batches // processes), processes)
    elements, expert_calls = expert_work(layer, kind, qcfg, tokens, batches, processes)
    return flops / speed.flops + (calls + expert_calls) * speed.call_seconds + elements * speed.weight_seconds


def _shares_embedding(skeleton, family: ModelFamily) -> bool:
    head = skeleton.get_submodule(family.lm_head).weight
    return head is skeleton.get_submodule(family.embed_tokens).weight


def format_duration(seconds: float) -> str:
    """A rough duration with the unit that keeps a significant digit: never "0 s"."""
    if seconds < 0.1:
        return "under 0.1 s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimate(e: dict) -> str:
    gpu = f", GPU {e['peak_gpu_gib']:.1f} GiB" if e["peak_gpu_gib"] is not None else ""
    each = f" per process ({e['processes']} processes)" if e.get("processes", 1) > 1 else ""
    total = e["seconds_per_layer"] * e["layers"]
    load = (f"; machine load {e['load']:.1f} on {e['cpus']} CPUs: times x{e['load'] / e['cpus']:.1f}"
            if e["load"] > e["cpus"] else "")
    return (f"estimate: peak RAM {e['peak_ram_gib']:.1f} GiB{gpu}{each}; roughly "
            f"{format_duration(e['seconds_per_layer'])} per layer, {format_duration(total)} for {e['layers']} "
            f"layers (rough estimate: operation counts at {e['measured_gflops']:.0f} GFLOP/s and "
            f"{e['measured_call_us']:.0f} us per small call measured now, {e['tokens']} calibration tokens{load})")
