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

from qvlquant.quant.formats import PackFormat, QuantizedWeight
from qvlquant.quant.rtn import default_g_idx, rtn_quantize
from qvlquant.quant.spec import QuantSpec
from qvlquant.tools.bench import decoder_linears

LAYOUTS = {"gptq-w4": (PackFormat.GPTQ, QuantSpec(4, 128, True)),
           "awq-w4": (PackFormat.AWQ_GEMM, QuantSpec(4, 128, False)),
           "gptq-w8": (PackFormat.GPTQ, QuantSpec(8, 128, True))}
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


def packed_on(w: torch.Tensor, fmt: PackFormat, spec: QuantSpec, device: str) -> dict[str, torch.Tensor]:
    """RTN codes of ``w`` [N, K] in ``fmt``'s packed layout, on ``device``."""
    q, s, z = rtn_quantize(w, spec)
    packed = fmt.pack(QuantizedWeight(q, s, z, default_g_idx(w.shape[1], spec), spec))
    return {key: t.to(device) for key, t in packed.items()}


def measure(km, x: torch.Tensor, w_dense: torch.Tensor, tensors: dict[str, torch.Tensor], layout: tuple, bench) -> dict:
    """Milliseconds of bf16 ``F.linear``, dequantize-then-matmul and the fused kernel (module ``km``) on one problem,
    after checking that fused and two-step results agree: a benchmark of a wrong kernel measures nothing."""
    fmt, spec = layout
    k = x.shape[-1]
    fused = km.dequant_matmul(x, tensors, fmt, spec, k, act_order=False)
    two_step = km.dequantize_then_matmul(x, tensors, fmt, spec, k, act_order=False)
    err = (fused.float() - two_step.float()).abs().max().item() / (two_step.float().abs().max().item() + 1e-9)
    if err > 2e-2:
        raise ValueError(f"fused and two-step results differ (rel. {err:.3g})")
    return dict(bf16=bench(lambda: torch.nn.functional.linear(x, w_dense)),
                two_step=bench(lambda: km.dequantize_then_matmul(x, tensors, fmt, spec, k, act_order=False)),
                fused=bench(lambda: km.dequant_matmul(x, tensors, fmt, spec, k, act_order=False)))


def cpu_bench(fn) -> float:
    """Milliseconds of one call (the dry run: the path is exercised, the figure means nothing)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


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
    # imported here, after --dry-run has set TRITON_INTERPRET: the kernels are defined (interpreted or not) on import
    import qvlquant.kernels.dequant_matmul as km

    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        models, bench = ("demo",), cpu_bench
        peak, peak_note = None, "dry run (no GPU): timings and bandwidth are meaningless"
    else:
        from triton.testing import do_bench as bench  # CUDA only

        models = ("qwen2-vl-2b", "qwen2-vl-7b")
        peak, peak_note = peak_bandwidth()
    dtype = torch.float16 if args.dry_run else torch.bfloat16  # the interpreter upcasts either; fp16 keeps numpy exact
    rows = []
    print(f"peak bandwidth: {peak_note}")
    print(f"{'model':<12} {'linear':<13} {'M':>5} {'fmt':<9} {'bf16 us':>9} {'deq+mm us':>10} {'fused us':>9} "
          f"{'x bf16':>7} {'x deq+mm':>8} {'BW %':>6}")
    for model in models:
        for lin, (k, n) in decoder_linears(model).items():
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
            w_dense = w.to(device, dtype)
            for label, layout in LAYOUTS.items():
                tensors = packed_on(w, *layout, device)
                weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
                for m in [int(v) for v in args.m.split(",")]:
                    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, dtype)
                    try:
                        ms = measure(km, x, w_dense, tensors, layout, bench)
                    except ValueError as e:
                        sys.exit(f"{model} {lin} {label} M={m}: {e}")
                    bw = (weight_bytes + x.element_size() * m * (k + n)) / (ms["fused"] * 1e-3) / peak if peak else None
                    rows.append(dict(model=model, linear=lin, k=k, n=n, m=m, fmt=label, bf16_us=ms["bf16"] * 1e3,
                                     dequant_matmul_us=ms["two_step"] * 1e3, fused_us=ms["fused"] * 1e3,
                                     speedup_vs_bf16=ms["bf16"] / ms["fused"],
                                     speedup_vs_dequant_matmul=ms["two_step"] / ms["fused"], bandwidth_fraction=bw))
                    print(f"{model:<12} {lin:<13} {m:>5} {label:<9} {ms['bf16'] * 1e3:>9.1f} "
                          f"{ms['two_step'] * 1e3:>10.1f} {ms['fused'] * 1e3:>9.1f} {ms['bf16'] / ms['fused']:>7.2f} "
                          f"{ms['two_step'] / ms['fused']:>8.2f} {'-' if bw is None else f'{100 * bw:.0f}%':>6}")
    if args.json:
        write_json(args.json, rows, device, peak_note, dtype)
    return rows


def write_json(path: str, rows: list[dict], device: str, peak_note: str, dtype: torch.dtype) -> None:
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)", "peak": peak_note,
            "torch": torch.__version__, "dtype": str(dtype),
            "baselines": "bf16: F.linear on the dense weight (cuBLAS); deq+mm: Triton kernel writes the whole "
                         "weight, then matmul"}
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
