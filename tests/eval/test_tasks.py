"""Task runners on small VLMEvalKit-layout TSV fixtures written here; generation is replaced by canned answers so
the scores are known exactly, and one run goes through the real demo model."""

import base64
import csv
import importlib.util
import io

import pytest
from PIL import Image

from qvlquant.eval.tasks import (
    answers_of,
    model_answerer,
    questions,
    read_tsv,
    run_task,
)


def b64_png(color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def canned(answers: dict):
    return lambda batch: [answers[q.index] for q in batch]


def test_docvqa_anls(tmp_path):
    rows = [{"index": "1", "image": b64_png(), "question": "title?", "answer": "['Acme Corp', 'ACME']"},
            {"index": "2", "image": b64_png(), "question": "year?", "answer": "['1990']"}]
    data = read_tsv(write_tsv(tmp_path / "d.tsv", rows))
    assert answers_of(data[0]) == ["Acme Corp", "ACME"]
    res = run_task("docvqa", data, canned({"1": "acme corq", "2": "nothing like it"}))
    assert res["n"] == 2 and res["accuracy"] == pytest.approx(100 * (1 - 1 / 9) / 2)


def test_mmbench_is_circular(tmp_path):
    rows = [{"index": "7", "image": b64_png(), "question": "animal?", "answer": "B", "A": "cat", "B": "dog", "C": "bird",
             "D": "", "hint": "nan"}]
    data = read_tsv(write_tsv(tmp_path / "m.tsv", rows))
    qs = questions("mmbench", data)
    assert len(qs) == 3 and all("D." not in q.prompt for q in qs)  # empty options dropped, 3 rotations
    always_dog = lambda batch: [next(k for k, v in q.options.items() if v == "dog") for q in batch]
    assert run_task("mmbench", data, always_dog)["accuracy"] == 100.0
    always_b = lambda batch: ["B" for _ in batch]  # right only in the unrotated order
    assert run_task("mmbench", data, always_b)["accuracy"] == 0.0
    two = data + [{**data[0], "index": "8", "answer": "A"}]  # the same options, 'cat' is right: every rotation wrong
    res = run_task("mmbench", two, always_dog)
    assert res["accuracy"] == 50.0 and res["n"] == 2 and len(res["predictions"]) == 6


def test_textvqa_chartqa_mathvista_mmmu(tmp_path):
    tv = [{"index": "1", "image": b64_png(), "question": "q", "answer": str(["red"] * 3 + ["dark red"] * 7)}]
    assert run_task("textvqa", tv, canned({"1": "Red"}))["accuracy"] == pytest.approx(90.0)
    cq = [{"index": "1", "image": b64_png(), "question": "q", "answer": "100"}]
    assert run_task("chartqa", cq, canned({"1": "104"}))["accuracy"] == 100.0
    mv = [{"index": "1", "image": b64_png(), "question": "sum?", "answer": "3.14", "question_type": "free_form",
           "answer_type": "float", "precision": "2.0"},
          {"index": "2", "image": b64_png(), "question": "which?", "answer": "dog", "question_type": "multi_choice",
           "answer_type": "text", "precision": "", "A": "cat", "B": "dog"}]
    assert run_task("mathvista", mv, canned({"1": "x = 3.14159", "2": "(A)"}))["accuracy"] == 50.0
    mm = [{"index": "1", "image": b64_png(), "question": "which?", "answer": "A", "question_type": "multiple-choice",
           "A": "yes", "B": "no"}]
    assert run_task("mmmu", mm, canned({"1": "The answer is A"}))["accuracy"] == 100.0


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="not a VLMEvalKit TSV"):
        read_tsv(write_tsv(tmp_path / "x.tsv", [{"index": "1", "question": "q"}]))
    with pytest.raises(FileNotFoundError):
        read_tsv(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="unknown task 'vqav9'"):
        run_task("vqav9", [], canned({}))
    with pytest.raises(ValueError, match="docvqa: no questions to score"):
        run_task("docvqa", [], canned({}))


