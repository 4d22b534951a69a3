"""The fused kernels against the torch dequantize-then-matmul reference. On CPU they run in Triton's interpreter
(TRITON_INTERPRET=1, set in conftest before triton is imported): bf16 tiles are upcast to fp32 before tl.dot there,
because the interpreter's bf16 dot is wrong; fp16 and fp32 inputs are tested as they are. On a CUDA machine the same
tests run compiled, on the GPU (DEVICE); tests marked ``gpu`` only run there (conftest skips them elsewhere)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qvlquant.quant.formats import PackFormat, QuantizedWeight
from qvlquant.quant.rtn import default_g_idx, rtn_quantize
from qvlquant.quant.spec import QuantSpec
from qvlquant.runtime.load import QuantLinear

kernels = pytest.importorskip("qvlquant.kernels.dequant_matmul")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BENCHMARKS = pathlib.Path(__file__).parents[2] / "benchmarks"


def load_script(name: str):
    """A script of benchmarks/ as a module (they are not part of the package)."""
    if name not in sys.modules:  # registered before it runs, as an import would (its dataclasses look it up)
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def packed(n, k, spec, fmt, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, scale, zero = rtn_quantize(torch.randn(n, k, generator=g), spec)
    g_idx = default_g_idx(k, spec)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    w = QuantizedWeight(q, scale, zero, g_idx, spec)
    return {name: t.to(DEVICE) for name, t in fmt.pack(w).items()}


CASES = [
    (PackFormat.GPTQ, QuantSpec(4, 128, True), False),
    (PackFormat.GPTQ, QuantSpec(4, 32, False), False),
    (PackFormat.GPTQ, QuantSpec(4, 64, True), True),  # act-order g_idx
    (PackFormat.GPTQ, QuantSpec(8, 128, True), False),
    (PackFormat.GPTQ, QuantSpec(8, -1, True), False),
    (PackFormat.GPTQ, QuantSpec(4, -1, False), False),
    (PackFormat.AWQ_GEMM, QuantSpec(4, 128, False), False),
    (PackFormat.AWQ_GEMM, QuantSpec(4, 32, False), False),
]


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("fmt,spec,act_order", CASES, ids=lambda c: getattr(c, "value", str(c)))
def test_kernel_matches_reference(m, fmt, spec, act_order):
    k, n = 256, 128
    tensors = packed(n, k, spec, fmt, act_order)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, torch.float16)
    bias = torch.randn(n).to(DEVICE, torch.float16)
    out = kernels.dequant_matmul(x, tensors, fmt, spec, k, bias)
    ref = kernels.reference_dequant_matmul(x, tensors, fmt, spec, k, bias)
    assert out.shape == (m, n) and out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtypes_and_split_k(dtype):
    k, n = 1024, 64  # k // 512 = 2: decode splits K across programs, a second kernel sums the fp32 partials
    spec = QuantSpec(4, 128, True)
    tensors = packed(n, k, spec, PackFormat.GPTQ)
    x = torch.randn(2, 3, k).to(DEVICE, dtype)  # leading dims are kept
    cfg = kernels.launch_config(6, n, k)
    assert cfg["SPLIT_K"] == 2
    out = kernels.dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k)
    ref = kernels.reference_dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k)
    assert out.shape == (2, 3, n) and out.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-1) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_odd_shapes_are_masked():
    k, n = 96, 40  # not multiples of the tiles
    spec = QuantSpec(8, 32, True)
    tensors = packed(n, k, spec, PackFormat.GPTQ)
    x = torch.randn(5, k).to(DEVICE, torch.float16)
    torch.testing.assert_close(kernels.dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k).float(),
                               kernels.reference_dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k).float(),
                               rtol=2e-3, atol=2e-2)


def test_unsupported_is_loud():
    spec = QuantSpec(3, 128, True)
    with pytest.raises(NotImplementedError, match="3-bit gptq is not supported"):
        kernels.dequant_matmul(torch.zeros(1, 256), packed(64, 256, spec, PackFormat.GPTQ), PackFormat.GPTQ, spec, 256)
    with pytest.raises(NotImplementedError, match="pack_quantized"):
        kernels.check_supported(PackFormat.COMPRESSED, QuantSpec(4, 128, True), 256, 64)
    with pytest.raises(ValueError, match="input features"):
        s4 = QuantSpec(4, 128, True)
        kernels.dequant_matmul(torch.zeros(1, 128), packed(64, 256, s4, PackFormat.GPTQ), PackFormat.GPTQ, s4, 256)


def quant_linear(fmt, spec, act_order, k=256, n=64):
    g = torch.Generator().manual_seed(0)
    q, scale, zero = rtn_quantize(torch.randn(n, k, generator=g), spec)
    g_idx = default_g_idx(k, spec)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return QuantLinear.from_weight(QuantizedWeight(q, scale, zero, g_idx, spec), fmt, torch.randn(n, generator=g))


def dense_reference(layer, x):
    """F.linear in fp32 with the layer's dequantized weight (unpacked on the CPU), whatever path the layer takes."""
    tensors = {name: getattr(layer, name).cpu() for name in layer.tensor_names}
    w = layer.fmt.unpack(tensors, layer.spec, layer.in_features).dequantize().to(x.device)  # [N, K] fp32
    return F.linear(x.float(), w, layer.bias.float()).to(x.dtype)


