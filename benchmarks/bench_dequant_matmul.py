"""Fused W4A16 / W8A16 kernels vs torch bf16 matmul vs dequantize-then-matmul, on the linear shapes of Qwen2-VL.

    python benchmarks/bench_dequant_matmul.py [--json benchmarks/results/GPU.json] [--m 1,16,64,256,2048] [--dry-run]

Needs a CUDA GPU. Prints, per shape and M: microseconds of each path (bf16: F.linear on the dense weight;
deq+mm: a Triton kernel writes the whole dequantized weight, then a dense matmul; fused: this project's kernel),
the fused kernel's speed-up over both, and the memory bandwidth it achieved as a fraction of the device's peak
(nominal peak from the table below when the device is known, else a measured device-to-device copy). Each
problem is first checked: fused and two-step results must agree. ``--dry-run`` runs every path once on small
shapes in Triton's CPU interpreter, so the script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch

PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935}


def peak_bandwidth() -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    for key, gbps in PEAK_GBPS.items():
        if key in name:
            return gbps * 1e9, f"nominal {gbps} GB/s ({name})"
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    from triton.testing import do_bench

    ms = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / (ms * 1e-3), f"measured copy ({name})"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,16,64,256,2048")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: run every path once on small shapes in Triton's "
                    "interpreter (what the test suite does), timings meaningless")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, i.e. imported below
    elif not torch.cuda.is_available():
        sys.exit("bench_dequant_matmul needs a CUDA GPU (or --dry-run; the kernels' correctness is tested on CPU)")
    from qvlquant.kernels.dequant_matmul import LINEAR_SHAPES, dequant_matmul, dequantize_then_matmul
    from qvlquant.quant.formats import PackFormat, QuantizedWeight
    from qvlquant.quant.rtn import QuantSpec, default_g_idx, rtn_quantize

    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        shapes = {"tiny": {"q/o_proj": (256, 256), "k/v_proj": (256, 64), "gate/up_proj": (256, 512), "down_proj": (512, 256)}}
        peak, peak_note = None, "dry run (no GPU): timings and bandwidth are meaningless"

        def bench(fn) -> float:  # milliseconds of one call
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        from triton.testing import do_bench as bench

        shapes = LINEAR_SHAPES
        peak, peak_note = peak_bandwidth()
    dtype = torch.float16 if args.dry_run else torch.bfloat16  # the interpreter upcasts either; fp16 keeps numpy exact
    rows = []
    print(f"peak bandwidth: {peak_note}")
    print(f"{'model':<12} {'linear':<13} {'M':>5} {'fmt':<9} {'bf16 us':>9} {'deq+mm us':>10} {'fused us':>9} "
          f"{'x bf16':>7} {'x deq+mm':>8} {'BW %':>6}")
    for model, linears in shapes.items():
        for lin, (k, n) in linears.items():
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
            w_dense = w.to(device, dtype)
            for fmt, spec in ((PackFormat.GPTQ, QuantSpec(4, 128, True)), (PackFormat.AWQ_GEMM, QuantSpec(4, 128, False)),
                              (PackFormat.GPTQ, QuantSpec(8, 128, True))):
                q, s, z = rtn_quantize(w, spec)
                packed = fmt.pack(QuantizedWeight(q, s, z, default_g_idx(k, spec), spec))
                tensors = {key: t.to(device) for key, t in packed.items()}
                weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
                label = f"{'awq' if fmt is PackFormat.AWQ_GEMM else 'gptq'}-w{spec.bits}"
                for m in [int(v) for v in args.m.split(",")]:
                    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, dtype)
                    fused = dequant_matmul(x, tensors, fmt, spec, k, act_order=False)
                    two_step = dequantize_then_matmul(x, tensors, fmt, spec, k, act_order=False)
                    err = (fused.float() - two_step.float()).abs().max().item() / (two_step.float().abs().max().item() + 1e-9)
                    if err > 2e-2:  # a benchmark of a wrong kernel measures nothing
                        sys.exit(f"{model} {lin} {label} M={m}: fused and two-step results differ (rel. {err:.3g})")
                    t_dense = bench(lambda: torch.nn.functional.linear(x, w_dense))
                    t_two = bench(lambda: dequantize_then_matmul(x, tensors, fmt, spec, k, act_order=False))
                    t_fused = bench(lambda: dequant_matmul(x, tensors, fmt, spec, k, act_order=False))
                    moved = weight_bytes + x.element_size() * m * (k + n)
                    bw = moved / (t_fused * 1e-3) / peak if peak else None
                    rows.append(dict(model=model, linear=lin, k=k, n=n, m=m, fmt=label, bf16_us=t_dense * 1e3,
                                     dequant_matmul_us=t_two * 1e3, fused_us=t_fused * 1e3,
                                     speedup_vs_bf16=t_dense / t_fused, speedup_vs_dequant_matmul=t_two / t_fused,
                                     bandwidth_fraction=bw))
                    print(f"{model:<12} {lin:<13} {m:>5} {label:<9} {t_dense * 1e3:>9.1f} {t_two * 1e3:>10.1f} "
                          f"{t_fused * 1e3:>9.1f} {t_dense / t_fused:>7.2f} {t_two / t_fused:>8.2f} "
                          f"{'-' if bw is None else f'{100 * bw:.0f}%':>6}")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)", "peak": peak_note,
                "torch": torch.__version__, "dtype": str(dtype),
                "baselines": "bf16: F.linear on the dense weight (cuBLAS); deq+mm: Triton kernel writes the whole "
                             "weight, then matmul"}
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
