"""qvlquant bench: the scaled-down CPU protocol runs the same code path the GPU protocol does."""

import json

import pytest
import torch

from qvlquant.bench import BenchConfig, build_model, published, quantize_random, run, VARIANTS
from qvlquant.cli import main
from qvlquant.runtime import QuantLinear


def test_published_reference_rows():
    ref = published("qwen2-vl-7b")
    assert ref[("gptq-int4", 1)] == (42.76, 7.20) and ref[("bf16", 30720)] == (19.53, 44.08)
    assert published("demo") == {}


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


@pytest.mark.slow
def test_compiled_decode_with_static_cache_runs():
    """torch.compile + static KV cache (CUDA graphs on a GPU) on the CPU protocol: compiles once, then decodes."""
    rows = run(BenchConfig(variants=("gptq-int4",), input_lengths=(4,), new_tokens=4, compile=True))
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["variant"] == "gptq-int4"
