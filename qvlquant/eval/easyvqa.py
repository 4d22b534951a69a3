"""easy-vqa exact-match accuracy through the model's own processor and greedy ``generate``."""

from __future__ import annotations

import torch

from qvlquant.calib.easyvqa import VqaItem
from qvlquant.calib.images import load_image
from qvlquant.ui.progress import progress


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def prompt_batch(processor, items: list[VqaItem], images: dict) -> dict:
    """Left-padded generation prompts (image + question) for ``items``; ``images`` caches decoded images by path."""
    texts, pics = [], []
    for item in items:
        if item.image_path not in images:
            images[item.image_path] = load_image(item.image_path)
        pics.append(images[item.image_path])
        texts.append(processor.apply_chat_template(item.messages(with_answer=False), tokenize=False, add_generation_prompt=True))
    processor.tokenizer.padding_side = "left"
    return dict(processor(text=texts, images=pics, return_tensors="pt", padding=True))


@torch.inference_mode()
def answer(model, processor, items: list[VqaItem], images: dict, max_new_tokens: int = 4) -> list[str]:
    batch = prompt_batch(processor, items, images)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    tok = processor.tokenizer
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    new = out[:, batch["input_ids"].shape[1]:]  # [B, new_tokens]
    return [normalise_answer(t) for t in tok.batch_decode(new, skip_special_tokens=True)]


def evaluate(model, processor, items: list[VqaItem], batch_size: int = 64, desc: str = "easy-vqa") -> dict:
    """``{"task": "easyvqa", "accuracy": percent, "n": scored, "predictions": [...]}``."""
    if not items:
        raise ValueError("easy-vqa evaluation got no questions (is --limit 0?)")
    images: dict = {}
    predictions = []
    for start in progress(range(0, len(items), batch_size), desc=desc, unit="batch"):
        chunk = items[start:start + batch_size]
        predictions += answer(model, processor, chunk, images)
    correct = [p == normalise_answer(it.answer) for p, it in zip(predictions, items)]
    return {
        "task": "easyvqa",
        "accuracy": 100.0 * sum(correct) / len(items),
        "n": len(items),
        "predictions": [
            {"question": it.question, "image": it.image_path, "answer": it.answer, "prediction": p, "correct": c}
            for it, p, c in zip(items, predictions, correct)
        ],
    }