@pytest.mark.parametrize("fmt,spec,act_order", [CASES[2], CASES[6]], ids=["gptq-act-order", "awq"])
def test_quant_linear_fused_path_matches_its_reference_path(fmt, spec, act_order):
    """QuantLinear's fused path (the one it takes on CUDA) on DEVICE against F.linear with the dequantized weight;
    it also finds out by itself whether g_idx is act-order."""
    layer = quant_linear(fmt, spec, act_order).to(DEVICE)
    x = torch.randn(4, 7, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.testing.assert_close(layer._fused(x), dense_reference(layer, x), rtol=1e-4, atol=1e-3)
    assert layer._act_order is act_order


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,spec,act_order", [CASES[0], CASES[2], CASES[3], CASES[6]],
                         ids=["gptq-w4", "gptq-act-order", "gptq-w8", "awq"])
def test_quant_linear_on_cuda_takes_the_fused_kernel(fmt, spec, act_order):
    """On a GPU, QuantLinear.forward runs the kernel (no dequantized copy is ever made) and matches the reference."""
    layer = quant_linear(fmt, spec, act_order).to("cuda", torch.float16)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2)).to("cuda", torch.float16)
    out = layer(x)
    assert layer._dequantized is None and layer._act_order is act_order
    torch.testing.assert_close(out.float(), dense_reference(layer, x).float(), rtol=2e-3, atol=2e-2)


def test_autotune_candidates():
    for m, k in ((1, 4096), (16, 512), (33, 8192), (2048, 4096)):
        cands = kernels.autotune_configs(m, 4096, k)
        assert cands[0] == kernels.launch_config(m, 4096, k) and len(cands) > 1
        assert len({tuple(sorted(c.items())) for c in cands}) == len(cands)  # no duplicates
        assert all((c["BLOCK_M"] >= 16 or m == 1) and (c["SPLIT_K"] == 1 or m <= 64) for c in cands)
        assert all(c["BLOCK_N"] * c["BLOCK_K"] <= 8192 for c in cands if c["BLOCK_M"] == 1)  # GEMV tiles stay small
    assert {c["SPLIT_K"] for c in kernels.autotune_configs(1, 4096, 4096)} >= {1, 8, 16}


def test_pick_config_takes_the_first_candidate_when_nothing_can_be_timed(monkeypatch):
    """In the interpreter (as with no CUDA) nothing is launched for tuning: the first candidate, cached per key."""
    monkeypatch.setattr(kernels, "INTERPRET", True)
    ran = []
    key = ("test-untimed",)
    assert kernels.pick_config(key, [{"a": 1}, {"a": 2}], ran.append) == {"a": 1}
    assert kernels.pick_config(key, [{"a": 3}], ran.append) == {"a": 1}  # cached per key
    assert ran == []


def test_fastest_config_skips_only_what_the_device_cannot_hold():
    """The autotuner's choice with a fake clock: the fastest candidate; one that runs out of shared memory or
    registers is skipped; any other failure is raised, naming the candidate, not skipped."""
    from triton.runtime import OutOfResources

    times = {1: 3.0, 2: 1.0, 3: 2.0}
    ran = []
    assert kernels.fastest_config([{"a": 1}, {"a": 2}, {"a": 3}], lambda c: ran.append(c["a"]),
                                  lambda c: times[c["a"]]) == {"a": 2}
    assert ran == [1, 2, 3]  # each candidate compiled and warmed up once before it is timed

    def launch(cfg):
        if cfg["a"] == 2:
            raise OutOfResources(300_000, 232_448, "shared memory")
        if cfg["a"] == 4:
            raise RuntimeError("Triton Error [CUDA]: too many resources requested for launch")

    assert kernels.fastest_config([{"a": 1}, {"a": 2}, {"a": 3}, {"a": 4}], launch, lambda c: times[c["a"]]) == {"a": 3}
    with pytest.raises(RuntimeError, match="none of the 2 launch configurations fits"):
        kernels.fastest_config([{"a": 2}, {"a": 4}], launch, lambda c: 1.0, ("k",))

    def broken(cfg):
        if cfg["a"] == 3:
            raise ValueError("an incompatible layout")

    with pytest.raises(RuntimeError, match=r"launch configuration \{'a': 3\} failed .*ValueError: an incompatible"):
        kernels.fastest_config([{"a": 1}, {"a": 3}], broken, lambda c: times[c["a"]], ("key",))
    assert kernels.is_resource_error(OutOfResources(1, 0, "threads")) and not kernels.is_resource_error(KeyError("x"))


