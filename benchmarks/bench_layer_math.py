"""The per-linear math that has no calibration in it, timed on one decoder layer of a real shape: RTN rounding,
packing into each export layout, and GPTQ's mse range search (all groups of the layer, as the solve meets them).

    python benchmarks/bench_layer_math.py [--shape qwen2-vl-7b] [--bits 4] [--repeats 3] [--threads 1] [--json F]

Random bf16 weights of the shape's decoder-layer linears (speed does not depend on the values). Each step is
timed ``--repeats`` times and the median kept. To compare two versions of the code, run the script with each on
``PYTHONPATH`` one after the other (or interleaved), same machine and threads, and put the JSON files side by side:
the rows name the step, so they line up. The load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from qvlquant.quant.awq import scaled_fake_quant
from qvlquant.quant.formats import PackFormat, QuantizedWeight
from qvlquant.quant.rtn import default_g_idx, mse_qparams, rtn_quantize
from qvlquant.quant.spec import QuantSpec
from qvlquant.tools.bench import SHAPES

MSE_SAMPLE = 16  # the mse search is timed on every 16th group of each linear and scaled by 16


def layer_linears(shape: str) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of one decoder layer of ``shape`` (qvlquant.tools.bench.SHAPES)."""
    text = SHAPES[shape]
    h, i = text["hidden_size"], text["intermediate_size"]
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    d = h // heads
    return {"q_proj": (h, h), "k_proj": (kv * d, h), "v_proj": (kv * d, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen2-vl-7b", choices=sorted(SHAPES))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--mse-bits", type=int, default=3, help="width of the mse range search (its default below 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    linears = layer_linears(args.shape)
    spec = QuantSpec(args.bits, 128, True)
    totals: dict[str, float] = {}
    for name, (n, k) in linears.items():
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        q, scale, zero = rtn_quantize(w, spec)
        qw = QuantizedWeight(q, scale, zero, default_g_idx(k, spec), spec)
        asym = QuantizedWeight(*rtn_quantize(w, QuantSpec(4, 128, False)), default_g_idx(k, spec), QuantSpec(4, 128, False))
        steps = {
            f"rtn_quantize W{args.bits}": lambda: rtn_quantize(w, spec),
            f"pack GPTQ W{args.bits}": lambda: PackFormat.GPTQ.pack(qw),
            f"pack compressed-tensors W{args.bits}": lambda: PackFormat.COMPRESSED.pack(qw),
            "pack AWQ GEMM W4": lambda: PackFormat.AWQ_GEMM.pack(asym),
        }
        import qvlquant.quant.formats as formats

        if hasattr(formats, "pack_rtn"):  # rounding and packing a block of rows at a time (the data-free RTN path)
            steps[f"rtn_quantize + pack GPTQ W{args.bits}, whole weight"] = \
                lambda: PackFormat.GPTQ.pack(QuantizedWeight(*rtn_quantize(w.float(), spec), default_g_idx(k, spec), spec))
            steps[f"rtn_quantize + pack GPTQ W{args.bits}, blocks of rows (pack_rtn)"] = \
                lambda: formats.pack_rtn(w, spec, PackFormat.GPTQ)
        s_awq = torch.rand(k, generator=g) + 0.5  # one AWQ grid point: Q(W diag(s)) / s, asymmetric W4 g128
        steps["AWQ scaled fake-quant W4, one grid point"] = lambda: scaled_fake_quant(w, s_awq, QuantSpec(4, 128, False))
        if args.mse_bits:
            wf = w.float().reshape(-1, 128)[::MSE_SAMPLE]  # every 16th group (linear in them; scaled back below)
            mse_spec = QuantSpec(args.mse_bits, -1, True)
            steps[f"mse range search W{args.mse_bits}"] = lambda: mse_qparams(wf, mse_spec)
            if "coarse" in inspect.signature(mse_qparams).parameters:  # the exhaustive grid beside it, same run
                steps[f"mse range search W{args.mse_bits}, exhaustive (coarse=1)"] = \
                    lambda: mse_qparams(wf, mse_spec, coarse=1)
        for step, fn in steps.items():
            t = timed(fn, args.repeats) * (MSE_SAMPLE if step.startswith("mse") else 1)
            totals[step] = totals.get(step, 0.0) + t
    import qvlquant

    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(qvlquant.__file__)).stdout.strip()
    meta = {"shape": args.shape, "threads": args.threads, "repeats": args.repeats, "machine":
            f"{platform.machine()}, {os.cpu_count()} cores", "qvlquant": os.path.dirname(qvlquant.__file__),
            "git_head": code, "mse_groups_sampled": f"1 in {MSE_SAMPLE}", "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(f"{args.shape}, one decoder layer, {args.threads} thread(s), median of {args.repeats}; load "
          f"{load_before[0]:.1f} -> {meta['load_average_after'][0]:.1f}; qvlquant from {meta['qvlquant']}")
    print("| step | seconds per layer |\n|---|---|")
    for step, t in totals.items():
        print(f"| {step} | {t:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "seconds_per_layer": totals}, f, indent=1)


if __name__ == "__main__":
    main()
