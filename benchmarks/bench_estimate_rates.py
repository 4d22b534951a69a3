"""The rates behind the up-front estimate's MoE terms (``qvlquant.engine.estimate``), measured on this machine in
one process, one thread, best of a few tries (the machine is shared; its speed varies 2x from minute to minute):

- ``measured_speed``: the estimate's own rates (matmul GFLOP/s, one small call, one weight element of a few-token
  linear);
- calls per expert: ``ExpertLinears`` of 256 experts of 8 x 8 linears (no matmul work), top-8 of 132 tokens, in
  units of one small call (``CALLS_PER_EXPERT``);
- a few-row float64 addmm into a [2048, 2048] sum (``accumulate_hessian`` for one expert and batch), per element,
  over one weight element of the few-token linears;
- GPTQ at N = 8 and N = 512 rows (K = 1024): per column at 8 rows, in small calls, and what the extra rows cost per
  row and column in weight elements, against the 2 (b + 1) = 258 the estimate counts.

Ratios are taken between two timings back to back (median of several), so that both see the same load.

    OMP_NUM_THREADS=1 python benchmarks/bench_estimate_rates.py --json out.json   # about 30 s
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from qvlquant.config import JobConfig
from qvlquant.engine.estimate import measured_speed
from qvlquant.engine.experts import ExpertLinears
from qvlquant.quant.gptq import accumulate_hessian, gptq_quantize, hessian_with_scratch


def best(fn, tries: int = 5) -> float:
    fn()
    out = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def paired(a, b, tries: int = 7) -> float:
    """The median over ``tries`` of best(a) / best(b) timed back to back: a ratio under the load of one moment."""
    ratios = sorted(best(a, 2) / best(b, 2) for _ in range(tries))
    return ratios[tries // 2]


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    speeds = [measured_speed(torch.device("cpu"), torch.float32) for _ in range(5)]
    call = min(s.call_seconds for s in speeds)
    weight = min(s.weight_seconds for s in speeds)
    out = {"threads": torch.get_num_threads(), "gflops": round(max(s.flops for s in speeds) / 1e9, 1),
           "call_us": round(call * 1e6, 2), "weight_ns": round(weight * 1e9, 3)}

    experts, k, tokens = 256, 8, 132
    block = ExpertLinears(experts, ("gate_proj", "up_proj", "down_proj"), 8, 8, torch.nn.functional.silu,
                          torch.float32, "cpu")
    x, w = torch.randn(tokens, 8), torch.rand(tokens, k)
    index = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])  # [T, k]
    # against the estimate's own small call (best of 50), measured just before each try
    cpu = torch.device("cpu")
    ratios = sorted(best(lambda: block(x, index, w), 3) / measured_speed(cpu, torch.float32).call_seconds
                    for _ in range(5))
    out["calls_per_expert"] = round(ratios[2] / experts, 1)

    S, few = torch.zeros(2048, 2048, dtype=torch.float64), torch.randn(4, 2048)
    weights = [torch.full((512, 2048), 0.01) for _ in range(16)]  # measured_speed's few-token linears
    linears = lambda: [torch.nn.functional.linear(few, v) for v in weights]
    out["hessian_addmm_per_element_over_weight_element"] = round(
        paired(lambda: accumulate_hessian(S, 0, few, None), linears) * 16 * 512 / 2048, 2)

    cfg = JobConfig.from_flat(output="-", method="gptq").quant
    kk = 1024
    xs = torch.randn(256, kk, dtype=torch.float64)
    def solve(n):
        H, _ = hessian_with_scratch(xs.T @ xs, 256)
        return lambda: gptq_quantize(torch.randn(n, kk), H.clone(), cfg)

    # the 512 rows' column loop over the 8 rows' (the factorisation, alike in both, is small at K = 1024)
    ratio = paired(solve(512), solve(8), 5)
    column = best(solve(8), 3) / kk
    out["column_calls_at_8_rows"] = round(column / call, 1)
    out["column_extra_per_row_in_weight_elements"] = round((ratio - 1) * column / (512 - 8) / weight, 0)
    out["column_extra_counted_per_row"] = 2 * (cfg.block_size + 1)
    print(json.dumps(out, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
