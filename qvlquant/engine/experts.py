"""Mixture-of-experts blocks run as one linear per expert.

transformers 5 holds a Qwen MoE layer's routed experts as two fused 3-D parameters (``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I]) and multiplies each expert's tokens by a slice of them. Quantization needs each expert as a
linear of its own: its own scales, and the Hessian / activation statistics of the tokens its router sends it.
``ExpertLinears`` is that module: one ``nn.Linear`` gate, up and down per expert (named by the family, e.g.
``mlp.experts.5.up_proj``, which is also how Qwen3.5-MoE checkpoints store them and how vLLM's loaders read them),
computing what the fused module computes. ``unfuse_experts`` puts one in place of each decoder layer's fused
experts module of a meta skeleton, so the checkpoint's per-expert tensors stream into it like any linear's.

Checkpoints that store the experts fused (Qwen3-VL-MoE's, ``family.fused_experts``) are read one expert's slice at a
time: ``fused_layout`` tells transformers' [E, out, in] from the transposed [E, in, out] by the shapes, and
``expert_weight`` cuts one linear out of an expert's slice.

Each expert's linears are called with the rows of the tokens routed to it only, and carry those rows' flat indices
(``routed_rows``) while they run, so that a statistics hook can match them to the batch's token mask and weights
(``qvlquant.quant.layer.rows_of``). An expert in ``all_tokens`` runs on every token instead (its output still
added for its routed tokens only): how a rarely reached expert is calibrated on all tokens.
"""

from __future__ import annotations

import torch

from qvlquant.families import ExpertSlice, ModelFamily


