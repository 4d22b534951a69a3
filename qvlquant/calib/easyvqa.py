"""The embedded easy-vqa data set (PyPI ``easy-vqa``, MIT): real 64x64 images of shapes with questions and answers.

4,000 train / 1,000 test images, 38,575 train / 9,673 test questions over 13 one-word answers.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Split = Literal["train", "test"]


@dataclasses.dataclass(frozen=True)
class VqaItem:
    question: str
    answer: str
    image_path: str

    def messages(self, with_answer: bool = True) -> list[dict]:
        """Chat messages in the Qwen2-VL README format."""
        user = {"role": "user", "content": [{"type": "image", "image": self.image_path}, {"type": "text", "text": self.question}]}
        if not with_answer:
            return [user]
        return [user, {"role": "assistant", "content": [{"type": "text", "text": self.answer}]}]


def load_split(split: Split) -> list[VqaItem]:
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise RuntimeError("the easy-vqa package is missing: pip install easy-vqa") from e
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
    return [VqaItem(q, a, paths[i]) for q, a, i in zip(questions, answers, image_ids)]


def majority_baseline(train: list[VqaItem], test: list[VqaItem]) -> tuple[str, float]:
    """The most frequent train answer and its exact-match accuracy (percent) on ``test``."""
    counts: dict[str, int] = {}
    for item in train:
        counts[item.answer] = counts.get(item.answer, 0) + 1
    best = max(sorted(counts), key=counts.__getitem__)
    return best, 100.0 * sum(item.answer == best for item in test) / max(len(test), 1)