@pytest.mark.gpu
def test_pick_config_times_every_candidate_on_a_gpu():
    """With CUDA the autotuner launches every candidate, keeps the fastest one that runs, and caches it."""
    k, n, spec = 1024, 256, QuantSpec(4, 128, True)
    tensors = packed(n, k, spec, PackFormat.GPTQ)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    candidates = kernels.autotune_configs(1, n, k, 128)
    ran = []

    def launch(cfg):
        ran.append(cfg)
        return kernels.dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k, config=cfg)

    key = ("test-timed-on-gpu", torch.cuda.get_device_name())
    kernels._TUNED.pop(key, None)
    best = kernels.pick_config(key, candidates, launch)
    assert best in candidates and kernels._TUNED[key] is best
    assert all(c in ran for c in candidates)  # every one launched (one that does not fit is skipped, not the rest)
    launched = len(ran)
    assert kernels.pick_config(key, candidates, launch) is best and len(ran) == launched  # cached: nothing relaunched


def test_groups_smaller_than_the_tile_take_the_per_row_path():
    """A K tile spanning several groups reads a group per input row (TILE_IN_GROUP off); the tuned tiles shrink to
    the group instead. Both paths must agree with the reference."""
    k, n, spec = 256, 64, QuantSpec(4, 32, False)
    for fmt in (PackFormat.GPTQ, PackFormat.AWQ_GEMM):
        tensors = packed(n, k, spec, fmt)
        x = torch.randn(4, k).to(DEVICE, torch.float16)
        ref = kernels.reference_dequant_matmul(x, tensors, fmt, spec, k).float()
        wide = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1)
        assert not kernels.kernel_constants(fmt, spec, k, x.dtype, False, False, wide)["TILE_IN_GROUP"]
        tuned = kernels.launch_config(4, n, k, spec.effective_group(k))
        assert tuned["BLOCK_K"] == 32 and kernels.kernel_constants(fmt, spec, k, x.dtype, False, False, tuned)["TILE_IN_GROUP"]
        for cfg in (wide, tuned):
            torch.testing.assert_close(kernels.dequant_matmul(x, tensors, fmt, spec, k, config=cfg).float(), ref,
                                       rtol=2e-3, atol=2e-2)


def test_candidate_configs_follow_the_group():
    for m in (1, 16, 64, 2048):
        assert all(c["BLOCK_K"] <= 64 for c in kernels.autotune_configs(m, 3584, 3584, 64))
        assert kernels.autotune_configs(m, 3584, 3584, 3584) == kernels.autotune_configs(m, 3584, 3584)  # channelwise


def test_default_configs_compile_for_a100_and_h100_without_spilling(tmp_path):
    """Triton's ahead-of-time compiler (no GPU needed; run in a subprocess without the interpreter) builds the
    default tiles of each M regime for sm_80 / sm_90 on the Qwen2-VL-7B shapes: they fit in shared memory and spill
    no registers. (An earlier version of the kernel, which loaded every packed word eight times, spilled on sm_90.)"""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = BENCHMARKS / "compile_report.py"
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(script), "--m", "1,64,2048", "--json", str(out)], env=env, check=True,
                   capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["case"], r["m"], r["arch"]) for r in rows} == {
        (c, m, a) for c in ("gptq-w4", "gptq-w4-act-order", "awq-w4", "gptq-w8") for m in (1, 64, 2048) for a in (80, 90)}
    for r in rows:  # the default (first) candidate of each regime
        assert r["configs"] == 1 and r["fit"] == 1 and r["default"]["shared_bytes"] > 0, r
        assert r["no_spill"] == 1 and r["default"]["spill_load_bytes"] == 0, r


def test_compile_stats_refuses_the_interpreter(monkeypatch):
    pytest.importorskip("triton.backends.nvidia.compiler")
    report = load_script("compile_report")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        report.compile_stats(90, report.CASES["gptq-w4"], 256, kernels.launch_config(1, 64, 256))


