"""What quantizing a Qwen3.5 MoE needs per decoder layer on a GPU, one process or N ranks: computed (not measured)
with the loop's own up-front estimate (``qvlquant.engine.estimate.estimate``: its memory rule, operation counts and
solve assignment) on a meta skeleton of the released shapes (``make_random_checkpoint.QWEN3_5``, where each number
is from), one decoder layer of each type.

Nothing here ran on a GPU. The time is the estimate's floating-point work over an assumed matmul speed plus its small
torch calls times an assumed time per call plus the routed experts' weight-element passes (``estimate.expert_work``:
each replay's few-token expert matmuls, one pass over each expert Hessian sum per batch, GPTQ's in-block column
updates) times an assumed time per element; two assumptions bracket it (``SPEEDS``): a bf16 matmul at the H200's
dense tensor-core peak (about 989 TFLOP/s, third-party spec pages) with 5 us per call, and float32 at its CUDA-core
peak (about 67 TFLOP/s) with 20 us per call; both with 3.3 ps per element, a float64 read and write (16 bytes) at
the H200's 4.8 TB/s memory bandwidth (its spec), the costliest of the passes counted (a bf16 weight read is 2
bytes). Real runs sit above the FLOP part (peaks are not reached; GPTQ solves in float32) and the per-call time is a
guess, not a measurement; the call and element counts are printed so other figures can be put in. Memory is the estimate's rule: GPU: the capture parts or one layer in bf16 plus the method's working set (GPTQ:
expert Hessian sums in chunks of at most ``EXPERT_HESSIAN_BYTES``) plus the calibration activations; host RAM: the
base process and the activations when they are offloaded.

    python benchmarks/estimate_qwen3_5.py --shape qwen3.5-397b-a17b --tokens 4402 65536 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the sibling script owns the shapes
from make_random_checkpoint import QWEN3_5, qwen3_5_config  # noqa: E402

from qvlquant.config import JobConfig  # noqa: E402
from qvlquant.engine.estimate import Speed, estimate, expert_work, layer_calls, layer_flops  # noqa: E402
from qvlquant.engine.skeleton import build_skeleton  # noqa: E402
from qvlquant.families import family_for  # noqa: E402

ELEMENT_SECONDS = 16 / 4.8e12  # a float64 element read and written at the H200's memory bandwidth
SPEEDS = {  # assumptions, not measurements: see the docstring
    "bf16 peak, 5 us/call": Speed(flops=989e12, call_seconds=5e-6, weight_seconds=ELEMENT_SECONDS),
    "fp32 peak, 20 us/call": Speed(flops=67e12, call_seconds=20e-6, weight_seconds=ELEMENT_SECONDS),
}


def one_layer(shape: str, layer_type: str):
    """A meta skeleton of ``shape`` holding one decoder layer of ``layer_type`` (no memory), and its bound family."""
    config = qwen3_5_config(shape, layers=1, interval=1 if layer_type == "full_attention" else 2)
    family = family_for(config.model_type).bind(config)
    return build_skeleton(config, family, torch.bfloat16), family


def rows(shape: str, tokens_list: list[int], ranks: list[int], samples: int) -> list[dict]:
    out = []
    for layer_type in ("linear_attention", "full_attention"):
        skeleton, family = one_layer(shape, layer_type)
        layer = skeleton.get_submodule(family.decoder_layers)[0]
        kind = family.at(0)
        params = sum(p.numel() for p in layer.parameters())
        for method in ("gptq", "awq"):
            config = JobConfig.from_flat(output="-", method=method, bits=4, group_size=128, num_samples=samples)
            batches = math.ceil(samples / config.processing.batch_size)
            for tokens in tokens_list:
                for n in ranks:
                    row = dict(shape=shape, layer_type=layer_type, layer_params=params, method=method,
                               tokens=tokens, ranks=n,
                               tflop_slowest_rank=round(layer_flops(layer, kind, method, tokens, None, n,
                                                                     config.quant.true_sequential) / 1e12, 2),
                               small_calls=layer_calls(layer, kind, config.quant, math.ceil(batches / n), n)
                               + round(expert_work(layer, kind, config.quant, tokens, batches, n)[1]),
                               expert_giga_elements=round(expert_work(layer, kind, config.quant, tokens, batches,
                                                                      n)[0] / 1e9, 1))
                    for name, speed in SPEEDS.items():
                        e = estimate(skeleton, family, config, torch.device("cuda"), tokens, torch.bfloat16, n, speed)
                        row[f"seconds_per_layer ({name})"] = e["seconds_per_layer"]
                        row.update(peak_gpu_gib=e["peak_gpu_gib"], peak_ram_gib=e["peak_ram_gib"])
                    out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=[s for s, v in QWEN3_5.items() if v[0] == "qwen3_5_moe"], required=True)
    p.add_argument("--tokens", type=int, nargs="+", required=True, help="calibration tokens (over all ranks)")
    p.add_argument("--samples", type=int, default=16, help="calibration samples (batches of the default size)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    table = rows(args.shape, args.tokens, args.ranks, args.samples)
    layers = QWEN3_5[args.shape][1]["num_hidden_layers"]
    for r in table:
        print(json.dumps(r))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"shape": args.shape, "layers": layers, "computed_not_measured": True,
                                                       "speeds_assumed": {k: vars(v) for k, v in SPEEDS.items()},
                                                       "rows": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
