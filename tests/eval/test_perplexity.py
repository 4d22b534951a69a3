"""eval/perplexity.py on stub language models whose next-token distributions are known, so the perplexity is known
exactly: a uniform model gives the vocabulary size, a model right with probability 1/2 gives 2."""

import types

import pytest
import torch

from qvlquant.eval.perplexity import perplexity, token_stream

V = 50


class Uniform(torch.nn.Module):
    device = torch.device("cpu")

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))


class HalfSure(torch.nn.Module):
    """p(next = t + 1 mod V | t) = 1/2; the other V - 1 tokens share the other half."""

    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.windows = []

    def forward(self, input_ids):  # [b, w] -> logits [b, w, V]
        self.windows.append(input_ids.shape[0])
        probs = torch.full((*input_ids.shape, V), 0.5 / (V - 1))
        probs.scatter_(-1, ((input_ids + 1) % V).unsqueeze(-1), 0.5)
        return types.SimpleNamespace(logits=probs.log())


def counting(start, n):
    return (torch.arange(start, start + n) % V).long()


def test_uniform_model_has_the_vocabulary_size():
    assert perplexity(Uniform(), torch.randint(0, V, (300,)), window=16) == pytest.approx(V, rel=1e-5)


def test_known_distribution_hand_computed():
    assert perplexity(HalfSure(), counting(0, 64), window=16) == pytest.approx(2.0, rel=1e-5)  # -log(1/2) per token
    assert perplexity(HalfSure(), torch.zeros(64, dtype=torch.long), window=16) == pytest.approx(2 * (V - 1), rel=1e-5)


def test_windows_do_not_overlap_and_the_tail_is_dropped():
    # Each window counts on from its own start, so a pair across a window boundary would be a miss (p = 1/98),
    # as would any pair of the 10-token tail of zeros: neither is scored.
    stream = torch.cat([counting(0, 16), counting(30, 16), counting(7, 16), torch.zeros(10, dtype=torch.long)])
    model = HalfSure()
    assert perplexity(model, stream, window=16, batch_size=2) == pytest.approx(2.0, rel=1e-5)
    assert model.windows == [2, 1]  # 3 windows in batches of 2
    with pytest.raises(ValueError, match="has 15 tokens, fewer than one window of 16"):
        perplexity(model, counting(0, 15), window=16)


class Tokenizer:
    def convert_tokens_to_ids(self, token):
        assert token == "<|endoftext|>"
        return 99

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) - ord("a") for c in text]}


def test_token_stream_joins_documents_with_end_of_text():
    stream = token_stream(Tokenizer(), ["ab", "", "c"])
    assert stream.dtype == torch.long and stream.tolist() == [0, 1, 99, 99, 2, 99]


def test_perplexity_shows_a_bar_over_its_batches(monkeypatch):
    """Issue 14 item 5: a progress bar on perplexity, one step per batch of windows."""
    import qvlquant.eval.perplexity as ppl

    bars = []

    def recording(iterable, desc, unit="it", **kw):
        bars.append((desc, unit, list(iterable)))
        return bars[-1][2]

    monkeypatch.setattr(ppl, "progress", recording)
    perplexity(Uniform(), counting(0, 10 * 16), window=16, batch_size=4)  # 10 windows in batches of 4
    assert bars == [("perplexity", "batch", [0, 4, 8])]
