"""eval/easyvqa.py: answer normalisation, exact-match scoring and greedy answering, on stubs whose outputs are known,
and the prompt through the real demo processor."""

import pytest
import torch
from PIL import Image

from qvlquant.calib.easyvqa import VqaItem, load_split
from qvlquant.eval import easyvqa
from qvlquant.eval.easyvqa import answer, evaluate, normalise_answer, prompt_batch


@pytest.mark.parametrize("text,expected", [
    ("Red.", "red"), ("  Circle \n", "circle"), ("YES", "yes"), ("dark.blue", "dark blue"), ("a  b", "a b"), ("", ""),
])
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


def test_evaluate_scores_exact_matches(monkeypatch):
    items = [VqaItem("what color?", "Red.", "0.png"), VqaItem("what shape?", "triangle", "0.png"),
             VqaItem("is it blue?", "no", "1.png")]
    canned = {"what color?": "red", "what shape?": "circle", "is it blue?": "no"}
    batches = []

    def fake_answer(model, processor, chunk, images):
        batches.append(len(chunk))
        return [canned[it.question] for it in chunk]

    monkeypatch.setattr(easyvqa, "answer", fake_answer)
    res = evaluate(None, None, items, batch_size=2)
    assert res["task"] == "easyvqa" and res["n"] == 3 and res["accuracy"] == pytest.approx(200 / 3)
    assert [p["correct"] for p in res["predictions"]] == [True, False, True]  # "Red." matches "red"
    assert res["predictions"][1] == {"question": "what shape?", "image": "0.png", "answer": "triangle",
                                     "prediction": "circle", "correct": False}
    assert batches == [2, 1]
    with pytest.raises(ValueError, match="got no questions"):
        evaluate(None, None, [])


WORDS = {1: "Red", 2: ".", 3: "Circle", 7: "Q"}


class StubTokenizer:
    pad_token_id, eos_token_id, padding_side = 0, 9, "right"

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(WORDS[int(i)] for i in row if int(i) not in (0, 9)) for row in ids]


class StubProcessor:
    def __init__(self):
        self.tokenizer = StubTokenizer()
        self.seen = None

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True and len(messages) == 1  # no answer in the prompt
        return messages[0]["content"][1]["text"]

    def __call__(self, text, images, return_tensors, padding):
        self.seen = (self.tokenizer.padding_side, list(text), len(images))
        return {"input_ids": torch.full((len(text), 3), 7), "attention_mask": torch.ones(len(text), 3, dtype=torch.long)}


class StubModel:
    device = torch.device("cpu")

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, eos_token_id):
        assert do_sample is False and max_new_tokens == 4 and eos_token_id == 9
        new = torch.tensor([[1, 2, 9, 0], [3, 9, 0, 0]])  # "Red." and "Circle", then end / padding
        return torch.cat([input_ids, new], dim=1)


def test_answer_decodes_only_the_new_tokens(tmp_path):
    path = str(tmp_path / "a.png")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(path)
    processor, images = StubProcessor(), {}
    out = answer(StubModel(), processor, [VqaItem("q1", "red", path), VqaItem("q2", "circle", path)], images)
    assert out == ["red", "circle"]  # the prompt tokens (Q) are not part of the answer; normalised
    assert processor.seen == ("left", ["q1", "q2"], 2) and list(images) == [path]  # left padding; image read once


def test_prompt_batch_through_the_demo_processor(demo):
    _, processor = demo
    items = load_split("test")[:3]
    batch = prompt_batch(processor, items, {})
    assert batch["attention_mask"][:, -1].tolist() == [1, 1, 1]  # left padded: the last position is real
    assert batch["attention_mask"][:, 0].tolist() != [1, 1, 1]  # the prompts differ in length
    text = processor.tokenizer.decode(batch["input_ids"][0])  # the demo's word-level tokenizer joins with spaces
    assert text.endswith("<|im_start|> assistant") and items[0].question in text and items[0].answer not in text
    assert text.count("<|vision_start|>") == 1
