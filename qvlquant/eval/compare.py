"""Measures that compare a quantized model with its full-precision base: answer-token KL divergence and layer-wise
relative output error of every quantized linear (the intrinsic measure that still separates methods when end
accuracy does not move)."""

from __future__ import annotations

import collections
import math

import torch

from qvlquant.calib.easyvqa import VqaItem
from qvlquant.eval.easyvqa import prompt_batch
from qvlquant.quant.formats import QuantizedWeight
from qvlquant.quant.layer import hooked


@torch.inference_mode()
def answer_logits(model, processor, items: list[VqaItem], batch_size: int = 64) -> torch.Tensor:
    """Next-token logits at the end of each generation prompt (the answer token's distribution). -> [n, V] fp32."""
    images: dict = {}
    out = []
    for start in range(0, len(items), batch_size):
        batch = prompt_batch(processor, items[start:start + batch_size], images)
        out.append(model(**batch, use_cache=False).logits[:, -1].float())  # left padding: last position is real
    return torch.cat(out)


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(P_reference || P) over rows."""
    p_log = torch.log_softmax(reference_logits.float(), -1)
    q_log = torch.log_softmax(logits.float(), -1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


@torch.inference_mode()
def linear_inputs(model, names: list[str], batches: list[dict], max_tokens: int = 4096) -> dict[str, torch.Tensor]:
    """Inputs of the named linears of ``model`` on ``batches`` (real tokens only, subsampled). -> name: [T, K]."""
    seen: dict[str, list] = collections.defaultdict(list)
    mask: list = [None]
    hooks = [(model.get_submodule(n), lambda m, a, o, n=n: seen[n].append(a[0][mask[0]].float())) for n in names]
    with hooked(hooks):
        for b in batches:
            mask[0] = b["attention_mask"].bool()
            model(**b, use_cache=False)
    result = {}
    for n, xs in seen.items():
        x = torch.cat(xs)
        result[n] = x[torch.linspace(0, x.shape[0] - 1, min(max_tokens, x.shape[0])).long()]
    return result


@torch.no_grad()
def relative_output_error(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor) -> float:
    """||X W^T - X Wq^T||^2 / ||X W^T||^2. x [T, K], w/w_q [N, K]."""
    ref = x @ w.float().T
    return float((ref - x @ w_q.float().T).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-12))


def layer_errors(base_model, weights: dict[str, QuantizedWeight], batches: list[dict]) -> dict[str, float]:
    """Relative output error per linear type (q_proj, ..., down_proj), averaged over decoder layers, on held-out
    activations of the full-precision model."""
    xs = linear_inputs(base_model, sorted(weights), batches)
    per_type: dict[str, list[float]] = collections.defaultdict(list)
    for name, qw in weights.items():
        w = base_model.get_submodule(name).weight.detach()
        per_type[name.rsplit(".", 1)[-1]].append(relative_output_error(xs[name], w, qw.effective_weight()))
    return {k: sum(v) / len(v) for k, v in per_type.items()}


@torch.inference_mode()
def decoder_layer_errors(base_model, model, layers_path: str, batches: list[dict]) -> list[float]:
    """Per decoder layer, ``||L_q(x) - L(x)||^2 / ||L(x) - x||^2`` summed over the real tokens of ``batches``:
    the quantized layer's output error on the inputs the full-precision model feeds that layer, relative to what
    the layer adds to the residual stream. Blind to function-preserving rescaling (AWQ's folded scales, anyone's),
    so it compares any two quantizations of the same base. ``layers_path``: the family's ``decoder_layers``."""
    base_layers, layers = base_model.get_submodule(layers_path), model.get_submodule(layers_path)
    num, den = [0.0] * len(base_layers), [0.0] * len(base_layers)
    mask: list = [None]

    def hook_for(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            ref = output[0] if isinstance(output, tuple) else output
            got = layers[i](*args, **kwargs)  # the same call, on the quantized layer
            got = got[0] if isinstance(got, tuple) else got
            m = mask[0]
            num[i] += float((got - ref)[m].float().pow(2).sum())
            den[i] += float((ref - x)[m].float().pow(2).sum())
        return hook

    hooks = [base_layers[i].register_forward_hook(hook_for(i), with_kwargs=True) for i in range(len(base_layers))]
    try:
        for b in batches:
            mask[0] = b["attention_mask"].bool()
            base_model(**b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [n / max(d, 1e-30) for n, d in zip(num, den)]


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of repeated measurements (0 spread for a single one)."""
    if not values:
        raise ValueError("no measurements to summarise")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def verdict(values: list[float], reference: list[float], tolerance: float = 0.0) -> str:
    """'better', 'worse' or 'tie' for a lower-is-better measure against ``reference``: a difference of means no
    larger than the larger of the two spreads (standard deviations over repeats), or than ``tolerance``, is a tie."""
    (m, s), (mr, sr) = spread(values), spread(reference)
    if abs(m - mr) <= max(s, sr, tolerance):
        return "tie"
    return "better" if m < mr else "worse"