def easyvqa_png_b64(index=0):
    """A real easy-vqa test image (test image 0: a red triangle) as base64."""
    from qvlquant.calib.easyvqa import load_split

    path = next(item.image_path for item in load_split("test") if item.image_path.endswith(f"/{index}.png"))
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def test_real_generation_through_the_demo(demo):
    """The demo, asked through the TSV prompt (a short-answer suffix it was not trained with), answers 'no', 'red',
    'no' greedily (measured; CPU, fp32), batched with left padding or one by one: ANLS 1 - 1/3 against 'noo', 1
    against 'red', 0 against 'yes'."""
    model, processor = demo
    image = easyvqa_png_b64(0)
    questions_answers = [("what is the color of the shape?", "['noo']"), ("color?", "['red']"),
                         ("is there a red shape in the image?", "['yes']")]  # prompts of different lengths
    rows = [{"index": str(i), "image": image, "question": q, "answer": a} for i, (q, a) in enumerate(questions_answers)]
    for batch_size in (3, 1):
        res = run_task("docvqa", rows, model_answerer(model, processor, max_new_tokens=4), batch_size=batch_size)
        assert [p["prediction"] for p in res["predictions"]] == ["no", "red", "no"]
        assert [p["score"] for p in res["predictions"]] == pytest.approx([2 / 3, 1.0, 0.0])
        assert res["n"] == 3 and res["accuracy"] == pytest.approx(100 * (2 / 3 + 1) / 3)


def test_eval_command_on_a_tsv_with_published_figures(tmp_path, capsys):
    from qvlquant.cli import main
    from qvlquant.evaluation import published_figures

    rows = [{"index": str(i), "image": b64_png(), "question": "title?", "answer": answer}
            for i, answer in enumerate(["['no']", "['noo']"])]
    data = write_tsv(tmp_path / "docvqa.tsv", rows)
    report = tmp_path / "e.json"
    argv = ["eval", "--model", "demo", "--base", "none", "--task", "docvqa", "--data", str(data), "--max-new-tokens",
            "4", "--no-perplexity", "--report", str(report)]
    assert main(argv) == 0
    import json

    out = json.loads(report.read_text())
    # the demo answers "no" to both (measured): ANLS 1 and 1 - 1/3, mean 83.33 %
    assert out == {"task": "docvqa", "model": "demo", "accuracy": 83.33, "n": 2, "quantization": None}
    predictions = [json.loads(line) for line in report.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in predictions] == ["no", "no"]
    assert main(["eval", "--task", "mmbench", "--base", "none"]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert published_figures("Qwen/Qwen2-VL-7B-Instruct", "docvqa") == (
        "published (Qwen2-VL-7B-Instruct, DocVQA_VAL, VLMEvalKit): BF16 93.89, GPTQ-Int8 93.94, GPTQ-Int4 93.16, AWQ 93.10")


def test_hf_dataset_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    from qvlquant.eval.tasks import read_rows

    ds = datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (40, 40), (0, 0, 255)) for _ in range(2)],
        "question": ["color?", "shape?"], "answer": [["blue", "navy"], ["square"]],
    }).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = read_rows(f"hf:{tmp_path / 'ds'}")
    assert [r["index"] for r in rows] == ["0", "1"] and answers_of(rows[0]) == ["blue", "navy"]
    res = run_task("docvqa", rows, canned({"0": "Blue", "1": "circle"}))
    assert res["accuracy"] == 50.0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vLLM is installed here: the error for a missing vLLM cannot be shown")
def test_vllm_backend_without_vllm_is_a_clear_error(tmp_path, capsys):
    from qvlquant.cli import main

    data = write_tsv(tmp_path / "d.tsv", [{"index": "1", "image": b64_png(), "question": "q", "answer": "x"}])
    argv = ["eval", "--task", "docvqa", "--data", str(data), "--backend", "vllm", "--base", "none"]
    assert main(argv) == 2 and "needs vLLM" in capsys.readouterr().err
