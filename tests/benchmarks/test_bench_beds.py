"""benchmarks/bench_beds.py's bookkeeping, without quantizing: which (model, variant, seed) rows run, what the
rare-expert variants pass to quantize, how rare experts are counted from a report, and the mean +- spread table."""

import importlib.util
import pathlib
import sys

import pytest

from qvlquant.quant.spec import QuantConfig, QuantSpec

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("bench_beds", BENCH / "bench_beds.py")
bench_beds = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench_beds
spec.loader.exec_module(bench_beds)


def test_calibrated_variants_run_per_seed_and_moe_only_variants_skip_dense_models():
    rows = list(bench_beds.jobs(["demo-qwen3.5", "demo-qwen3.5-moe"],
                                ["bf16", "rtn-w4", "gptq-w4", "gptq-w4-rare-all"], [0, 1]))
    assert rows == [
        ("demo-qwen3.5", "bf16", None), ("demo-qwen3.5", "rtn-w4", None),
        ("demo-qwen3.5", "gptq-w4", 0), ("demo-qwen3.5", "gptq-w4", 1),
        ("demo-qwen3.5-moe", "bf16", None), ("demo-qwen3.5-moe", "rtn-w4", None),
        ("demo-qwen3.5-moe", "gptq-w4", 0), ("demo-qwen3.5-moe", "gptq-w4", 1),
        ("demo-qwen3.5-moe", "gptq-w4-rare-all", 0), ("demo-qwen3.5-moe", "gptq-w4-rare-all", 1),
    ]


@pytest.mark.parametrize("variant", ["gptq-w4-rare-rtn", "gptq-w4-rare-all"])
def test_rare_expert_variants_get_the_threshold_and_are_valid_configs(variant):
    settings = bench_beds.settings_of(variant, 128)
    assert settings["min_expert_tokens"] == 128 and "min_expert_tokens" not in bench_beds.VARIANTS[variant]
    QuantConfig(settings["method"], QuantSpec(settings["bits"], settings["group_size"]),
                min_expert_tokens=settings["min_expert_tokens"], rare_experts=settings["rare_experts"])


def test_rare_experts_are_counted_once_per_expert():
    prefix = "model.language_model.layers.3.mlp.experts"
    report = {"experts": {"rounded_to_nearest": [f"{prefix}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")],
                          "calibrated_on_all_tokens": [f"{prefix}.7.down_proj"]}}
    assert bench_beds.rare_expert_count(report) == 2
    assert bench_beds.rare_expert_count({}) is None


def test_summary_is_mean_and_sample_spread_per_model_and_variant():
    rows = [{"model": "m", "variant": "gptq-w4", "seed": s, "accuracy": a, "perplexity": p, "export_bytes": 10}
            for s, a, p in ((0, 60.0, 150.0), (1, 62.0, 152.0), (2, 64.0, 154.0))]
    rows.append({"model": "m", "variant": "bf16", "seed": None, "accuracy": 70.0, "perplexity": 140.0})
    gptq, bf16 = bench_beds.summarize(rows)
    assert (gptq["accuracy"], gptq["accuracy_std"], gptq["perplexity"], gptq["perplexity_std"]) == (62, 2, 152, 2)
    assert gptq["seeds"] == [0, 1, 2] and gptq["export_bytes"] == 10
    assert bf16["accuracy_std"] is None and "export_bytes" not in bf16
