"""Compile the fused kernel's launch configurations for A100 (sm_80) and H100 (sm_90) on a machine with no GPU.

    python benchmarks/compile_report.py [--arch 80,90] [--m 1,16,64,2048] [--shape qwen2-vl-7b] [--all] [--json F]

Triton compiles ahead of time for a named architecture with its bundled ptxas, so shared memory, registers per
thread and register spills of every candidate the autotuner would time are known before any GPU is at hand. This
is not a speed measurement: it says which configurations can launch at all, and flags spills (local-memory
traffic in a kernel that should only stream its weight). Without --all only the default (first) candidate of each
M regime is compiled. Must run without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import torch

CASES = {  # label: (format, bits, group, sym, act_order)
    "gptq-w4": ("GPTQ", 4, 128, True, False),
    "gptq-w4-act-order": ("GPTQ", 4, 128, True, True),
    "awq-w4": ("AWQ_GEMM", 4, 128, False, False),
    "gptq-w8": ("GPTQ", 8, 128, True, False),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90")
    ap.add_argument("--m", default="1,16,64,2048")
    ap.add_argument("--shape", default="qwen2-vl-7b")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--all", action="store_true", help="every autotune candidate, not only the default one")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_report: unset TRITON_INTERPRET (the interpreter patches triton.language in place)")
    from qvlquant.kernels.dequant_matmul import LINEAR_SHAPES, autotune_configs, compile_stats
    from qvlquant.quant.formats import PackFormat
    from qvlquant.quant.rtn import QuantSpec

    cache: dict[tuple, dict] = {}  # one compile per binary: it depends on the case, the architecture and the config

    def stats_of(label: str, arch: int, k: int, cfg: dict) -> dict:
        key = (label, arch, tuple(sorted(cfg.items())))
        if key not in cache:
            fmt_name, bits, group, sym, act_order = CASES[label]
            stats = compile_stats(arch, PackFormat[fmt_name], QuantSpec(bits, group, sym), k, cfg, torch.bfloat16,
                                  act_order)
            cache[key] = dict(stats, case=label, config=dict(cfg))
        return cache[key]

    if args.shape not in LINEAR_SHAPES:
        sys.exit(f"unknown --shape {args.shape!r}; choose one of {', '.join(LINEAR_SHAPES)}")
    rows = []
    print(f"{'case':<18} {'linear':<13} {'M':>5} {'arch':>5} {'configs':>7} {'fit':>4} {'no spill':>8} "
          f"{'max regs':>8} {'max smem KB':>11}")
    for label in args.cases.split(","):
        _, bits, group, sym, act_order = CASES[label]
        spec = QuantSpec(bits, group, sym)
        for linear, (k, n) in LINEAR_SHAPES[args.shape].items():
            for m in [int(v) for v in args.m.split(",")]:
                configs = autotune_configs(m, n, k, spec.effective_group(k), act_order)
                for arch in [int(v) for v in args.arch.split(",")]:
                    stats = [stats_of(label, arch, k, cfg) for cfg in (configs if args.all else configs[:1])]
                    row = dict(case=label, linear=linear, k=k, n=n, m=m, arch=arch, configs=len(stats),
                               fit=sum(st["fits"] for st in stats),
                               no_spill=sum(st["spill_store_bytes"] == 0 and st["spill_load_bytes"] == 0 for st in stats),
                               max_registers=max(st["registers"] for st in stats),
                               max_shared_kb=max(st["shared_bytes"] for st in stats) / 1024, default=stats[0])
                    rows.append(row)
                    print(f"{label:<18} {linear:<13} {m:>5} {arch:>5} {row['configs']:>7} {row['fit']:>4} "
                          f"{row['no_spill']:>8} {row['max_registers']:>8} {row['max_shared_kb']:>11.1f}")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        import triton

        meta = {"what": "ahead-of-time compilation (no GPU): shared memory, registers, spills", "triton": triton.__version__,
                "shape": args.shape, "all_candidates": args.all}
        path.write_text(json.dumps({"meta": meta, "rows": rows, "binaries": list(cache.values())}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
