"""Benchmark tasks read from VLMEvalKit's TSV layout (one row per question, the image as base64), answered by greedy
batched generation, and scored with the rules in ``metrics.py``.

Columns used: ``index``, ``image`` (base64), ``question``, ``answer``; multiple choice adds ``A``, ``B``, ... and an
optional ``hint``; MathVista adds ``question_type``, ``answer_type``, ``precision``; MMMU adds ``question_type``.
List answers (DocVQA, TextVQA) may be a Python/JSON list literal.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import pathlib
import string
import sys
from typing import Callable

import torch

from qvlquant.calib.images import load_image
from qvlquant.eval import metrics
from qvlquant.ui.progress import progress

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."


@dataclasses.dataclass(frozen=True)
class Question:
    index: str
    image: str  # data URI
    prompt: str
    row: dict
    options: dict | None = None
    answer_letter: str | None = None


def answers_of(row: dict) -> list[str]:
    raw = row.get("answer", "")
    if raw.startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(raw)
                return [str(v) for v in value]
            except (ValueError, SyntaxError):
                continue
    return [raw]


def options_of(row: dict) -> dict[str, str]:
    return {k: row[k] for k in string.ascii_uppercase[:10] if row.get(k) not in (None, "", "nan")}


def mc_prompt(row: dict, options: dict[str, str]) -> str:
    hint = f"Hint: {row['hint']}\n" if row.get("hint") not in (None, "", "nan") else ""
    listed = "\n".join(f"{k}. {v}" for k, v in options.items())
    return f"{hint}Question: {row['question']}\nOptions:\n{listed}\n{MC_SUFFIX}"


def read_tsv(path: str | pathlib.Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such TSV file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    missing = {"index", "image", "question", "answer"} - set(rows[0] if rows else {})
    if not rows or missing:
        raise ValueError(f"{path}: not a VLMEvalKit TSV (missing columns {sorted(missing)} or no rows)")
    return rows


def read_hf(spec: str, split: str = "test") -> list[dict]:
    """Rows of a Hugging Face dataset (``hf:PATH_OR_ID``, saved with save_to_disk or loadable with load_dataset),
    shaped like TSV rows: PIL images become base64 PNG, lists stay lists."""
    import base64
    import io

    from qvlquant.calib.sources import image_item, open_hf_dataset, undecoded_images

    ds = open_hf_dataset(spec, split, "--data")
    missing = {"question", "answer", "image"} - set(ds.column_names)
    if missing:
        raise ValueError(f"--data {spec}: missing column(s) {sorted(missing)}; it has {ds.column_names}")
    rows = []
    for i, row in enumerate(undecoded_images(ds, "image")):
        out = {k: (json.dumps(v) if isinstance(v, list) else "" if v is None else v) for k, v in row.items() if k != "image"}
        buf = io.BytesIO()
        load_image(image_item(row["image"], f"--data {spec} row {i}")).save(buf, format="PNG")
        out["image"] = base64.b64encode(buf.getvalue()).decode()
        out.setdefault("index", str(i))
        rows.append({k: str(v) for k, v in out.items()})
    return rows


def read_rows(data: str, split: str = "test") -> list[dict]:
    return read_hf(data, split) if data.startswith("hf:") else read_tsv(data)


def questions(task: str, rows: list[dict]) -> list[Question]:
    """The questions to ask. MMBench asks each question once per rotation of its options (CircularEval)."""
    out = []
    for row in rows:
        image = "data:image/png;base64," + row["image"].strip()
        options = options_of(row)
        if task == "mmbench":
            for shift, (opts, letter) in enumerate(metrics.rotations(options, row["answer"].strip())):
                out.append(Question(f"{row['index']}#{shift}", image, mc_prompt(row, opts), row, opts, letter))
        elif options and (task in ("mmmu", "mathvista")) and row.get("question_type", "multi_choice").startswith("multi"):
            out.append(Question(row["index"], image, mc_prompt(row, options), row, options))
        else:
            out.append(Question(row["index"], image, f"{row['question']}\n{SHORT_SUFFIX}", row))
    return out


def score(task: str, q: Question, prediction: str) -> float:
    row = q.row
    if task == "docvqa":
        return metrics.anls(prediction, answers_of(row))
    if task == "textvqa":
        return metrics.vqa_accuracy(prediction, answers_of(row))
    if task == "chartqa":
        return metrics.relaxed_accuracy(prediction, answers_of(row)[0])
    if task == "mmbench":
        return float(metrics.extract_choice(prediction, q.options) == q.answer_letter)
    if task == "mmmu":
        if q.options:
            return float(metrics.extract_choice(prediction, q.options) == row["answer"].strip())
        return float(prediction.strip().lower() == row["answer"].strip().lower())
    if task == "mathvista":
        precision = int(float(row["precision"])) if row.get("precision") not in (None, "", "nan") else None
        return float(metrics.mathvista_correct(prediction, row["answer"], row.get("answer_type", "text"), precision,
                                               q.options))
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(metrics.TASKS)}")


def circular_scores(qs: list[Question], predictions: list[str]) -> list[float]:
    """MMBench CircularEval: 1.0 per question whose every rotation was answered right, else 0.0 (in row order)."""
    by_row: dict[str, tuple[list, list]] = {}
    for q, p in zip(qs, predictions):
        picked, wanted = by_row.setdefault(q.row["index"], ([], []))
        picked.append(metrics.extract_choice(p, q.options))
        wanted.append(q.answer_letter)
    return [float(metrics.circular_correct(picked, wanted)) for picked, wanted in by_row.values()]


def run_task(task: str, rows: list[dict], answer: Callable[[list[Question]], list[str]], batch_size: int = 16) -> dict:
    """Ask every question (through ``answer``, a batch -> predictions function) and score the task."""
    if task not in metrics.TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(metrics.TASKS)}")
    if not rows:
        raise ValueError(f"{task}: no questions to score (an empty data set?)")
    qs = questions(task, rows)
    preds: list[str] = []
    for start in progress(range(0, len(qs), batch_size), desc=task, unit="batch"):
        preds += answer(qs[start:start + batch_size])
    per_q = [score(task, q, p) for q, p in zip(qs, preds)]
    values = circular_scores(qs, preds) if task == "mmbench" else per_q  # MMBench: every rotation right
    return {
        "task": task, "metric": metrics.TASKS[task], "accuracy": 100.0 * sum(values) / len(values), "n": len(values),
        "predictions": [{"index": q.index, "prediction": p, "score": s} for q, p, s in zip(qs, preds, per_q)],
    }


def vllm_answerer(model_path: str, tensor_parallel: int = 1, max_new_tokens: int = 32) -> Callable[[list[Question]], list[str]]:
    """Greedy generation on vLLM (tensor parallel across GPUs), for models one machine's transformers cannot hold.
    Not exercised in this project's CI (vLLM needs a GPU); the error when it is missing is."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ValueError("--backend vllm needs vLLM (pip install vllm, on a machine with a GPU)") from None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel, limit_mm_per_prompt={"image": 1})
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)

    def answer(batch: list[Question]) -> list[str]:
        prompts = [{
            "prompt": processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.prompt}]}],
                tokenize=False, add_generation_prompt=True),
            "multi_modal_data": {"image": load_image(q.image)},
        } for q in batch]
        return [o.outputs[0].text.strip() for o in llm.generate(prompts, params)]

    return answer


def model_answerer(model, processor, max_new_tokens: int = 32) -> Callable[[list[Question]], list[str]]:
    """Greedy batched generation through the model's processor (left padding)."""
    tok = processor.tokenizer

    @torch.inference_mode()
    def answer(batch: list[Question]) -> list[str]:
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": q.image}, {"type": "text", "text": q.prompt}]}],
            tokenize=False, add_generation_prompt=True) for q in batch]
        images = [load_image(q.image) for q in batch]
        tok.padding_side = "left"
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]

    return answer
