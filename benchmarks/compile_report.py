"""Compile the fused kernel's launch configurations for A100 (sm_80) and H100 (sm_90) on a machine with no GPU.

    python benchmarks/compile_report.py [--arch 80,90] [--m 1,16,64,2048] [--shape qwen2-vl-7b] [--all] [--json F]

Triton compiles ahead of time for a named architecture with its bundled ptxas, so shared memory, registers per
thread and register spills of every candidate the autotuner would time are known before any GPU is at hand. This
is not a speed measurement: it says which configurations can launch at all, and flags spills (local-memory
traffic in a kernel that should only stream its weight). Without --all only the default (first) candidate of each
M regime is compiled. Must run without TRITON_INTERPRET=1 (the interpreter patches triton.language in place, which
can leak into the compiler).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from qvlquant.kernels.dequant_matmul import (
    autotune_configs,
    dequant_matmul_kernel,
    kernel_constants,
)
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.spec import QuantSpec
from qvlquant.tools.bench import SHAPES, decoder_linears

GPU_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # max shared memory per block, bytes (CUDA docs)
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One kind of quantized linear the kernel is compiled for."""

    fmt: PackFormat
    spec: QuantSpec
    act_order: bool = False
    has_bias: bool = False


CASES = {
    "gptq-w4": Case(PackFormat.GPTQ, QuantSpec(4, 128, True)),
    "gptq-w4-act-order": Case(PackFormat.GPTQ, QuantSpec(4, 128, True), act_order=True),
    "awq-w4": Case(PackFormat.AWQ_GEMM, QuantSpec(4, 128, False)),
    "gptq-w8": Case(PackFormat.GPTQ, QuantSpec(8, 128, True)),
}


def compile_stats(arch: int, case: Case, k: int, cfg: dict, x_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Compile the fused kernel for an NVIDIA architecture (80: A100, 90: H100) with no GPU present, through
    Triton's ahead-of-time path and its bundled ptxas, and report what decides whether a launch configuration can
    run and stream well: shared memory, registers per thread, and bytes spilled to local memory."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_stats needs a process without TRITON_INTERPRET=1 "
                           "(run benchmarks/compile_report.py, which the tests start in a subprocess)")
    fn = dequant_matmul_kernel
    consts = kernel_constants(case.fmt, case.spec, k, x_dtype, case.act_order, case.has_bias, cfg)
    ptr = PTR[x_dtype]
    signature = {"x_ptr": ptr, "qw_ptr": "*i32", "scales_ptr": "*fp16", "qz_ptr": "*i32", "gidx_ptr": "*i32",
                 "bias_ptr": ptr, "out_ptr": ptr if cfg["SPLIT_K"] == 1 else "*fp32", "M": "i32", "N": "i32",
                 "K": "i32", "stride_xm": "i32", "stride_om": "i32"} | {name: "constexpr" for name in consts}
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3)))
    log = _ptxas_log(compiled.asm["ptx"], arch)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    shared = compiled.metadata.shared
    return dict(arch=arch, shared_bytes=shared, registers=regs, spill_store_bytes=int(spill.group(1)),
                spill_load_bytes=int(spill.group(2)), fits=shared <= GPU_SHARED_LIMIT.get(arch, 101376))


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v's report (registers, spills) of one PTX module for ``arch``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "k.ptx"
        path.write_text(ptx)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        return subprocess.run([get_ptxas(arch).path, f"-arch={sm}", "-v", str(path), "-o", f"{tmp}/k.cubin"],
                              capture_output=True, text=True, check=True).stderr


def report_rows(shape: str, labels: list[str], ms: list[int], archs: list[int], all_candidates: bool,
                cache: dict[tuple, dict]):
    """Yields one row per case, linear, M and architecture, as it is compiled: how many candidates fit and spill
    nothing, the largest register and shared memory use, and the default candidate's figures. ``cache`` holds one
    compile per binary."""

    def stats_of(label: str, arch: int, k: int, cfg: dict) -> dict:
        key = (label, arch, tuple(sorted(cfg.items())))  # the binary depends on the case, the arch and the config
        if key not in cache:
            cache[key] = dict(compile_stats(arch, CASES[label], k, cfg), case=label, config=dict(cfg))
        return cache[key]

    for label in labels:
        case = CASES[label]
        for linear, (k, n) in decoder_linears(shape).items():
            for m in ms:
                configs = autotune_configs(m, n, k, case.spec.effective_group(k), case.act_order)
                for arch in archs:
                    stats = [stats_of(label, arch, k, cfg) for cfg in (configs if all_candidates else configs[:1])]
                    yield dict(case=label, linear=linear, k=k, n=n, m=m, arch=arch, configs=len(stats),
                               fit=sum(st["fits"] for st in stats),
                               no_spill=sum(not st["spill_store_bytes"] and not st["spill_load_bytes"] for st in stats),
                               max_registers=max(st["registers"] for st in stats),
                               max_shared_kb=max(st["shared_bytes"] for st in stats) / 1024, default=stats[0])


HEADER = (f"{'case':<18} {'linear':<13} {'M':>5} {'arch':>5} {'configs':>7} {'fit':>4} {'no spill':>8} "
          f"{'max regs':>8} {'max smem KB':>11}")


def format_row(r: dict) -> str:
    return (f"{r['case']:<18} {r['linear']:<13} {r['m']:>5} {r['arch']:>5} {r['configs']:>7} {r['fit']:>4} "
            f"{r['no_spill']:>8} {r['max_registers']:>8} {r['max_shared_kb']:>11.1f}")


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
    if args.shape not in SHAPES:
        sys.exit(f"unknown --shape {args.shape!r}; choose one of {', '.join(SHAPES)}")
    labels = args.cases.split(",")
    unknown = [c for c in labels if c not in CASES]
    if unknown:
        sys.exit(f"unknown --cases {unknown}; choose from {', '.join(CASES)}")
    cache: dict[tuple, dict] = {}
    rows = []
    print(HEADER)
    for row in report_rows(args.shape, labels, [int(v) for v in args.m.split(",")],
                           [int(v) for v in args.arch.split(",")], args.all, cache):
        rows.append(row)
        print(format_row(row), flush=True)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"what": "ahead-of-time compilation (no GPU): shared memory, registers, spills",
                "triton": triton.__version__, "shape": args.shape, "all_candidates": args.all}
        path.write_text(json.dumps({"meta": meta, "rows": rows, "binaries": list(cache.values())}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
