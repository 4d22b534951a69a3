"""qvlquant bench: the scaled-down CPU protocol runs the same code path the GPU protocol does."""

import json

import pytest
import torch

from qvlquant.bench import (BenchConfig, build_model, image_grid, prefill_inputs, published, quantize_random, run,
                            VARIANTS, weights_table)
from qvlquant.cli import main
from qvlquant.runtime import QuantLinear


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


def test_quantized_random_model_computes_like_its_dequantized_weights():
    model = build_model("demo", "cpu", torch.float32)
    ids = torch.randint(10, 2000, (1, 12))
    fmt, spec = VARIANTS["awq"]
    quantize_random(model, fmt, spec)
    layer = model.model.language_model.layers[0]
    assert isinstance(layer.mlp.down_proj, QuantLinear) and layer.mlp.down_proj.fmt is fmt
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_bench_rows_and_speedup_column():
    rows = run(BenchConfig(variants=("bf16", "gptq-int4"), input_lengths=(1, 16), new_tokens=4))
    assert [(r["variant"], r["input_length"]) for r in rows] == [("bf16", 1), ("bf16", 16), ("gptq-int4", 1), ("gptq-int4", 16)]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 for r in rows)
    assert rows[0]["speedup_vs_bf16"] == 1.0
    with pytest.raises(ValueError, match="unknown variant 'int3'"):
        run(BenchConfig(variants=("int3",)))


def test_bench_command_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    argv = ["bench", "--variants", "bf16,gptq-int8", "--input-lengths", "1,8", "--new-tokens", "3", "--json", str(out),
            "--plot", str(png)]
    assert main(argv) == 0
    assert "| gptq-int8 | 8 |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4 and data["config"]["shape"] == "demo"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "--shape", "llama-70b"]) == 2
    assert main(["bench", "--shape", "qwen2-vl-2b", "--weights-only", "--variants", "bf16,awq"]) == 0
    assert "| awq | 2.31 | 1.24 | 2.88 |" in capsys.readouterr().out


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
    from qvlquant.bench import prefill_inputs

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
