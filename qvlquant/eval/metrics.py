"""Scoring rules of the benchmarks the Qwen2-VL README and paper report, as pure functions of (prediction, reference).

- DocVQA: ANLS with threshold 0.5 (Biten et al.), best over the reference answers.
- TextVQA: VQA accuracy, min(#annotators who gave the answer / 3, 1) averaged over the 10 leave-one-out subsets, after
  the official answer normalisation (punctuation, articles, number words, contractions).
- ChartQA: relaxed accuracy, numbers within 5% of the target, other answers exact (case-insensitive).
- MMBench / MMMU / MathVista multiple choice: a letter extracted by rules (no LLM judge); MMBench is scored circularly:
  a question counts only if every rotation of its options is answered correctly.
- MathVista free form: the last number in the answer, compared at the answer's type and precision.
"""

from __future__ import annotations

import re

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "im": "i'm",
                "ive": "i've", "youre": "you're", "thats": "that's", "whats": "what's", "its": "it's"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$]")

# The benchmarks read from VLMEvalKit TSVs (eval/tasks.py) and the metric each reports.
TASKS = {"docvqa": "ANLS", "textvqa": "VQA accuracy", "chartqa": "relaxed accuracy", "mmbench": "circular accuracy",
         "mmmu": "accuracy", "mathvista": "accuracy (rule-based)"}
# Every task qvlquant evaluates: the embedded easy-vqa (eval/easyvqa.py) and the TSV ones.
EVAL_TASKS = ("easyvqa", *TASKS)


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction: best over the answers, 0 below the threshold."""
    if not answers:
        raise ValueError("ANLS needs at least one reference answer")
    p = " ".join(prediction.lower().split())
    best = 0.0
    for a in answers:
        a = " ".join(a.lower().split())
        longest = max(len(a), len(p))
        nl = levenshtein(a, p) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def normalise_vqa(text: str) -> str:
    """The official VQA answer normalisation (simplified to the rules that change scores in practice)."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"(?<!\d)\.(?!\d)", "", text)  # periods except decimal points
    text = text.replace("'", "'")
    words = []
    for w in text.split():
        w = NUMBER_WORDS.get(w, w)
        if w in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy against the annotators' answers (10 in VQA/TextVQA)."""
    if not answers:
        raise ValueError("VQA accuracy needs the annotators' answers")
    p = normalise_vqa(prediction)
    gts = [normalise_vqa(a) for a in answers]
    if len(gts) == 1:
        return float(p == gts[0])
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(g == p for g in others) / 3))
    return sum(scores) / len(scores)


def _to_float(text: str) -> float | None:
    t = text.strip().rstrip("%").replace(",", "").replace("$", "")
    try:
        return float(t)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA: numbers within ``tolerance`` relative error of the target; otherwise exact match."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t is not None:
        return float(p == t) if t == 0 else float(abs(p - t) / abs(t) <= tolerance)
    return float(prediction.strip().lower() == target.strip().lower())


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text answer picks, by rules: a bare letter ("B", "(B)", "B.", "Answer: B"), else the
    only option whose text appears in the answer. None when no rule decides."""
    text = prediction.strip()
    letters = "".join(sorted(options))
    patterns = [rf"^\(?([{letters}])\)?[.:)]?$", rf"^\(?([{letters}])[.:)]\s", rf"answer\s*(?:is|:)?\s*\(?([{letters}])\b",
                rf"^([{letters}])\s"]
    for pat in patterns:
        m = re.search(pat, text, flags=re.IGNORECASE if "answer" in pat else 0)
        if m:
            return m.group(1).upper()
    hits = [k for k, v in options.items() if v and v.strip().lower() in text.lower()]
    return hits[0] if len(hits) == 1 else None


def circular_correct(predictions: list[str | None], answers: list[str]) -> bool:
    """MMBench CircularEval: one question asked once per rotation of its options; correct only if all are."""
    return len(predictions) == len(answers) and all(p == a for p, a in zip(predictions, answers))


def rotations(options: dict[str, str], answer: str) -> list[tuple[dict[str, str], str]]:
    """Every circular shift of the options with the letter of the correct one in each."""
    letters = sorted(options)
    texts = [options[k] for k in letters]
    out = []
    for shift in range(len(letters)):
        rotated = texts[shift:] + texts[:shift]
        mapping = dict(zip(letters, rotated))
        out.append((mapping, letters[rotated.index(options[answer])]))
    return out


def last_number(text: str) -> str | None:
    found = re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", text)
    return found[-1].replace(",", "") if found else None


def mathvista_correct(prediction: str, answer: str, answer_type: str, precision: int | None = None,
                      options: dict[str, str] | None = None) -> bool:
    """MathVista testmini, rule-based (no GPT extraction): multiple choice by extract_choice, free form by the last
    number compared as an integer or at the given float precision, text answers by exact match."""
    if options:
        letter = extract_choice(prediction, options)
        return letter is not None and options[letter].strip().lower() == answer.strip().lower()
    if answer_type == "integer":
        n = last_number(prediction)
        return n is not None and round(float(n)) == int(float(answer)) and float(n).is_integer()
    if answer_type == "float":
        n = last_number(prediction)
        digits = precision if precision is not None else 2
        return n is not None and round(float(n), digits) == round(float(answer), digits)
    return prediction.strip().lower() == answer.strip().lower()