class ExpertMLP(torch.nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` under the family's linear names."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act, dtype, device):
        super().__init__()
        self.names = names
        gate, up, down = names
        for name, (n_in, n_out) in ((gate, (hidden, intermediate)), (up, (hidden, intermediate)),
                                     (down, (intermediate, hidden))):
            self.add_module(name, torch.nn.Linear(n_in, n_out, bias=False, dtype=dtype, device=device))
        self.act_fn = act

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        for lin in (gate, up, down):
            lin.routed_rows = rows
        try:
            return down(self.act_fn(gate(x)) * up(x))
        finally:
            for lin in (gate, up, down):
                lin.routed_rows = None


class ExpertLinears(torch.nn.Module):
    """The routed experts of one MoE block, children ``"0"``, ``"1"``, ... (``mlp.experts.5.up_proj``, as on disk);
    called as transformers calls its fused experts module:
    ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``."""

    def __init__(self, count: int, names: tuple[str, str, str], hidden: int, intermediate: int, act, dtype, device):
        super().__init__()
        self.num_experts = count
        self.all_tokens: frozenset[int] = frozenset()  # experts run on every token (``experts_on_all_tokens``)
        for e in range(count):
            self.add_module(str(e), ExpertMLP(names, hidden, intermediate, act, dtype, device))

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens in order
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        start = 0
        every = None
        for e, n in enumerate(counts[: self.num_experts]):
            pairs = order[start:start + n]
            start += n
            token, slot = pairs // k, pairs % k
            if e in self.all_tokens:  # calibration of a rare expert: its linears see every token
                every = torch.arange(hidden_states.shape[0], device=hidden_states.device) if every is None else every
                y = self.expert(e)(hidden_states, every)[token]
            elif n == 0:
                continue
            else:
                y = self.expert(e)(hidden_states[token], token)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def unfuse_experts(model: torch.nn.Module, family: ModelFamily) -> int:
    """Replace each decoder layer's fused experts module (``family.experts``) with an ``ExpertLinears`` of the same
    shapes, on the same device and in the same dtype (a meta skeleton stays on meta). -> the layers changed."""
    if not family.experts:
        return 0
    changed = 0
    for layer in model.get_submodule(family.decoder_layers):
        try:
            fused = layer.get_submodule(family.experts)
        except AttributeError:
            continue  # a layer without experts (a dense layer of a mixed model)
        if isinstance(fused, ExpertLinears):
            continue
        count, two_i, hidden = fused.gate_up_proj.shape
        param = fused.gate_up_proj
        module = ExpertLinears(count, family.expert_linears, hidden, two_i // 2, fused.act_fn, param.dtype,
                               param.device)
        parent_path, _, leaf = family.experts.rpartition(".")
        parent = layer.get_submodule(parent_path) if parent_path else layer
        setattr(parent, leaf, module)
        changed += 1
    return changed


def coverage(family: ModelFamily, layer_info: dict[str, dict]) -> dict | None:
    """What calibration reached the experts, from the per-linear results (``tokens``, ``fallback``): per layer,
    the tokens each expert's first linear received, the fewest, and the linears of experts that had too few
    (``QuantConfig.min_expert_tokens``): rounded to nearest, or calibrated on all tokens (``rare_experts``). None for a model without experts or a method that
    counts no tokens (RTN)."""
    if not family.experts:
        return None
    first = family.expert_linears[0]
    per_layer: dict[str, list] = {}
    fallback: dict[str, list] = {"rtn": [], "all_tokens": []}
    for name, info in layer_info.items():
        head, _, leaf = name.rpartition(".")
        layer_prefix, _, inside = head.partition(f".{family.experts}.")
        if not inside.isdigit():
            continue
        if info.get("fallback"):
            fallback[info["fallback"]].append(name)
        if leaf == first and "tokens" in info:
            tokens = per_layer.setdefault(layer_prefix, [None] * family.expert_count)
            tokens[int(inside)] = info["tokens"]
    if not per_layer:
        return None
    counts = [t for tokens in per_layer.values() for t in tokens if t is not None]
    return {"experts_per_layer": family.expert_count, "fewest_tokens": min(counts), "most_tokens": max(counts),
            "rounded_to_nearest": fallback["rtn"], "calibrated_on_all_tokens": fallback["all_tokens"],
            "tokens": per_layer}


def fused_layout(slices: tuple[ExpertSlice, ...], stored: dict[str, tuple[int, ...]], where: str) -> bool:
    """Whether one layer's fused expert tensors hold each expert's weight transposed ([E, in, parts x out], as
    Qwen3-VL-MoE's published checkpoints) rather than as transformers' parameters ([E, parts x out, in]).
    ``slices``: where the gate, up and down linears lie (``family.fused_experts``); ``stored``: each tensor's shape.
    Decided by the one reading under which every expert's gate and up come out [I, H] and its down [H, I] (a square
    tensor alone could be read either way; the layer's tensors together can not). A ValueError naming ``where`` and
    the shapes when no reading, or both, fit."""
    def linears(transposed: bool) -> list[tuple[int, ...]] | None:
        out = []
        for s in slices:
            shape = stored[s.tensor]
            if len(shape) != 3:
                return None
            rows, cols = (shape[2], shape[1]) if transposed else shape[1:]
            if rows % s.parts:
                return None
            out.append((shape[0], rows // s.parts, cols))
        return out

    fits = []
    for transposed in (False, True):
        got = linears(transposed)
        if got is not None:
            (e1, i1, h1), (e2, i2, h2), (e3, h3, i3) = got
            if len({e1, e2, e3}) == 1 and i1 == i2 == i3 and h1 == h2 == h3:
                fits.append(transposed)
    shapes = ", ".join(f"{name} {list(shape)}" for name, shape in stored.items())
    if len(fits) != 1:
        reason = "fit both readings" if fits else "fit neither"
        raise ValueError(f"{where}: the fused experts' tensors ({shapes}) {reason} of [E, 2I, H] / [E, H, I] "
                         "(transformers' layout) and [E, H, 2I] / [E, I, H] (transposed); the checkpoint is not "
                         "one qvlquant can read one expert at a time")
    return fits[0]


def expert_weight(entry: torch.Tensor, where: ExpertSlice, transposed: bool) -> torch.Tensor:
    """One expert linear's weight [out, in], a fresh contiguous tensor, from its expert's entry of the fused tensor
    (``[parts x out, in]``, or ``[in, parts x out]`` when ``transposed``)."""
    w = entry.T if transposed else entry
    n = w.shape[0] // where.parts
    return w[where.part * n:(where.part + 1) * n].clone(memory_format=torch.contiguous_format)
