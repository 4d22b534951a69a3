"""Perplexity of the language model on held-out natural text (the GPTQ/AWQ papers' wikitext-2 metric)."""

from __future__ import annotations

import math

import torch

from qvlquant.ui.progress import progress


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents tokenized and joined, each followed by the end-of-text token. -> [T] int64."""
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eot]
    return torch.tensor(ids, dtype=torch.long)


@torch.inference_mode()
def perplexity(model, stream: torch.Tensor, window: int = 128, batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``window`` tokens (the tail that does not fill one
    window is dropped)."""
    n = stream.numel() // window
    if n == 0:
        raise ValueError(f"held-out text has {stream.numel()} tokens, fewer than one window of {window}")
    windows = stream[: n * window].view(n, window)  # [n, window]
    total, count = 0.0, 0
    for start in progress(range(0, n, batch_size), desc="perplexity", unit="batch"):
        ids = windows[start:start + batch_size].to(model.device)
        logits = model(input_ids=ids).logits.float()  # [b, window, vocab]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)
