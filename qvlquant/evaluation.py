"""Evaluate a checkpoint: task accuracy and held-out perplexity, optionally beside its base model.

    config = EvalConfig(task="easyvqa", limit=300)
    result = evaluate_with_baseline("out/demo-w4", config)   # base: the one recorded at quantization
    result.summary["accuracy"], result.summary["baseline"]["accuracy"], result.summary["delta_accuracy"]
    write_report(result, "eval.json")                        # eval.json + eval.predictions.jsonl

``summary`` is what ``qvlquant eval --report`` writes and ``qvlquant check`` gates.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import json
import pathlib

import torch

from qvlquant.assets.paths import DATA_DIR
from qvlquant.calib.easyvqa import load_split
from qvlquant.checkpoint.export import REPORT
from qvlquant.checkpoint.qconfig import read_quantization_config
from qvlquant.eval import easyvqa
from qvlquant.eval.metrics import EVAL_TASKS
from qvlquant.eval.perplexity import perplexity, token_stream
from qvlquant.eval.tasks import model_answerer, read_rows, run_task, vllm_answerer
from qvlquant.runtime.bnb import load_bnb, parse_bnb
from qvlquant.runtime.load import load
from qvlquant.ui.progress import say

BACKENDS = ("transformers", "vllm")
BNB_KEYS = ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type")
# How the eval table names each checkpoint format (weights_label)
FORMAT_LABELS = {"gptq": "GPTQ-format", "awq": "AWQ", "compressed-tensors": "compressed-tensors"}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how; validated on construction (errors name the qvlquant eval flag)."""

    task: str = "easyvqa"
    data: str | None = None  # the task's questions: a VLMEvalKit TSV or hf:PATH_OR_ID (all tasks but easyvqa)
    split: str = "test"  # hf: data sets: the split
    backend: str = "transformers"  # or "vllm" (TSV / hf: tasks only)
    tensor_parallel: int = 1  # vllm: GPUs
    max_new_tokens: int = 32  # TSV / hf: tasks (easy-vqa answers are one word)
    limit: int | None = None  # score only the first N questions
    batch_size: int = 64
    perplexity: bool = True  # held-out perplexity of the language model

    def __post_init__(self):
        if self.task not in EVAL_TASKS:
            raise ValueError(f"--task {self.task!r}: unknown task; choose one of {', '.join(EVAL_TASKS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        for flag, value in (("--batch-size", self.batch_size), ("--max-new-tokens", self.max_new_tokens),
                            ("--tensor-parallel", self.tensor_parallel)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.task != "easyvqa" and not self.data:
            raise ValueError(f"--task {self.task} needs --data FILE.tsv (VLMEvalKit layout)")
        if self.backend == "vllm" and self.task == "easyvqa":
            raise ValueError("--backend vllm runs the TSV / hf: tasks; easy-vqa runs on transformers")


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """``summary``: task, model, accuracy (percent, 2 decimals), n, ... (the eval report); ``predictions``: one dict
    per question asked."""

    summary: dict
    predictions: list


def quantization_summary(model) -> dict | None:
    """The settings of the model's quantization_config that the eval table shows (``CheckpointQuant.summary``: method,
    bits, group_size, sym; a bitsandbytes baseline's own keys); None for a full-precision model."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):  # transformers' config object (bitsandbytes)
        qc = qc.to_dict()
    if qc and qc.get("quant_method") == "bitsandbytes":
        return {k: getattr(qc[k], "value", qc[k]) for k in BNB_KEYS if k in qc}  # an Enum
    where = f"{getattr(model.config, 'name_or_path', None) or 'the model'}/config.json"
    quant = read_quantization_config(qc, where)
    return quant.summary() if quant else None


def load_model(model_path):
    """(model, processor): a qvlquant / BF16 checkpoint through qvlquant.runtime.load.load, or a bnb-nf4:BASE /
    bnb-int8:BASE baseline through transformers' BitsAndBytesConfig."""
    bnb = parse_bnb(model_path)
    return load_bnb(*bnb) if bnb else load(model_path)


def summary_line(summary: dict) -> str:
    """One line for a model as soon as it is scored (the table comes when all are)."""
    ppl = f", held-out perplexity {summary['perplexity']:.3f}" if "perplexity" in summary else ""
    return (f"eval {summary['model']} ({weights_label(summary)}): {summary['task']} {summary['accuracy']:.2f} % "
            f"of {summary['n']}{ppl}")


def heldout_perplexity(model, processor) -> float:
    """Perplexity on the demo's held-out text (3 decimals)."""
    docs = (DATA_DIR / "heldout.txt").read_text(encoding="utf-8").splitlines()
    return round(perplexity(model, token_stream(processor.tokenizer, docs)), 3)


def evaluate(model_path: str | pathlib.Path, config: EvalConfig = EvalConfig()) -> EvalResult:
    """Accuracy on ``config.task`` (and held-out perplexity unless switched off) of the checkpoint at
    ``model_path`` (a folder, quantized or not, or 'demo')."""
    torch.manual_seed(0)
    rows = read_rows(config.data, config.split)[: config.limit] if config.task != "easyvqa" else None
    if config.backend == "vllm":
        answerer = vllm_answerer(str(model_path), config.tensor_parallel, config.max_new_tokens)
        res = run_task(config.task, rows, answerer, config.batch_size)
        return EvalResult({"task": config.task, "model": str(model_path), "accuracy": round(res["accuracy"], 2),
                           "n": res["n"], "backend": "vllm"}, res["predictions"])
    model, processor = load_model(model_path)
    if rows is None:
        items = load_split("test")[: config.limit]
        res = easyvqa.evaluate(model, processor, items, batch_size=config.batch_size, desc=f"easy-vqa {model_path}")
    else:
        res = run_task(config.task, rows, model_answerer(model, processor, config.max_new_tokens), config.batch_size)
    summary = {"task": config.task, "model": str(model_path), "accuracy": round(res["accuracy"], 2), "n": res["n"],
               "quantization": quantization_summary(model)}
    if config.perplexity:
        summary["perplexity"] = heldout_perplexity(model, processor)
    say(summary_line(summary))
    return EvalResult(summary, res["predictions"])


def recorded_base(model_path: str | pathlib.Path) -> str | None:
    """The base model recorded in a qvlquant export's quantize report (a bnb-*:BASE baseline: BASE); None when there
    is no report."""
    bnb = parse_bnb(model_path)
    if bnb:
        return bnb[1]
    report = pathlib.Path(model_path) / REPORT
    if not report.exists():
        return None
    try:
        return json.loads(report.read_text())["base_model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{report}: cannot read base_model ({e}); pass --base MODEL or --base none") from None


def with_baseline(result: EvalResult, baseline: EvalResult) -> EvalResult:
    """``result`` with the baseline's summary and the accuracy difference (points, 2 decimals) added."""
    summary = {**result.summary, "baseline": baseline.summary,
               "delta_accuracy": round(result.summary["accuracy"] - baseline.summary["accuracy"], 2)}
    return EvalResult(summary, result.predictions)


def evaluate_with_baseline(model_path: str | pathlib.Path, config: EvalConfig = EvalConfig(),
                           base: str | None = None) -> EvalResult:
    """``evaluate`` of the model and of ``base`` (default: the base recorded at quantization; 'none' to skip) with
    the same config; the base's summary goes under "baseline", the difference under "delta_accuracy"."""
    base = recorded_base(model_path) if base is None else base
    result = evaluate(model_path, config)
    if not base or base == "none":
        return result
    return with_baseline(result, evaluate(base, config))


def write_report(result: EvalResult, path: str | pathlib.Path) -> None:
    """The summary as JSON at ``path``, the predictions beside it (``path`` with suffix .predictions.jsonl)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".predictions.jsonl"), "w", encoding="utf-8") as f:
        for p in result.predictions:
            f.write(json.dumps(p) + "\n")
    path.write_text(json.dumps(result.summary, indent=2) + "\n")


# The published figures' columns (qvlquant/eval/reference/qwen2vl_accuracy.csv, from the model cards of Qwen's
# quantized Qwen2-VL releases, e.g. https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct-GPTQ-Int4).
PUBLISHED_COLUMNS = {"mmmu": "MMMU_VAL", "docvqa": "DocVQA_VAL", "mmbench": "MMBench_DEV_EN", "mathvista": "MathVista_MINI"}


def published_figures(model: str, task: str) -> str | None:
    """One line with the published accuracy of the same model (by folder / hub name) on ``task``, BF16 and its
    quantized releases; None when none is shipped."""
    column = PUBLISHED_COLUMNS.get(task)
    if column is None:
        return None
    name = str(model).rstrip("/").split("/")[-1]
    text = importlib.resources.files("qvlquant.eval").joinpath("reference/qwen2vl_accuracy.csv").read_text()
    rows = [r for r in csv.DictReader(line for line in text.splitlines() if not line.startswith("#")) if r["model"] == name]
    if not rows:
        return None
    return f"published ({name}, {column}, VLMEvalKit): " + ", ".join(f"{r['quantization']} {r[column]}" for r in rows)


def weights_label(summary: dict) -> str:
    """How the eval table names a model's weights: 'BF16 (full precision)', 'AWQ W4g128', 'GPTQ-format W8g128',
    'compressed-tensors W4g128 asym', 'bnb NF4 (no calib)', 'compressed-tensors FP8 channel',
    'compressed-tensors FP8 static', 'compressed-tensors W8A8 INT8', 'compressed-tensors NVFP4 W4A4'."""
    q = summary.get("quantization")
    if not q:
        return "BF16 (full precision)"
    if q.get("quant_method") == "bitsandbytes":
        return f"bnb {'NF4' if q.get('load_in_4bit') else 'int8'} (no calib)"
    method = q.get("quant_method")
    static = bool(q.get("activations"))  # the calibrated schemes: activation scales from calibration
    if q.get("weights") == "fp8_e4m3":  # W8A8: e4m3 weights and e4m3 activations (dynamic, or static per tensor)
        prefix = "" if method == "fp8" else f"{FORMAT_LABELS.get(method, method)} "
        return prefix + ("FP8 static" if static else "FP8 block" if q.get("group_size", -1) > 0 else "FP8 channel")
    if q.get("weights") == "int8_w8a8":  # W8A8: int8 weights per channel and dynamic int8 activations per token
        return f"{FORMAT_LABELS.get(method, method)} W8A8 INT8"
    if q.get("weights") == "nvfp4_e2m1":  # e2m1 weights; 16-bit activations (W4A16) or e2m1 ones (W4A4)
        return f"{FORMAT_LABELS.get(method, method)} {'NVFP4 W4A4' if static else 'NVFP4A16'}"
    asym = "" if q.get("sym", True) or method == "awq" else " asym"  # AWQ is asymmetric by default: not repeated
    return f"{FORMAT_LABELS.get(method, method)} W{q['bits']}g{q['group_size']}{asym}"


def format_table(summaries: list[dict]) -> str:
    """The eval table: one line per summary (model, weights, accuracy, n, held-out perplexity)."""
    head = f"{'model':<40} {'weights':<24} {summaries[0]['task'] + ' %':>14} {'n':>6} {'held-out ppl':>12}"
    lines = [head, "-" * len(head)]
    for r in summaries:
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        lines.append(f"{str(r['model'])[-40:]:<40} {weights_label(r):<24} {r['accuracy']:>14.2f} {r['n']:>6} {ppl:>12}")
    return "\n".join(lines)
