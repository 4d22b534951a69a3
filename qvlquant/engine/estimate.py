"""What a run will need, said before it starts: peak memory (RAM, GPU) and time per layer, from the config alone.

Memory: the capture pass holds the parts besides the decoder layers (vision tower in the compute dtype, the
token embedding in the checkpoint's); then one decoder layer in the compute dtype plus the method's working set
(GPTQ: its largest Hessian's float64 sum and float32 copy; AWQ: the inputs of the linear groups and the clipping temporaries);
the calibration activations; and about 0.7 GiB for Python, torch and transformers. Time: the method's floating
point work per layer divided by a throughput measured on the device with one matmul, so it is a rough figure;
the report records what was measured beside it.
"""

from __future__ import annotations

import time

import torch

from qvlquant.config import JobConfig
from qvlquant.families import ModelFamily
from qvlquant.parallel.devices import compute_dtype
from qvlquant.parallel.distributed import World, assign

BASE_RSS = int(0.7 * 2**30)  # interpreter, torch, transformers and the processor, measured here
GiB = 2**30


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measured_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Floating-point operations per second of one 1024^2 matmul on ``device`` (best of 3)."""
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * 1024**3 / max(best, 1e-9)


def layer_flops(layer: torch.nn.Module, family: ModelFamily, method: str, tokens: int, padded: int | None,
                processes: int = 1, true_sequential: bool = True) -> float:
    """The method's floating-point work on one decoder layer (replays, Hessians, solves, searches), as the slowest
    of ``processes`` ranks does it: each runs 1/processes of the tokens, and each linear's solve runs on one rank
    (``distributed.assign``), one linear group after the other when true-sequential."""
    shapes = {}
    for name in family.linears:
        lin = layer.get_submodule(name)
        n, k = lin.out_features, lin.in_features
        if padded and name in family.mlp_in:
            n = padded
        if padded and name == family.mlp_out:
            k = padded
        shapes[name] = (n, k)
    tokens = -(-tokens // processes)
    forward = 2 * tokens * sum(n * k for n, k in shapes.values())
    if method == "rtn":
        return forward + _slowest(shapes, [list(shapes)], processes, lambda n, k: 10 * n * k)
    if method == "gptq":
        hessians = sum(2 * tokens * k * k for n, k in shapes.values())
        steps = [list(g) for g in family.linear_groups] if true_sequential else [list(shapes)]
        return 5 * forward + hessians + _slowest(shapes, steps, processes, lambda n, k: 2 * n * k * k + 2 * k**3)
    clip_tokens = min(tokens * processes, 512)
    return 41 * forward + _slowest(shapes, [list(shapes)], processes, lambda n, k: 2 * n * k * clip_tokens * 60)


def _slowest(shapes: dict, steps: list[list[str]], processes: int, cost) -> float:
    """Per step, the most loaded rank's solve work under the loop's own assignment (by weight size)."""
    out = 0.0
    for step in steps:
        owner = assign({name: shapes[name][0] * shapes[name][1] for name in step}, World(0, processes))
        out += max(sum(cost(*shapes[name]) for name in step if owner[name] == r) for r in range(processes))
    return out


def estimate(skeleton, family: ModelFamily, config: JobConfig, device: torch.device, tokens: int,
             storage: torch.dtype, processes: int = 1) -> dict:
    """Peak RAM / GPU memory (GiB, per process) and seconds per layer for this job, from the meta skeleton's
    shapes (its config holds the padded intermediate size, if any), ``tokens`` calibration tokens (over all
    ``processes``) and the checkpoint's dtype."""
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
    layer = layers[0]
    layer_params = _numel(layer) * size
    k_max = max(layer.get_submodule(n).in_features for n in family.linears)
    k_max = max(k_max, padded or 0)
    hidden = text.hidden_size
    activations = 2 * -(-tokens // processes) * hidden * size
    method = config.quant.method
    # GPTQ: the float64 sum of the largest Hessian and its float32 copy, at the moment it is rounded
    work = {"rtn": layer_params, "gptq": (8 + 4) * k_max * k_max + layer_params // 2,
            "awq": tokens * (3 * hidden + (padded or k_max)) * size + 2**25 * 4 * 4}[method]
    on_device = max(capture, layer_params + work) + activations
    flops = measured_flops(device, dtype)
    seconds = layer_flops(layer, family, method, tokens, padded, processes, config.quant.true_sequential) / flops
    gpu = device.type == "cuda"
    return {
        "peak_ram_gib": round((BASE_RSS + (activations if gpu else on_device)) / GiB, 2),
        "peak_gpu_gib": round(on_device / GiB, 2) if gpu else None,
        "seconds_per_layer": round(seconds, 1),
        "layers": len(layers),
        "measured_gflops": round(flops / 1e9, 1),
        "tokens": tokens,
        "processes": processes,
    }


def _shares_embedding(skeleton, family: ModelFamily) -> bool:
    head = skeleton.get_submodule(family.lm_head).weight
    return head is skeleton.get_submodule(family.embed_tokens).weight


def format_estimate(e: dict) -> str:
    gpu = f", GPU {e['peak_gpu_gib']:.1f} GiB" if e["peak_gpu_gib"] is not None else ""
    total = e["seconds_per_layer"] * e["layers"]
    each = f" per process ({e['processes']} processes)" if e.get("processes", 1) > 1 else ""
    return (f"estimate: peak RAM {e['peak_ram_gib']:.1f} GiB{gpu}{each}; about {e['seconds_per_layer']:.0f} s per layer, "
            f"{total / 60:.0f} min for {e['layers']} layers (rough: {e['measured_gflops']:.0f} GFLOP/s measured, "
            f"{e['tokens']} calibration tokens)")
