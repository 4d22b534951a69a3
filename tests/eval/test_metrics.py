"""Each metric on small hand-made fixtures, including the edge cases the official scorers handle."""

import pytest

from qvlquant.eval.metrics import (
    anls,
    circular_correct,
    extract_choice,
    levenshtein,
    mathvista_correct,
    normalise_vqa,
    relaxed_accuracy,
    rotations,
    vqa_accuracy,
)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("a", "a") == 0


@pytest.mark.parametrize("pred,answers,expected", [
    ("Acme Corp", ["acme corp"], 1.0),  # case-insensitive
    ("  acme   corp ", ["acme corp"], 1.0),  # whitespace normalised
    ("acme corq", ["acme corp"], 1 - 1 / 9),  # one edit in nine characters
    ("something else", ["acme corp"], 0.0),  # below the 0.5 threshold scores 0
    ("1990", ["in 1990", "1990"], 1.0),  # best over references
    ("", ["x"], 0.0),
])
def test_anls(pred, answers, expected):
    assert anls(pred, answers) == pytest.approx(expected)


def test_anls_needs_references():
    with pytest.raises(ValueError):
        anls("x", [])


def test_vqa_normalisation():
    assert normalise_vqa("The Two dogs.") == "2 dogs"
    assert normalise_vqa("1,000") == "1000" and normalise_vqa("3.5") == "3.5"
    assert normalise_vqa("dont") == "don't" and normalise_vqa("yes!") == "yes"


def test_vqa_accuracy_counts_annotators():
    ten = ["red"] * 3 + ["dark red"] * 7
    assert vqa_accuracy("red", ten) == pytest.approx(0.9)  # 3 agree: 7 subsets keep 3 (1.0), 3 keep 2 (2/3)
    assert vqa_accuracy("Dark red.", ten) == pytest.approx(1.0)
    assert vqa_accuracy("blue", ten) == 0.0
    assert vqa_accuracy("two", ["2"]) == 1.0


@pytest.mark.parametrize("pred,target,expected", [
    ("10.4", "10", 1.0), ("10.6", "10", 0.0), ("52%", "50", 1.0), ("1,050", "1000", 1.0), ("0", "0", 1.0),
    ("Yes", "yes", 1.0), ("no", "yes", 0.0),
])
def test_relaxed_accuracy(pred, target, expected):
    assert relaxed_accuracy(pred, target) == expected


OPTS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("pred,expected", [
    ("B", "B"), ("(C)", "C"), ("D.", "D"), ("A) cat", "A"), ("The answer is B", "B"), ("Answer: c", "C"),
    ("It is a dog.", "B"), ("cat or dog", None), ("I don't know", None),
])
def test_extract_choice(pred, expected):
    assert extract_choice(pred, OPTS) == expected


def test_circular_eval():
    rots = rotations(OPTS, "B")
    assert len(rots) == 4 and [a for _, a in rots] == ["B", "A", "D", "C"]
    assert all(opts[a] == "dog" for opts, a in rots)
    answers = [a for _, a in rots]
    assert circular_correct(answers, answers)
    assert not circular_correct(["B", "A", "D", "A"], answers)  # one rotation wrong: the question is wrong


def test_mathvista_rules():
    assert mathvista_correct("The total is 1,024 apples", "1024", "integer")
    assert not mathvista_correct("about 12.5", "12", "integer")
    assert mathvista_correct("so x = 3.14159", "3.14", "float", precision=2)
    assert not mathvista_correct("so x = 3.2", "3.14", "float", precision=2)
    assert mathvista_correct("(B)", "dog", "text", options=OPTS)
    assert not mathvista_correct("no idea", "dog", "text", options=OPTS)