@pytest.mark.parametrize("fmt,spec,act_order", CASES, ids=lambda c: getattr(c, "value", str(c)))
def test_dequantize_kernel_writes_the_reference_weight(fmt, spec, act_order):
    """The baseline's first half (the whole weight dequantized by a kernel) is exactly the torch dequantization."""
    k, n = 256, 128
    tensors = packed(n, k, spec, fmt, act_order)
    ref = fmt.unpack({name: t.cpu() for name, t in tensors.items()}, spec, k).dequantize().T  # [K, N] fp32
    out = kernels.dequantize(tensors, fmt, spec, k, torch.float32)
    assert out.shape == (k, n)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)
    x = torch.randn(3, k).to(DEVICE, torch.float16)
    torch.testing.assert_close(kernels.dequantize_then_matmul(x, tensors, fmt, spec, k).float(),
                               kernels.reference_dequant_matmul(x, tensors, fmt, spec, k).float(), rtol=2e-3, atol=2e-2)


def test_benchmark_script_runs_every_path(tmp_path):
    """benchmarks/bench_dequant_matmul.py --dry-run: every path of the GPU benchmark once, on CPU (timings meaningless)."""
    if not kernels.INTERPRET:
        pytest.skip("with a GPU the kernels are compiled, not interpreted: run the benchmark itself")
    bench = load_script("bench_dequant_matmul")
    out = tmp_path / "b.json"
    rows = bench.main(["--dry-run", "--m", "1,33", "--json", str(out)])
    assert len(rows) == 4 * 3 * 2 and {r["fmt"] for r in rows} == {"gptq-w4", "awq-w4", "gptq-w8"}
    assert all(r["fused_us"] > 0 and r["bandwidth_fraction"] is None for r in rows)
    assert json.loads(out.read_text())["meta"]["device"] == "cpu (dry run)"


def test_operator_compiles_as_one_graph():
    """QuantLinear calls the kernel through a torch operator, so torch.compile (and CUDA graphs on a GPU) sees one
    opaque op: fullgraph=True fails on any graph break."""
    k, n, spec = 256, 64, QuantSpec(4, 64, True)
    tensors = packed(n, k, spec, PackFormat.GPTQ)
    bias = torch.randn(n).to(DEVICE, torch.float16)

    def f(x):
        h = kernels.dequant_matmul_op(x, tensors["qweight"], tensors["scales"], tensors["qzeros"], tensors["g_idx"],
                                      bias, "gptq", 4, 64, True, k, False)
        return torch.nn.functional.silu(h)

    x = torch.randn(2, 5, k).to(DEVICE, torch.float16)
    expected = torch.nn.functional.silu(kernels.reference_dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k, bias).float())
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert out.shape == (2, 5, n)
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("fmt,spec,act_order", CASES, ids=lambda c: getattr(c, "value", str(c)))
@pytest.mark.parametrize("split_k", [1, 2])
def test_gemv_variant_matches_reference(fmt, spec, act_order, split_k):
    """BLOCK_M = 1 (one of the M = 1 autotune candidates): reduction in registers instead of tl.dot."""
    k, n = 256, 128
    tensors = packed(n, k, spec, fmt, act_order)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(7)).to(DEVICE, torch.float16)
    bias = torch.randn(n).to(DEVICE, torch.float16)
    cfg = dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split_k)
    assert any(c["BLOCK_M"] == 1 for c in kernels.autotune_configs(1, n, k))
    assert not any(c["BLOCK_M"] == 1 for c in kernels.autotune_configs(2, n, k))
    torch.testing.assert_close(kernels.dequant_matmul(x, tensors, fmt, spec, k, bias, config=cfg).float(),
                               kernels.reference_dequant_matmul(x, tensors, fmt, spec, k, bias).float(),
                               rtol=2e-3, atol=2e-2)


def test_group_size_that_is_no_power_of_two():
    """A group of 48 rows: tiles stay powers of two (32) and read a group per row, results still exact."""
    k, n, spec = 192, 64, QuantSpec(4, 48, True)
    tensors = packed(n, k, spec, PackFormat.GPTQ)
    x = torch.randn(3, k).to(DEVICE, torch.float16)
    assert kernels.launch_config(3, n, k, 48)["BLOCK_K"] == 32
    torch.testing.assert_close(kernels.dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k).float(),
                               kernels.reference_dequant_matmul(x, tensors, PackFormat.GPTQ, spec, k).float(),
                               rtol=2e-3, atol=2e-2)
    ref = PackFormat.GPTQ.unpack({name: t.cpu() for name, t in tensors.items()}, spec, k).dequantize().T
    torch.testing.assert_close(kernels.dequantize(tensors, PackFormat.GPTQ, spec, k, torch.float32).cpu(), ref,
                               rtol=0, atol=0)
