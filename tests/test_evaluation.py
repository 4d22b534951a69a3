"""qvlquant.evaluation: the eval library behind ``qvlquant eval`` (config validation, baseline and delta, the report
files, the published figures, the table), on stubs where the logic is ours and once on the real demo model."""

import json
import types

import pytest

import qvlquant
from qvlquant import evaluation as run
from qvlquant.checkpoint.export import quantization_config
from qvlquant.cli import main
from qvlquant.evaluation import (
    EvalConfig,
    EvalResult,
    evaluate,
    evaluate_with_baseline,
    format_table,
    published_figures,
    quantization_summary,
    recorded_base,
    weights_label,
    write_report,
)
from qvlquant.families import QWEN2_VL
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.spec import QuantConfig, QuantSpec


@pytest.mark.parametrize("kwargs,message", [
    ({"limit": 0}, "--limit must be at least 1, got 0"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"max_new_tokens": -1}, "--max-new-tokens must be at least 1"),
    ({"tensor_parallel": 0}, "--tensor-parallel must be at least 1"),
    ({"task": "docvqa"}, "--task docvqa needs --data FILE.tsv"),
    ({"task": "easyvqq"}, "--task 'easyvqq': unknown task; choose one of easyvqa, docvqa"),
    ({"backend": "onnx"}, "--backend 'onnx': choose one of transformers, vllm"),
    ({"backend": "vllm"}, "--backend vllm runs the TSV / hf: tasks"),
])
def test_config_is_validated_on_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kwargs)


def test_config_defaults_are_the_cli_defaults():
    import argparse

    from qvlquant.cli import add_eval

    sub = argparse.ArgumentParser().add_subparsers()
    add_eval(sub)
    args = sub.choices["eval"].parse_args([])
    assert EvalConfig() == EvalConfig(task=args.task, data=args.data, split=args.split, backend=args.backend,
                                      tensor_parallel=args.tensor_parallel, max_new_tokens=args.max_new_tokens,
                                      limit=args.limit, batch_size=args.batch_size, perplexity=not args.no_perplexity)


def stub_evaluate(accuracy_of: dict, calls: list):
    """evaluate() replaced: the summary of each model from ``accuracy_of``; records (model, config) per call."""
    def fake(model_path, config=EvalConfig()):
        calls.append((str(model_path), config))
        summary = {"task": config.task, "model": str(model_path), "accuracy": accuracy_of[str(model_path)], "n": 12,
                   "quantization": None}
        return EvalResult(summary, [{"model": str(model_path)}])
    return fake


