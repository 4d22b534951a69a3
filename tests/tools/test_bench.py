"""qvlquant bench: the scaled-down CPU protocol runs the same code path the GPU protocol does."""

import copy
import dataclasses
import json
import sys
import types

import pytest
import torch

import qvlquant.tools.bench as bench
from qvlquant.cli import main
from qvlquant.families import QWEN2_VL
from qvlquant.quant.rtn import fake_quantize
from qvlquant.runtime.load import QuantLinear
from qvlquant.tools.bench import (
    VARIANTS,
    BenchConfig,
    TokenClock,
    build_model,
    compare_to_bf16,
    decode_speed,
    decoder_linears,
    figure,
    format_table,
    format_weights_table,
    image_grid,
    peak_memory_gb,
    prefill_inputs,
    published,
    quantize_random,
    reset_peak_memory,
    run,
    title,
    weights_table,
)


def test_published_reference_rows():
    ref = published("qwen2-vl-7b")
    assert ref[("gptq-int4", 1)] == (42.76, 7.20) and ref[("bf16", 30720)] == (19.53, 44.08)
    assert published("demo") == {}


@pytest.mark.parametrize("shape,params", [("qwen2-vl-2b", 2.21e9), ("qwen2-vl-7b", 8.29e9)])
def test_real_shapes_have_the_released_parameter_counts(shape, params):
    """The random-weight models are the released architectures, vision tower included (2.21 B / 8.29 B on the hub)."""
    model = build_model(shape, "meta", torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert abs(total - params) < 0.005e9 and 0.66e9 < vision < 0.68e9


def test_weights_only_sizes_sit_below_the_published_peaks():
    """Bytes of each variant's weights (meta device): Int4 is ~40 % of BF16 for 7B (the bf16 vision tower and
    embeddings stay), every figure sits below the published peak at input length 1, which adds activations."""
    rows = {r["variant"]: r for r in weights_table("qwen2-vl-7b", tuple(VARIANTS))}
    assert 15.3 < rows["bf16"]["weights_gb"] < rows["bf16"]["published_memory_gb_input_1"]
    assert 0.40 < rows["gptq-int4"]["weights_gb"] / rows["bf16"]["weights_gb"] < 0.43
    assert rows["gptq-int8"]["weights_gb"] > rows["gptq-int4"]["weights_gb"] > rows["awq"]["weights_gb"]  # g_idx
    for r in rows.values():
        assert r["vision_gb"] == rows["bf16"]["vision_gb"]  # the vision tower is never quantized
        assert r["weights_gb"] < r["published_memory_gb_input_1"]


@pytest.mark.parametrize("length", [1, 15, 16, 32, 100])
def test_prefill_is_an_image_plus_text_of_exactly_the_input_length(length):
    model = build_model("demo", "cpu", torch.float32)
    inputs = prefill_inputs(model, length, "cpu")
    ids = inputs["input_ids"]
    assert ids.shape == (1, length)
    grid = image_grid(length)
    n_image = int((ids == model.config.image_token_id).sum())
    if grid is None:
        assert length < 16 and n_image == 0 and "pixel_values" not in inputs
    else:
        assert n_image == grid[0] * grid[1] >= 0.8 * (length - 3)
        assert inputs["image_grid_thw"].tolist() == [[1, 2 * grid[0], 2 * grid[1]]]
        assert inputs["pixel_values"].shape == (4 * n_image, 3 * 2 * 14 * 14)
        assert torch.equal(inputs["mm_token_type_ids"], (ids == model.config.image_token_id).long())
        assert int((ids == model.config.vision_start_token_id).sum()) == 1
    assert model(**inputs).logits.shape == (1, length, model.config.text_config.vocab_size)  # tokens match features


def test_large_input_is_mostly_image():
    rows, cols = image_grid(6144)
    assert 6000 < rows * cols <= 6144 - 3 and abs(rows - cols) <= 2


@pytest.mark.parametrize("shape", ["demo", "qwen2-vl-2b", "qwen2-vl-7b"])
def test_decoder_linears_are_the_models_linears(shape):
    """The (K, N) table the kernel benchmark and the compile report run is the built model's, linear by linear."""
    kind = {"q_proj": "q/o_proj", "o_proj": "q/o_proj", "k_proj": "k/v_proj", "v_proj": "k/v_proj",
            "gate_proj": "gate/up_proj", "up_proj": "gate/up_proj", "down_proj": "down_proj"}
    layer = build_model(shape, "meta", torch.bfloat16).get_submodule(QWEN2_VL.decoder_layers)[0]
    table = decoder_linears(shape)
    assert set(table) == set(kind.values())
    for name in QWEN2_VL.linears:
        linear = layer.get_submodule(name)
        assert (linear.in_features, linear.out_features) == table[kind[name.rsplit(".", 1)[1]]], name


@pytest.mark.parametrize("variant", ["gptq-int4", "awq", "gptq-int8"])
def test_quantized_random_model_computes_like_its_dequantized_weights(variant):
    """Every decoder linear becomes a QuantLinear whose weight is exactly the RTN quantize-dequantize of the random
    weight it replaced, so the model computes what the same model with those weights computes."""
    fmt, spec = VARIANTS[variant]
    model = build_model("demo", "cpu", torch.float32)
    dense = copy.deepcopy(model)  # the same random weights, left unquantized
    quantize_random(model, fmt, spec)
    rounded = copy.deepcopy(dense)
    n_linears = 0
    for layer, ref in zip(model.get_submodule(QWEN2_VL.decoder_layers), rounded.get_submodule(QWEN2_VL.decoder_layers)):
        for name in QWEN2_VL.linears:
            q, lin = layer.get_submodule(name), ref.get_submodule(name)
            assert isinstance(q, QuantLinear) and q.fmt is fmt and q.spec == spec, name
            lin.weight.data = fake_quantize(lin.weight.data, spec)
            assert torch.equal(q.quantized_weight().dequantize(), lin.weight.data), name
            n_linears += 1
    assert n_linears == 4 * len(QWEN2_VL.linears)
    ids = torch.randint(10, 2000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, expected, unquantized = (m(input_ids=ids).logits for m in (model, rounded, dense))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert (out - unquantized).abs().max() > 1e-3  # the comparison can tell quantized from not


def test_decode_speed_is_decode_tokens_over_decode_time(monkeypatch):
    """With a fake clock: generate takes a setup, a prefill that yields the first token, then one step per token;
    tokens/s must be 1 / step exactly, the first token setup + prefill; the warm-up runs once first, untimed, and
    the static cache is asked for."""
    setup, prefill, step, now, calls = 0.1, 0.5, 0.02, [0.0], []

    class Model:
        def generate(self, max_new_tokens, min_new_tokens, streamer=None, **kw):
            calls.append((max_new_tokens, kw.get("cache_implementation"), streamer is not None))
            now[0] += setup
            if streamer:
                streamer.put(kw["input_ids"])
            for i in range(max_new_tokens):
                now[0] += prefill if i == 0 else step
                if streamer:
                    streamer.put(torch.zeros(1))

    monkeypatch.setattr(bench, "prefill_inputs", lambda model, length, device: {"input_ids": torch.zeros(1, length)})
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    runs = decode_speed(Model(), 7, 9, "cpu", static_cache=True, repeats=2)
    assert len(runs) == 2
    for speed, first, decode in runs:
        assert speed == pytest.approx(1 / step) and first == pytest.approx(setup + prefill)
        assert decode == pytest.approx(8 * step)
    assert calls == [(2, "static", False), (9, "static", True), (9, "static", True)]  # one warm-up, then each repeat


def test_bench_rows_repeat_each_measurement_and_compare_medians():
    rows = run(BenchConfig(variants=("bf16", "gptq-int4"), input_lengths=(1, 16), new_tokens=4, repeats=3))
    assert [(r["variant"], r["input_length"]) for r in rows] == [("bf16", 1), ("bf16", 16), ("gptq-int4", 1), ("gptq-int4", 16)]
    bf16 = {r["input_length"]: r for r in rows if r["variant"] == "bf16"}
    for r in rows:
        runs = r["tokens_per_s_runs"]
        assert r["new_tokens"] == 4 and r["repeats"] == 3 and len(runs) == 3
        assert r["tokens_per_s"] == sorted(runs)[1]  # the median
        assert (r["tokens_per_s_min"], r["tokens_per_s_max"]) == (min(runs), max(runs))
        assert r["first_token_s"] > 0 and r["decode_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(3 / r["decode_s"], rel=1e-9)  # the median run's 3 tokens after the first
        assert r["speedup_vs_bf16"] == pytest.approx(r["tokens_per_s"] / bf16[r["input_length"]]["tokens_per_s"])
        assert r["peak_memory_gb"] >= r["weights_gb"]  # the process holds at least the model
        assert r["published_tokens_per_s"] is None and r["published_memory_gb"] is None  # nothing published for demo
    assert rows[0]["speedup_vs_bf16"] == 1.0 and rows[0]["speedup_within_noise"] is None
    for r, base in zip(rows[2:], rows[:2]):
        overlap = r["tokens_per_s_min"] <= base["tokens_per_s_max"] and base["tokens_per_s_min"] <= r["tokens_per_s_max"]
        assert r["speedup_within_noise"] is overlap
    assert rows[2]["weights_gb"] < 0.6 * rows[0]["weights_gb"]  # packed 4-bit decoder linears


def spread_row(variant, median, lo, hi, length=1):
    return dict(variant=variant, input_length=length, tokens_per_s=median, tokens_per_s_min=lo, tokens_per_s_max=hi,
                repeats=3, weights_gb=0.01, peak_memory_gb=0.74 if variant == "bf16" else 0.75,
                published_tokens_per_s=None, published_memory_gb=None)


def test_a_speedup_whose_spreads_overlap_bf16s_is_marked_within_noise():
    """Speed-ups from medians; one whose min-max range overlaps bf16's is within the noise and says so."""
    rows = [spread_row("bf16", 10.0, 9.0, 11.0), spread_row("awq", 9.4, 8.0, 9.5), spread_row("gptq-int4", 25.6, 24.0, 27.0)]
    compare_to_bf16(rows)
    assert [r["speedup_vs_bf16"] for r in rows] == pytest.approx([1.0, 0.94, 2.56])
    assert [r["speedup_within_noise"] for r in rows] == [None, True, False]
    lines = format_table(rows, "cpu").splitlines()
    assert lines[2:] == ["| bf16 | 1 | 10.0 (9.0-11.0) | 1.00 | 10.2 | 0.74 | - | - |",
                         "| awq | 1 | 9.4 (8.0-9.5) | 0.94 (within noise) | 10.2 | 0.75 | - | - |",
                         "| gptq-int4 | 1 | 25.6 (24.0-27.0) | 2.56 | 10.2 | 0.75 | - | - |"]
    single = [dict(r, repeats=1) for r in rows]  # one repetition: no spread to judge by
    compare_to_bf16(single)
    assert all(r["speedup_within_noise"] is None for r in single)


def test_the_chart_starts_at_zero_and_draws_no_line_between_input_lengths():
    """Memory and speed axes from 0 (a 0.73-0.755 GiB axis made bf16 look leaner than int4); one bar per variant
    and input length with its min-max spread, no line joining two input lengths."""
    pytest.importorskip("matplotlib")
    rows = [spread_row(v, m, m - 1, m + 1, length) for v, m in (("bf16", 10.0), ("gptq-int4", 12.0))
            for length in (1, 32)]
    compare_to_bf16(rows)
    fig = figure(rows, "heading")
    speed, memory = fig.axes
    assert speed.get_ylim()[0] == 0 and memory.get_ylim()[0] == 0
    assert memory.get_ylim()[1] > 0.75
    for ax in (speed, memory):
        joined = [line for line in ax.get_lines() if line.get_linestyle() not in ("None", "") and len(line.get_xdata()) > 1]
        assert joined == []
        assert len(ax.patches) == 4  # a bar per variant and input length
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "32"]
    assert sorted(p.get_height() for p in memory.patches) == [0.74, 0.74, 0.75, 0.75]


def test_bench_config_is_checked_when_made():
    with pytest.raises(ValueError, match="unknown variant 'int3'"):
        run(BenchConfig(variants=("int3",)))
    with pytest.raises(ValueError, match="unknown --shape 'llama-70b'"):
        BenchConfig(shape="llama-70b")
    with pytest.raises(ValueError, match="new_tokens must be at least 2"):
        BenchConfig(new_tokens=1)
    with pytest.raises(ValueError, match="positive token counts"):
        BenchConfig(input_lengths=(0, 16))


def test_weights_only_table():
    rows = [dict(variant="bf16", weights_gb=15.5, vision_gb=1.254, published_memory_gb_input_1=16.07),
            dict(variant="awq", weights_gb=5.0, vision_gb=1.254, published_memory_gb_input_1=None)]
    assert format_weights_table("qwen2-vl-7b", rows).splitlines() == [
        "qwen2-vl-7b: bytes held by the weights, GiB to 3 significant digits (vision tower in bf16)",
        "| variant | weights GiB | of which vision GiB | published peak GB at input 1 |",
        "|---|---|---|---|",
        "| bf16 | 15.5 | 1.25 | 16.07 |",
        "| awq | 5 | 1.25 | - |",
    ]
    small = format_weights_table("demo", [dict(variant="gptq-int4", weights_gb=0.00613, vision_gb=0.00173,
                                               published_memory_gb_input_1=None)])
    assert small.splitlines()[-1] == "| gptq-int4 | 0.00613 | 0.00173 | - |"  # the demo's sizes show, not 0.00


def test_bench_table_title_and_units():
    cfg = BenchConfig(variants=("bf16", "gptq-int4"), input_lengths=(1, 32), new_tokens=8)
    heading = title(cfg, "CPU (2 cores)")
    assert heading == ("qvlquant bench: demo on CPU (2 cores), batch 1, 8 new tokens per input (input lengths 1, 32); "
                       "tokens/s: median of 3 repetitions (min-max); memory in GiB")
    row = dict(variant="gptq-int4", input_length=1, tokens_per_s=10.0, speedup_vs_bf16=0.9, weights_gb=0.00613,
               peak_memory_gb=0.755, published_tokens_per_s=None, published_memory_gb=None, repeats=1)
    lines = format_table([dict(row, variant="bf16", weights_gb=0.01373, speedup_vs_bf16=1.0), row], "cpu").splitlines()
    assert lines[0] == ("| variant | input | tokens/s | x bf16 | weights MiB | peak RSS GiB | published tokens/s | "
                        "published GB |")
    assert lines[2:] == ["| bf16 | 1 | 10.0 | 1.00 | 14.1 | 0.76 | - | - |",
                         "| gptq-int4 | 1 | 10.0 | 0.90 | 6.3 | 0.76 | - | - |"]
    assert "peak GPU GiB" in format_table([row], "cuda")
    assert "1 repetition (no spread" in title(dataclasses.replace(cfg, repeats=1), "CPU")
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        BenchConfig(repeats=0)


def test_cpu_peak_memory_counts_what_a_run_held_and_resets_only_when_asked():
    """The resident high-water mark covers everything since the last reset_peak_memory: a generate's end (its
    streamer's ``end``) is no reset, so the peak of a decode is still there when its row is written."""
    reset_peak_memory("cpu")
    ballast = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
    assert ballast.sum() > 0
    del ballast
    held = peak_memory_gb("cpu")
    TokenClock().end()
    assert peak_memory_gb("cpu") > held - 0.01
    assert reset_peak_memory("cpu") == "since reset"
    assert peak_memory_gb("cpu") < held - 0.25


def test_cpu_peak_memory_is_each_variants_own():
    """Not the process-wide maximum that only grows: 600 MiB held and freed before the run do not count in any
    row's peak (each row's peak is since a reset: the kernel's VmHWM via /proc/self/clear_refs)."""
    ballast = torch.ones(600 * 2**20 // 4)  # 600 MiB, touched
    assert ballast.sum() > 0
    del ballast
    before = peak_memory_gb("cpu")
    rows = run(BenchConfig(variants=("gptq-int4", "gptq-int8"), input_lengths=(1,), new_tokens=2))
    assert all(r["peak_memory_scope"] == "since reset" for r in rows)
    assert all(r["weights_gb"] < r["peak_memory_gb"] < before - 0.4 for r in rows)


def test_bnb_variants_load_the_demo_through_bitsandbytes():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    rows = run(BenchConfig(variants=("bf16", "bnb-nf4", "bnb-int8"), input_lengths=(1,), new_tokens=2))
    weights = {r["variant"]: r["weights_gb"] for r in rows}
    assert weights["bnb-nf4"] < weights["bnb-int8"] < 0.6 * weights["bf16"]  # 4-bit < 8-bit < fp32 decoder linears
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_bnb_variants_are_refused_where_they_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="bnb-nf4 loads the demo checkpoint.*--shape demo only"):
        BenchConfig(shape="qwen2-vl-7b", variants=("bnb-nf4",))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"need bitsandbytes: pip install 'qvlquant\[bnb\]'"):
        bench.measure_variant(BenchConfig(variants=("bnb-int8",), input_lengths=(1,), new_tokens=2), "bnb-int8")


def test_bench_command_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    argv = ["bench", "--variants", "bf16,gptq-int8", "--input-lengths", "1,8", "--new-tokens", "3", "--json", str(out),
            "--plot", str(png), "--repeats", "2"]
    assert main(argv) == 0
    assert "| gptq-int8 | 8 |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4 and data["config"]["shape"] == "demo" and data["config"]["repeats"] == 2
    assert all(len(r["tokens_per_s_runs"]) == 2 for r in data["rows"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "--shape", "llama-70b"]) == 2
    assert main(["bench", "--shape", "qwen2-vl-2b", "--weights-only", "--variants", "bf16,awq"]) == 0
    assert "| awq | 2.31 | 1.24 | 2.88 |" in capsys.readouterr().out


def test_plot_without_matplotlib_fails_before_benchmarking(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    ran = []
    monkeypatch.setattr(bench, "run", lambda cfg: ran.append(cfg) or [])
    assert main(["bench", "--input-lengths", "1", "--new-tokens", "2", "--plot", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert ran == [] and "\n" not in err
    assert "--plot needs matplotlib" in err and "pip install 'qvlquant[plot]'" in err


@pytest.mark.slow
def test_compiled_decode_with_static_cache_runs():
    """torch.compile + static KV cache (CUDA graphs on a GPU) on the CPU protocol: compiles once, then decodes."""
    rows = run(BenchConfig(variants=("gptq-int4",), input_lengths=(4,), new_tokens=4, compile=True))
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["variant"] == "gptq-int4"


@pytest.mark.slow
def test_fused_kernel_path_under_torch_compile_matches_eager(monkeypatch):
    """What `bench --compile` runs on a GPU, here in Triton's interpreter: every decoder linear through the
    qvlquant::dequant_matmul operator, the forward compiled ("reduce-overhead") with a static KV cache. Same logits
    as the eager fused path, image in the prefill."""
    from qvlquant.tools.bench import prefill_inputs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(QuantLinear, "forward", QuantLinear._fused)  # the CUDA path, on CPU tensors if need be
    model = build_model("demo", device, torch.float32)
    quantize_random(model, *VARIANTS["gptq-int4"])
    kw = dict(prefill_inputs(model, 20, device), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
              eos_token_id=None, cache_implementation="static", return_dict_in_generate=True, output_logits=True)
    eager = model.generate(**kw)
    model.forward = torch.compile(model.forward, mode="reduce-overhead")
    compiled = model.generate(**kw)
    assert torch.equal(eager.sequences, compiled.sequences)
    for a, b in zip(eager.logits, compiled.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_peak_memory_is_reset_per_variant():
    """bf16 first, then the smaller gptq-int4: with the process-wide peak the second row could never be lower. Not
    run here (no GPU on the project's machine)."""
    rows = run(BenchConfig(variants=("bf16", "gptq-int4"), input_lengths=(1,), new_tokens=2, device="cuda"))
    assert rows[1]["peak_memory_gb"] < rows[0]["peak_memory_gb"]
    assert all(r["weights_gb"] <= r["peak_memory_gb"] for r in rows)
