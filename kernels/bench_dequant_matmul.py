"""Fused W4A16 / W8A16 kernels vs torch bf16 matmul vs dequantize-then-matmul, on the linear shapes of Qwen2-VL.

    python kernels/bench_dequant_matmul.py [--json kernels/results/GPU.json] [--m 1,16,64,256,2048]

Needs a CUDA GPU. Prints, per shape and M: microseconds of each path, the kernel's speed-up over bf16, and the
memory bandwidth it achieved as a fraction of the device's peak (nominal peak from the table below when the device
is known, else a measured device-to-device copy).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

SHAPES = {  # name: (in_features K, out_features N)
    "qwen2-vl-2b": {"q/o_proj": (1536, 1536), "k/v_proj": (1536, 256), "gate/up_proj": (1536, 8960),
                    "down_proj": (8960, 1536)},
    "qwen2-vl-7b": {"q/o_proj": (3584, 3584), "k/v_proj": (3584, 512), "gate/up_proj": (3584, 18944),
                    "down_proj": (18944, 3584)},
}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,16,64,256,2048")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_dequant_matmul needs a CUDA GPU (the kernels' correctness is tested on CPU in the test suite)")
    from triton.testing import do_bench

    from qvlquant.kernels.dequant_matmul import dequant_matmul
    from qvlquant.quant.formats import PackFormat, QuantizedWeight
    from qvlquant.quant.rtn import QuantSpec, default_g_idx, rtn_quantize

    peak, peak_note = peak_bandwidth()
    rows = []
    print(f"peak bandwidth: {peak_note}")
    print(f"{'model':<12} {'linear':<13} {'M':>5} {'fmt':<9} {'bf16 us':>9} {'deq+mm us':>10} {'fused us':>9} {'x bf16':>7} {'BW %':>6}")
    for model, shapes in SHAPES.items():
        for lin, (k, n) in shapes.items():
            w = torch.randn(n, k)
            w_bf16 = w.to("cuda", torch.bfloat16)
            for fmt, spec in ((PackFormat.GPTQ, QuantSpec(4, 128, True)), (PackFormat.AWQ_GEMM, QuantSpec(4, 128, False)),
                              (PackFormat.GPTQ, QuantSpec(8, 128, True))):
                q, s, z = rtn_quantize(w, spec)
                tensors = {key: t.cuda() for key, t in fmt.pack(QuantizedWeight(q, s, z, default_g_idx(k, spec), spec)).items()}
                weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
                label = f"{'awq' if fmt is PackFormat.AWQ_GEMM else 'gptq'}-w{spec.bits}"
                for m in [int(v) for v in args.m.split(",")]:
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    t_bf16 = do_bench(lambda: torch.nn.functional.linear(x, w_bf16))
                    t_deq = do_bench(lambda: torch.nn.functional.linear(
                        x, fmt.unpack(tensors, spec, k).dequantize().to(torch.bfloat16)))
                    t_fused = do_bench(lambda: dequant_matmul(x, tensors, fmt, spec, k, act_order=False))
                    moved = weight_bytes + 2 * m * (k + n)
                    bw = moved / (t_fused * 1e-3) / peak
                    rows.append(dict(model=model, linear=lin, k=k, n=n, m=m, fmt=label, bf16_us=t_bf16 * 1e3,
                                     dequant_matmul_us=t_deq * 1e3, fused_us=t_fused * 1e3,
                                     speedup_vs_bf16=t_bf16 / t_fused, bandwidth_fraction=bw))
                    print(f"{model:<12} {lin:<13} {m:>5} {label:<9} {t_bf16 * 1e3:>9.1f} {t_deq * 1e3:>10.1f} "
                          f"{t_fused * 1e3:>9.1f} {t_bf16 / t_fused:>7.2f} {100 * bw:>5.0f}%")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "peak": peak_note, "torch": torch.__version__}
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