def test_baseline_and_delta(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(run, "evaluate", stub_evaluate({"q": 74.123, "base": 77.5}, calls))
    config = EvalConfig(limit=12)
    result = evaluate_with_baseline("q", config, base="base")
    assert list(result.summary) == ["task", "model", "accuracy", "n", "quantization", "baseline", "delta_accuracy"]
    assert result.summary["delta_accuracy"] == -3.38  # 74.123 - 77.5 = -3.377, 2 decimals
    assert result.summary["baseline"]["model"] == "base" and result.summary["baseline"]["accuracy"] == 77.5
    assert result.predictions == [{"model": "q"}]  # the model's answers, not the baseline's
    assert calls == [("q", config), ("base", config)]  # the same settings for both


def test_base_recorded_at_quantization_or_none(monkeypatch, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "quantize_report.json").write_text(json.dumps({"base_model": "base"}))
    calls = []
    monkeypatch.setattr(run, "evaluate", stub_evaluate({str(export): 70.0, "base": 71.0, "other": 69.0}, calls))
    assert recorded_base(export) == "base" and recorded_base(tmp_path) is None
    assert evaluate_with_baseline(export).summary["delta_accuracy"] == -1.0
    assert evaluate_with_baseline(export, base="other").summary["baseline"]["model"] == "other"
    assert "baseline" not in evaluate_with_baseline(export, base="none").summary
    assert [c[0] for c in calls] == [str(export), "base", str(export), "other", str(export)]
    (export / "quantize_report.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot read base_model"):
        recorded_base(export)


def test_the_top_level_evaluate_is_the_library(monkeypatch):
    calls = []
    monkeypatch.setattr(run, "evaluate", stub_evaluate({"m": 50.0, "b": 40.0}, calls))
    result = qvlquant.evaluate("m", base="b", limit=5, perplexity=False)
    assert result.summary["delta_accuracy"] == 10.0 and calls[0][1] == EvalConfig(limit=5, perplexity=False)


def test_write_report(tmp_path):
    result = EvalResult({"task": "easyvqa", "accuracy": 50.0}, [{"prediction": "red"}, {"prediction": "no"}])
    write_report(result, tmp_path / "sub" / "e.json")
    assert (tmp_path / "sub" / "e.json").read_text() == '{\n  "task": "easyvqa",\n  "accuracy": 50.0\n}\n'
    assert (tmp_path / "sub" / "e.predictions.jsonl").read_text() == '{"prediction": "red"}\n{"prediction": "no"}\n'


def test_published_figures():
    assert published_figures("Qwen/Qwen2-VL-2B-Instruct/", "mmbench") == (
        "published (Qwen2-VL-2B-Instruct, MMBench_DEV_EN, VLMEvalKit): BF16 72.07, GPTQ-Int8 71.99, GPTQ-Int4 70.87, "
        "AWQ 71.64")
    assert published_figures("Qwen2-VL-7B-Instruct", "mathvista").endswith("BF16 58.20, GPTQ-Int8 57.90, "
                                                                          "GPTQ-Int4 60.30, AWQ 56.80")
    assert published_figures("Qwen/Qwen2-VL-2B-Instruct", "easyvqa") is None  # no published column
    assert published_figures("demo", "docvqa") is None  # no published model of that name


def test_labels_and_table():
    def config(**qc):
        return types.SimpleNamespace(config=types.SimpleNamespace(quantization_config=qc))

    q = quantization_summary(config(quant_method="gptq", bits=4, group_size=128, sym=False, desc_act=True))
    assert q == {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False}
    assert quantization_summary(types.SimpleNamespace(config=types.SimpleNamespace())) is None
    assert weights_label({"quantization": q}) == "GPTQ-format W4g128 asym"
    assert weights_label({"quantization": {**q, "sym": True}}) == "GPTQ-format W4g128"
    assert weights_label({"quantization": {"quant_method": "awq", "bits": 4, "group_size": 64}}) == "AWQ W4g64"
    assert weights_label({"quantization": None}) == "BF16 (full precision)"
    rows = [{"task": "easyvqa", "model": "demo", "accuracy": 77.5, "n": 300, "quantization": None, "perplexity": 34.16},
            {"task": "easyvqa", "model": "/a/very/long/path/to/the/export/folder/demo-w4", "accuracy": 76.0, "n": 300,
             "quantization": {"quant_method": "awq", "bits": 4, "group_size": 128}}]
    assert format_table(rows).splitlines() == [
        "model                                    weights                       easyvqa %      n held-out ppl",
        "-" * 100,
        "demo                                     BF16 (full precision)             77.50    300       34.160",
        "y/long/path/to/the/export/folder/demo-w4 AWQ W4g128                        76.00    300            -",
    ]


@pytest.mark.parametrize("fmt,spec,label", [
    (PackFormat.COMPRESSED, QuantSpec(4, 128, True), "compressed-tensors W4g128"),
    (PackFormat.COMPRESSED, QuantSpec(8, -1, False), "compressed-tensors W8g-1 asym"),
    (PackFormat.AWQ_GEMM, QuantSpec(4, 64, False), "AWQ W4g64"),
    (PackFormat.GPTQ, QuantSpec(3, 32, False), "GPTQ-format W3g32 asym"),
])
def test_every_format_the_writer_writes_is_summarised_and_labelled(fmt, spec, label):
    """The eval reads the loaded model's quantization_config through the checkpoint reader: a compressed-tensors
    config (bits inside its config group) is labelled like the others (it was a KeyError: 'bits')."""
    method = "awq" if fmt is PackFormat.AWQ_GEMM else "rtn"
    qc = quantization_config(QuantConfig(method, spec), fmt, QWEN2_VL, 2)
    model = types.SimpleNamespace(config=types.SimpleNamespace(quantization_config=qc, name_or_path="out/q"))
    q = quantization_summary(model)
    assert q == {"quant_method": qc["quant_method"], "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}
    assert weights_label({"quantization": q}) == label


@pytest.fixture(scope="module")
def rtn_exports(tmp_path_factory):
    """The demo quantized once by RTN (deterministic: the same codes whatever the layout), written in the GPTQ
    layout and as compressed-tensors."""
    root = tmp_path_factory.mktemp("eval-formats")
    for fmt in ("auto", "compressed-tensors"):
        args = ["quantize", "--method", "rtn", "--format", fmt, "--num-samples", "2", "--output", str(root / fmt)]
        assert main(args) == 0
    return root


@pytest.mark.slow
def test_eval_of_a_compressed_tensors_export(rtn_exports, tmp_path, capsys):
    """qvlquant.evaluate and ``qvlquant eval`` on a compressed-tensors export: a report naming the format, bits and
    group, and exactly the answers and perplexity of the same RTN weights in the GPTQ layout."""
    ct, gptq = rtn_exports / "compressed-tensors", rtn_exports / "auto"
    result = qvlquant.evaluate(ct, base="none", limit=4, batch_size=4)
    reference = qvlquant.evaluate(gptq, base="none", limit=4, batch_size=4)
    assert result.summary["quantization"] == {"quant_method": "compressed-tensors", "bits": 4, "group_size": 128,
                                              "sym": True}
    assert result.predictions == reference.predictions and result.summary["n"] == 4
    assert (result.summary["accuracy"], result.summary["perplexity"]) == (reference.summary["accuracy"],
                                                                        reference.summary["perplexity"])
    report = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", "--model", str(ct), "--base", "none", "--limit", "4", "--no-perplexity",
                 "--report", str(report)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split()[1:4] == ["compressed-tensors", "W4g128", f"{reference.summary['accuracy']:.2f}"]
    written = json.loads(report.read_text())
    assert written["quantization"] == result.summary["quantization"] and written["n"] == 4
    assert "perplexity" not in written and report.with_suffix(".predictions.jsonl").read_text().count("\n") == 4


def test_evaluate_the_demo(demo):
    """The real path: the demo model on the first 12 easy-vqa test questions (11 right, measured) and the held-out
    perplexity the CLI tests pin (34.16)."""
    result = evaluate("demo", EvalConfig(limit=12, batch_size=5))
    assert result.summary == {"task": "easyvqa", "model": "demo", "accuracy": 91.67, "n": 12, "quantization": None,
                              "perplexity": pytest.approx(34.163, abs=0.002)}
    assert [p["correct"] for p in result.predictions] == [False] + [True] * 11
    assert "perplexity" not in evaluate("demo", EvalConfig(limit=1, perplexity=False)).summary


def test_each_model_is_summarised_as_it_finishes(monkeypatch, capsys):
    """One line on stderr per model as soon as it is scored (before the table), through qvlquant.ui.progress.say."""
    monkeypatch.setattr("qvlquant.ui.progress.quiet", lambda: False)
    summary = {"task": "easyvqa", "model": "out/q", "accuracy": 77.5, "n": 300, "perplexity": 34.3,
               "quantization": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}}
    assert run.summary_line(summary) == ("eval out/q (GPTQ-format W4g128): easyvqa 77.50 % of 300, held-out "
                                         "perplexity 34.300")
    model = types.SimpleNamespace(config=types.SimpleNamespace(quantization_config=None))
    monkeypatch.setattr(run, "load_model", lambda path: (model, None))
    monkeypatch.setattr(run, "load_split", lambda split: ["q"] * 3)
    monkeypatch.setattr(run.easyvqa, "evaluate", lambda *a, **k: {"accuracy": 100 * 2 / 3, "n": 3, "predictions": []})
    evaluate("demo", EvalConfig(perplexity=False))
    assert capsys.readouterr().err == "eval demo (BF16 (full precision)): easyvqa 66.67 % of 3\n"


@pytest.mark.parametrize("scheme,label", [("FP8", "compressed-tensors FP8 static"),
                                          ("NVFP4", "compressed-tensors NVFP4 W4A4"),
                                          ("FP8_DYNAMIC", "compressed-tensors FP8 channel"),
                                          ("NVFP4A16", "compressed-tensors NVFP4A16")])
def test_the_schemes_are_labelled_by_their_activations(scheme, label):
    """The calibrated schemes' configs (static activation scales) are told apart from the data-free ones of the
    same weights in the eval table."""
    from qvlquant.checkpoint.export import fp8_quantization_config, nvfp4_quantization_config
    from qvlquant.quant.formats import SCHEMES, Nvfp4Format

    fmt = SCHEMES[scheme]
    qc = nvfp4_quantization_config(fmt, QWEN2_VL) if isinstance(fmt, Nvfp4Format) else \
        fp8_quantization_config(fmt, QWEN2_VL, [])
    model = types.SimpleNamespace(config=types.SimpleNamespace(quantization_config=qc, name_or_path="out/q"))
    assert weights_label({"quantization": quantization_summary(model)}) == label
