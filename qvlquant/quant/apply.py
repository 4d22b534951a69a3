"""Per-layer glue between the layer loop and the pure quantization math: one function per method, each taking a
decoder layer, its captured inputs and a ``LayerContext``, and reporting every quantized linear to
``ctx.finish`` as soon as it is done. Model-specific names come only from the family declaration."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from qvlquant.families import ModelFamily
from qvlquant.parallel.devices import trim_heap
from qvlquant.parallel.distributed import fold
from qvlquant.quant import int8
from qvlquant.quant.awq import (
    activation_sum,
    apply_clip,
    clip_from_gram,
    group_gram_sum,
    search_scale,
)
from qvlquant.quant.formats import QuantizedWeight
from qvlquant.quant.gptq import (
    CholeskyError,
    accumulate_hessian,
    gptq_quantize,
    hessian_with_scratch,
)
from qvlquant.quant.layer import (
    LayerContext,
    LayerInput,
    Phase,
    StopReplay,
    experts_on_all_tokens,
    layer_device,
    replay,
    rows_of,
)
from qvlquant.quant.rtn import default_g_idx, rtn_quantize
from qvlquant.quant.rtn import quantize as rtn_quantize_with
from qvlquant.quant.smoothquant import (
    input_absmax,
    search_strength,
    smoothing_scales,
    stored_norm_scales,
    weight_absmax,
)
from qvlquant.quant.spec import METHODS


def _rtn_weight(linear: torch.nn.Linear, spec) -> QuantizedWeight:
    q, scale, zero = rtn_quantize(linear.weight.data, spec)
    return QuantizedWeight(q, scale, zero, default_g_idx(q.shape[1], spec).to(q.device), spec)


def rtn_layer(layer: torch.nn.Module, inputs: list[LayerInput], ctx: LayerContext) -> None:
    """Round-to-nearest: needs no calibration statistics."""
    names = ctx.quantized(ctx.family.linears)
    owner = ctx.owners(layer, names)
    for name in names:
        if owner[name] == ctx.world.rank:
            ctx.step(Phase.QUANTIZE, f"round {name}")
            ctx.finish(name, _rtn_weight(layer.get_submodule(name), ctx.config(name).spec), {})
    ctx.settle(owner)


def collect_hessians(layer: torch.nn.Module, inputs: list[LayerInput], groups,
                     vision_weight: float = 1.0) -> dict[tuple[str, ...], tuple[torch.Tensor, int]]:
    """Replay ``layer`` over ``inputs`` and sum ``X^T X`` per linear group (its members share the input), in
    float64 on the layer's device; ``gptq.hessian`` turns a sum into GPTQ's ``2/n X^T X``. Image / video tokens
    count ``vision_weight`` times (1: like text). Each replay stops at the last of ``groups`` (in execution order):
    the rest of the layer is not needed. -> {group: (S [K, K], n)}."""
    sums: dict = {}
    current: dict = {}  # the batch being replayed: its real-token mask and token weights
    last = groups[-1] if groups else None  # groups come in execution order

    def hook_for(group):
        def hook(module, args, output):
            x = args[0]  # [B, S, K]
            S, n = sums.get(group) or (torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device), 0)
            mask, weight = rows_of(module, current["mask"]), rows_of(module, current["weight"])
            sums[group] = accumulate_hessian(S, n, x, mask.to(x.device), None if weight is None else weight.to(x.device))
            if group == last:
                raise StopReplay

        return hook

    replay(layer, inputs, [(layer.get_submodule(g[0]), hook_for(g)) for g in groups],
           before_each=lambda x: current.update(mask=x.token_mask, weight=x.token_weight(vision_weight)))
    return sums


# A MoE layer's experts are solved in chunks whose float64 Hessian sums take at most this much (or one expert's):
# 512 experts' gate/up sums of 4096 x 4096 would be 64 GiB at once; in 1 GiB, 8 experts per replay of the layer
EXPERT_HESSIAN_BYTES = 2**30


def gptq_steps(layer: torch.nn.Module, groups: list[tuple[str, ...]], family: ModelFamily,
               true_sequential: bool = True) -> list[list[tuple[str, ...]]]:
    """The replays GPTQ collects Hessians in, in order: one per group (true-sequential) or one for all groups; the
    copies of one linear group in every expert of a MoE layer (``mlp.experts.{e}.gate_proj``) read no output of
    each other, so they share replays, in chunks of at most ``EXPERT_HESSIAN_BYTES`` of Hessian sums."""
    steps: list[list] = []
    for g in groups:
        expert = family.expert_of(g[0]) is not None
        sibling = steps and expert and family.expert_template(steps[-1][-1][0]) == family.expert_template(g[0])
        if sibling or (steps and not true_sequential):
            steps[-1].append(g)
        else:
            steps.append([g])
    chunked = []
    for step in steps:
        dense = [g for g in step if family.expert_of(g[0]) is None]
        chunk, used = list(dense), 0
        for g in (g for g in step if family.expert_of(g[0]) is not None):
            k = layer.get_submodule(g[0]).in_features
            if chunk and used and used + 8 * k * k > EXPERT_HESSIAN_BYTES:
                chunked.append(chunk)
                chunk, used = [], 0
            chunk.append(g)
            used += 8 * k * k
        chunked.append(chunk)
    return chunked


def gptq_layer(layer: torch.nn.Module, inputs: list[LayerInput], ctx: LayerContext,
               decorate=lambda name, w, info: (w, info), qparams=None, round_nearest=None) -> None:
    """GPTQ, one linear group at a time (true-sequential: each group's Hessian is re-captured after the groups
    before it were quantized), or all groups from the unquantized layer when true_sequential is off. Across
    ranks: every rank sums its own batches, the sums meet on the ranks that solve the group's linears.
    ``decorate(name, weight, info) -> (weight, info)`` adds what another method did before (AWQ's folded scales
    and search results) to each result. ``qparams(name, w) -> (scale, zero)``: a fixed per-channel grid for every
    solved linear (``gptq_quantize``'s); ``round_nearest(linear, spec)``: what a linear rounded to nearest gets
    (None: ``rtn_quantize``'s grid)."""
    round_nearest = round_nearest or _rtn_weight
    groups = [g for g in ctx.family.linear_groups if ctx.config(g[0]) is not None]  # rules skip whole groups
    for step in gptq_steps(layer, groups, ctx.family, ctx.qcfg.true_sequential):
        names = [n for g in step for n in g]
        owner = ctx.owners(layer, names)
        solved = [g for g in step if ctx.config(g[0]).method != "rtn"]  # a rule may round a group to nearest
        sums = {}
        if solved:
            ctx.step(Phase.HESSIAN, f"Hessian of {', '.join(g[0] for g in solved)}")
            trim_heap()  # the groups before left freed temporaries: give them back before the next sums
            sums = collect_hessians(layer, inputs, solved, ctx.qcfg.vision_weight)
        routed = _rare_on_all_tokens(layer, inputs, solved, sums, ctx) if ctx.qcfg.rare_experts == "all_tokens" else {}
        for group in step:
            cfg = ctx.config(group[0])
            mine = [name for name in group if owner[name] == ctx.world.rank]
            if cfg.method == "rtn":
                for name in mine:
                    ctx.step(Phase.QUANTIZE, f"round {name}")
                    ctx.finish(name, *decorate(name, round_nearest(layer.get_submodule(name), cfg.spec), {}))
                continue
            ctx.step(Phase.SOLVE, f"solve {', '.join(group)}")  # the sums meeting, the Hessian made of them
            k = layer.get_submodule(group[0]).in_features
            S, n = sums.pop(group, None) or (torch.zeros(k, k, dtype=torch.float64, device=layer_device(layer)), 0)
            S, n = fold(S, sorted({owner[name] for name in group}), ctx.world), ctx.total_count(n)
            if ctx.family.expert_of(group[0]) is not None and n < ctx.qcfg.min_expert_tokens:
                for name in mine:  # a rare expert: too few tokens for a Hessian; rounded to nearest, and said
                    ctx.step(Phase.QUANTIZE, f"round {name} (rare expert)")
                    w = round_nearest(layer.get_submodule(name), cfg.spec)
                    ctx.finish(name, *decorate(name, w, {"tokens": n, "fallback": "rtn"}))
                continue
            if n == 0:
                raise ctx.fail(group[0], "received no calibration tokens; add samples or exclude it")
            if S is None:
                continue  # another rank solves this group's linears
            H, scratch = hessian_with_scratch(S, n)  # both in S's memory: no [K, K] matrix more
            del S
            for j, name in enumerate(mine):
                ctx.step(Phase.SOLVE, f"solve {name}")
                last = j == len(mine) - 1
                Hj = H if last else H.clone()  # gptq_quantize uses its Hessian in place
                try:
                    grid = None if qparams is None else functools.partial(qparams, name)
                    w, info = gptq_quantize(layer.get_submodule(name).weight.data, Hj, cfg, scratch if last else None,
                                            grid)
                except CholeskyError as e:
                    raise ctx.fail(name, str(e)) from None
                del Hj
                if last:  # the views hold S's memory: gone before the weight is dequantized and packed
                    H = scratch = None
                more = {"tokens": routed[group], "fallback": "all_tokens", "calibration_tokens": n} if group in routed \
                    else {"tokens": n}
                ctx.finish(name, *decorate(name, w, dict(info, **more)))
            H = scratch = None
        ctx.settle(owner)


def _rare_on_all_tokens(layer: torch.nn.Module, inputs: list[LayerInput], groups, sums: dict,
                        ctx: LayerContext) -> dict[tuple[str, ...], int]:
    """``rare_experts`` "all_tokens": the expert groups among ``groups`` that the router sent fewer than
    ``min_expert_tokens`` tokens (over every rank) get their Hessian sums from every token of the layer instead
    (``sums`` updated in place). -> {such group: the tokens routed to it}."""
    family = ctx.family
    experts = [g for g in groups if family.expert_of(g[0]) is not None]
    routed = {g: ctx.total_count((sums.get(g) or (None, 0))[1]) for g in experts}  # same order on every rank
    rare = [g for g in experts if routed[g] < ctx.qcfg.min_expert_tokens]
    if not rare:
        return {}
    for g in rare:
        sums.pop(g, None)
    ctx.step(Phase.HESSIAN, f"Hessian of {len(rare)} rarely reached experts' linear groups on all tokens")
    with experts_on_all_tokens(layer, family, {family.expert_of(g[0]) for g in rare}):
        sums.update(collect_hessians(layer, inputs, rare, ctx.qcfg.vision_weight))
    return {g: routed[g] for g in rare}


def _replay_linear_inputs(layer: torch.nn.Module, inputs: list[LayerInput], names,
                          take: Callable[[str, torch.Tensor, LayerInput], None]) -> None:
    """Replay ``layer``, handing ``take(name, x, batch)`` the input of each named linear on each batch: [B, S, K] as
    it ran, or for an expert's linear the real tokens routed to it, [T, K] (``rows_of``)."""
    current = {}

    def hook(module, args, out, n):
        x = args[0].detach()
        if getattr(module, "routed_rows", None) is not None:
            x = x[rows_of(module, current["batch"].token_mask).to(x.device)]
        take(n, x, current["batch"])

    replay(layer, inputs, [(layer.get_submodule(n), lambda m, args, out, n=n: hook(m, args, out, n)) for n in names],
           before_each=lambda x: current.update(batch=x))


def capture_linear_inputs(layer: torch.nn.Module, inputs: list[LayerInput], names) -> dict[str, list[torch.Tensor]]:
    """Replay ``layer`` and keep the input of each named linear, per batch: [B, S, K], or for an expert's linear
    the real tokens routed to it, [T, K] (``rows_of``)."""
    seen: dict[str, list] = {n: [] for n in names}
    _replay_linear_inputs(layer, inputs, names, lambda n, x, batch: seen[n].append(x))
    return seen


def input_absmaxima(layer: torch.nn.Module, inputs: list[LayerInput], names) -> dict[str, torch.Tensor | None]:
    """Replay ``layer`` and keep, for each named linear, the largest |x| per input channel over its real tokens
    (``smoothquant.input_absmax`` of all of them, [K] float32; None where no token reached it): a running maximum
    updated batch by batch, so memory holds one vector per linear, not the tokens ``capture_linear_inputs`` keeps."""
    maxima: dict[str, torch.Tensor | None] = {n: None for n in names}

    def update(n: str, x: torch.Tensor, batch: LayerInput) -> None:
        x = _real(x, batch)
        if x.shape[0]:
            m = input_absmax(x)
            maxima[n] = m if maxima[n] is None else torch.maximum(maxima[n], m)

    _replay_linear_inputs(layer, inputs, names, update)
    return maxima


def _real(f: torch.Tensor, x: LayerInput) -> torch.Tensor:
    """The real tokens of captured features: [B, S, K] masked, or an expert's [T, K], which are real already."""
    return f[x.token_mask.to(f.device)] if f.dim() == 3 else f


def _tokens(feats: list[torch.Tensor], inputs: list[LayerInput], limit: int, ctx: LayerContext) -> tuple[torch.Tensor, int]:
    """Real (unpadded) tokens of per-batch features, evenly subsampled to at most ``limit`` over every rank's
    tokens (this rank keeps those of the subsample that are its own). -> ([T, K] here, T over all ranks)."""
    x = torch.cat([_real(f, i) for f, i in zip(feats, inputs)])
    counts = ctx.each(x.shape[0])
    start, everyone = sum(counts[:ctx.world.rank]), sum(counts)
    if everyone > limit:
        picked = torch.linspace(0, everyone - 1, limit).long()
        picked = picked[(picked >= start) & (picked < start + x.shape[0])] - start
        return x[picked.to(x.device)], limit
    return x, everyone


def _mean_abs(x: torch.Tensor, count: int, ctx: LayerContext) -> torch.Tensor:
    """Mean |x| per input channel over every rank's tokens (float64 sums, rank order). x: [T, K] -> [K]."""
    return (ctx.total(activation_sum(x)) / max(1, count)).float()


class _swapped_weights:
    """Temporarily give ``linears`` other weights (restored on exit)."""

    def __init__(self, linears, weights):
        self.linears, self.weights, self.saved = linears, weights, []

    def __enter__(self):
        for lin, w in zip(self.linears, self.weights):
            self.saved.append(lin.weight.data)
            lin.weight.data = w.to(lin.weight.dtype)

    def __exit__(self, *exc):
        for lin, w in zip(self.linears, self.saved):
            lin.weight.data = w


def _output_fn(layer, group, linears, feats, inputs, family):
    """output_of(weights) for AWQ's scale search: the inspected module's output on the real tokens. -> [T, out].
    The attention runs per batch (its tokens interact); an MLP or bare linears act token by token, so they run
    once on all real tokens together (one large matmul instead of one small one per batch)."""
    module = None if group.inspect is None else layer.get_submodule(group.inspect)
    attention = group.inspect == family.attention
    tokens = None if attention else torch.cat([_real(f, li) for f, li in zip(feats, inputs)])

    def run(x, li=None):
        if module is None:
            return torch.cat([torch.nn.functional.linear(x, lin.weight) for lin in linears], dim=-1)
        if attention:
            li = li.to(x.device)
            kw = {k: v for k, v in li.kwargs.items() if k in family.attention_kwargs}
            out = module(hidden_states=x, **kw)
            return out[0] if isinstance(out, tuple) else out  # softmax attention: (output, weights)
        return module(x)

    @torch.no_grad()
    def output_of(weights):
        with _swapped_weights(linears, weights):
            if not attention:
                return run(tokens)
            return torch.cat([run(f, li)[li.token_mask.to(f.device)] for f, li in zip(feats, inputs)])

    return output_of


def _fold(prev: torch.nn.Module, linears, s: torch.Tensor, storage_dtype, norm_offset: float = 0.0) -> None:
    """prev's output / s, the linears' input columns * s: the full-precision function is unchanged. The changed
    parameters of ``prev`` are rounded to the storage dtype so the exported model is exactly the in-memory one.
    A norm scaling by (norm_offset + weight) gets (norm_offset + weight) / s - norm_offset."""
    with torch.no_grad():
        if isinstance(prev, torch.nn.Linear):
            prev.weight.div_(s.view(-1, 1).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
                prev.bias.data = prev.bias.data.to(storage_dtype).to(prev.bias.dtype)
        elif norm_offset:
            prev.weight.data = (prev.weight.data + norm_offset) / s.to(prev.weight.dtype) - norm_offset
            prev.weight.data = prev.weight.data.to(storage_dtype).to(prev.weight.dtype)
        else:
            prev.weight.div_(s.to(prev.weight.dtype))
            prev.weight.data = prev.weight.data.to(storage_dtype).to(prev.weight.dtype)
        for lin in linears:
            lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))


def _expert_tokens(feats, inputs, ctx: LayerContext, owner) -> dict[str, int]:
    """Expert linear -> the real tokens (over every rank) its expert's router sent it."""
    counts = {first: ctx.total_count(sum(int(_real(f, i).shape[0]) for f, i in zip(fs, inputs)))
              for first, fs in feats.items() if ctx.family.expert_of(first) is not None}
    return {name: counts[key] for name, key in owner.items() if key in counts}


def _search_scales(layer, inputs, ctx: LayerContext, feats, owner, rare=frozenset()) -> tuple[list, dict]:
    """Every scaling group's scales, searched on the full-precision layer. -> ([(group, prev, linears, s)], info)."""
    family, qcfg = ctx.family, ctx.qcfg
    found, info = [], {}
    for group in family.scaling_groups:
        if rare & set(group.linears + (group.prev,)):
            continue  # an expert too rarely reached: its statistics would be noise
        if not _smoothable(layer, group, ctx):
            continue
        prev = layer.get_submodule(group.prev)
        linears = [layer.get_submodule(n) for n in group.linears]
        spec = ctx.config(group.linears[0]).spec
        ctx.step(Phase.SCALE, f"scale search {group.prev} -> {', '.join(group.linears)}")
        x_feats = feats[owner[group.linears[0]]]
        x_mean = _mean_abs(*_tokens(x_feats, inputs, qcfg.awq_max_tokens, ctx), ctx)
        output_of = _output_fn(layer, group, linears, x_feats, inputs, family)
        try:
            s, found_info = search_scale([lin.weight.data for lin in linears], x_mean, spec, output_of,
                                         qcfg.awq_grid, ctx.total)
        except FloatingPointError as e:
            raise ctx.fail(group.linears[0], str(e)) from None
        found.append((group, prev, linears, s))
        for n in group.linears:
            info[n] = dict(found_info, scaled_by=group.prev)
    return found, info


def awq_layer(layer: torch.nn.Module, inputs: list[LayerInput], ctx: LayerContext) -> None:
    """AWQ: search every scaling group's scales on the full-precision layer, fold them all, search clipping ranges
    (not for the family's ``clip_skipped`` linears, whose errors the softmax hides), then quantize with zero
    points. Across ranks: the searches' statistics and losses are summed over every rank's tokens (so every rank
    folds the same scales); each linear's clipping and rounding runs on its owner."""
    family, qcfg = ctx.family, ctx.qcfg
    groups = [g for g in family.linear_groups if ctx.config(g[0]) is not None]  # rules skip whole groups
    firsts = [g[0] for g in groups]
    ctx.step(Phase.INPUTS, f"inputs of {', '.join(firsts)}")
    feats = capture_linear_inputs(layer, inputs, firsts)
    owner = {name: g[0] for g in groups for name in g}
    real = ctx.total_count(sum(int(i.token_mask.sum()) for i in inputs))
    if real == 0:
        raise ctx.fail(firsts[0], "received no calibration tokens; add samples or exclude it")
    tokens = _expert_tokens(feats, inputs, ctx, owner)
    # experts the router sent too few tokens: no scale or clipping search (noise), round-to-nearest, named; or
    # (rare_experts "all_tokens") their statistics taken from every token of the layer
    rare = {name for name, n in tokens.items() if n < qcfg.min_expert_tokens}
    wide = set()
    if rare and qcfg.rare_experts == "all_tokens":
        again = [first for first in firsts if first in rare]
        with experts_on_all_tokens(layer, family, {family.expert_of(first) for first in again}):
            feats.update(capture_linear_inputs(layer, inputs, again))
        wide, rare = rare, set()
    found, info = _search_scales(layer, inputs, ctx, feats, owner, rare)
    for name, n in tokens.items():
        fallback = "rtn" if name in rare else "all_tokens" if name in wide else None
        info[name] = dict(info.get(name, {}), tokens=n, **({"fallback": fallback} if fallback else {}))
    gptq_rounds = qcfg.awq_rounding == "gptq"
    ctx.step(Phase.SCALE, "fold the scales")
    for group, prev, linears, s in found:
        _fold(prev, linears, s, ctx.storage_dtype, family.norm_offset)
        if not gptq_rounds:  # the clipping search reads the scaled inputs; GPTQ captures its own
            key = owner[group.linears[0]]
            feats[key] = [f / s.to(f.dtype) for f in feats[key]]
    scale_of = {n: s for group, _, _, s in found for n in group.linears}
    out_scale_of = {group.prev: s for group, prev, _, s in found if isinstance(prev, torch.nn.Linear)}
    if gptq_rounds:  # GPTQ rounds the scaled layer (its own Hessians, true-sequential); no clipping
        del feats
        gptq_layer(layer, inputs, ctx, lambda name, w, more: (dataclasses.replace(
            w, input_scale=scale_of.get(name), output_scale=out_scale_of.get(name)),
            dict(info.get(name, {}), **{"gptq_loss" if k == "loss" else k: v for k, v in more.items()})))
        return
    names = ctx.quantized(family.linears)
    solver = ctx.owners(layer, names)
    grams: dict[str, torch.Tensor] = {}  # one per shared input (gate and up clip against the same tokens)
    for name in names:
        spec = ctx.config(name).spec  # linears sharing an input share their settings (fused in serving)
        clip = qcfg.awq_clip and name not in family.clip_skipped and name not in rare
        if clip and owner[name] not in grams:  # on every rank: a collective
            ctx.step(Phase.CLIP, f"clip Gram matrices of {owner[name]}'s inputs")
            grams[owner[name]] = _clip_gram(feats[owner[name]], inputs, ctx, spec)
        gram = grams.get(owner[name]) if clip else None
        if solver[name] != ctx.world.rank:
            continue
        w = layer.get_submodule(name).weight.data
        if clip:
            ctx.step(Phase.CLIP, f"clip search {name}")
            w = apply_clip(w, clip_from_gram(w, gram, spec))
        ctx.step(Phase.QUANTIZE, f"quantize {name}")
        q, scale, zero = rtn_quantize(w, spec)
        g_idx = default_g_idx(q.shape[1], spec).to(q.device)
        ctx.finish(name, QuantizedWeight(q, scale, zero, g_idx, spec, scale_of.get(name), out_scale_of.get(name)),
                   info.get(name, {}))
    ctx.settle(solver)


def _clip_gram(feats: list[torch.Tensor], inputs: list[LayerInput], ctx: LayerContext, spec) -> torch.Tensor:
    """The clipping search's per-group Gram matrices over (a subsample of) every rank's tokens. -> [G, gs, gs]."""
    x, count = _tokens(feats, inputs, min(ctx.qcfg.awq_max_tokens, 512), ctx)
    return (ctx.total(group_gram_sum(x, spec)) / max(1, count)).float()


def _smoothable(layer: torch.nn.Module, group, ctx: LayerContext) -> bool:
    """Whether a scaling group can take per-channel scales (AWQ's and SmoothQuant's): not v_proj -> o_proj under
    GQA (v's outputs are shared by several heads, no per-channel fold), nor a group with a skipped linear on either
    side (nothing is folded into or out of a linear left as it is)."""
    prev, family = layer.get_submodule(group.prev), ctx.family
    if isinstance(prev, torch.nn.Linear) and prev.out_features != layer.get_submodule(group.linears[0]).in_features:
        return False
    return all(ctx.config(n) is not None for n in group.linears + ((group.prev,) if group.prev in family.linears else ()))


def _real_absmax(x_feats: list[torch.Tensor], inputs: list[LayerInput]) -> torch.Tensor | None:
    """``input_absmax`` over the real tokens of captured per-batch features (an expert's: only the batches that
    reached it); None when there are none."""
    x_all = torch.cat([_real(f, x) for f, x in zip(x_feats, inputs)]) if x_feats else None  # [T, K]
    return None if x_all is None or x_all.shape[0] == 0 else input_absmax(x_all)


def smooth_layer(layer: torch.nn.Module, inputs: list[LayerInput], ctx: LayerContext,
                 strength: float | str, folded: list | None = None) -> dict[str, dict]:
    """SmoothQuant: every scaling group's scales from the full-precision layer (input maxima over all its real
    calibration tokens; ``strength`` a fixed alpha, or "auto": searched per group on at most ``awq_max_tokens``
    tokens for the least W8A8 output error), then all folded into the previous norm / linear as AWQ folds its
    own (``_fold``); a group searched to "off" is left as it is. ``folded``: where given, each folded group is
    appended to it as (group, s [K]: what its linears' columns were multiplied by and a previous linear's rows
    divided by), in the order they were folded (NVFP4 W4A4 replays that onto the checkpoint's weights as its
    export streams them). -> linear -> {"strength", "smoothed_by", and when searched "smoothing_loss",
    "smoothing_loss_off": the W8A8 output errors of the chosen strength and of none}."""
    family = ctx.family
    groups = [g for g in family.scaling_groups if _smoothable(layer, g, ctx)]
    firsts = list(dict.fromkeys(g.linears[0] for g in groups))
    ctx.step(Phase.INPUTS, f"inputs of {', '.join(firsts)}")
    if strength == "auto":  # the search scores candidate strengths on the tokens themselves
        feats = capture_linear_inputs(layer, inputs, firsts)
        maxima = {n: _real_absmax(feats[n], inputs) for n in firsts}
    else:  # a fixed strength needs each input channel's largest value only, kept as the layer runs
        feats, maxima = {}, input_absmaxima(layer, inputs, firsts)
    found, info = [], {}
    for group in groups:
        ctx.step(Phase.SCALE, f"smoothing {group.prev} -> {', '.join(group.linears)}")
        x_max = maxima[group.linears[0]]
        if x_max is None:
            continue  # an expert no calibration token reached: nothing to smooth by
        weights = [layer.get_submodule(n).weight.data for n in group.linears]
        if strength == "auto":
            x, _ = _tokens(feats[group.linears[0]], inputs, ctx.qcfg.awq_max_tokens, ctx)
            try:
                _, s, found_info = search_strength(x, weights, x_max)
            except FloatingPointError as e:
                raise ctx.fail(group.linears[0], str(e)) from None
        else:
            s, found_info = smoothing_scales(x_max, weight_absmax(weights), strength), {"strength": strength}
        if found_info["strength"] != "off":
            found.append((group, s))
        info.update({n: dict(found_info, smoothed_by=group.prev) for n in group.linears})
    ctx.step(Phase.SCALE, "fold the smoothing scales")
    for group, s in found:
        prev = layer.get_submodule(group.prev)
        if not isinstance(prev, torch.nn.Linear):  # the columns get what the stored norm divides by
            s = stored_norm_scales(prev.weight.data, s, ctx.storage_dtype, family.norm_offset)
        _fold(prev, [layer.get_submodule(n) for n in group.linears], s, ctx.storage_dtype, family.norm_offset)
        if folded is not None:
            folded.append((group, s))
    return info


def w8a8_layer(layer: torch.nn.Module, inputs: list[LayerInput], ctx: LayerContext,
               strength: float | str | None) -> None:
    """Calibrated INT8 W8A8: SmoothQuant (``strength``: alpha, "auto", or None for none), then GPTQ (``ctx.qcfg``
    method gptq, its Hessians from the smoothed layer) or round-to-nearest onto the W8A8 export's grid (int8 per
    output channel, symmetric, scales in the storage dtype: ``int8.channel_qparams``)."""
    info = smooth_layer(layer, inputs, ctx, strength) if strength is not None else {}
    name_of = {layer.get_submodule(n): n for n in ctx.family.linears}

    def round_nearest(linear: torch.nn.Linear, spec) -> QuantizedWeight:
        scale, zero = int8.channel_qparams(linear.weight.data, f"{ctx.prefix}.{name_of[linear]}", ctx.storage_dtype)
        q = rtn_quantize_with(linear.weight.data, scale, zero, spec.bits).to(torch.int32)
        return QuantizedWeight(q, scale, zero, default_g_idx(q.shape[1], spec).to(q.device), spec)

    def decorate(name, w, more):
        return w, dict(info.get(name, {}), **more)

    if ctx.qcfg.method == "gptq":
        qparams = lambda name, w: int8.channel_qparams(w, f"{ctx.prefix}.{name}", ctx.storage_dtype)
        gptq_layer(layer, inputs, ctx, decorate, qparams, round_nearest)
        return
    for name in ctx.quantized(ctx.family.linears):
        ctx.step(Phase.QUANTIZE, f"round {name}")
        ctx.finish(name, *decorate(name, round_nearest(layer.get_submodule(name), ctx.config(name).spec), {}))


def check_dispatch(dispatch: dict, names: tuple[str, ...]) -> None:
    """The dispatch must hold a function for exactly the method names ``spec.METHODS`` lists (what the config,
    recipes and CLI accept), so a name is never accepted and then missing here, nor the other way round."""
    if set(dispatch) != set(names):
        raise RuntimeError(f"quant.apply dispatches {sorted(dispatch)} but quant.spec.METHODS lists "
                           f"{sorted(names)}; add the method to both")


LAYER_METHODS = {  # method name -> the function the layer loop calls for every decoder layer
    "rtn": rtn_layer,
    "gptq": gptq_layer,
    "awq": awq_layer,
}
check_dispatch(LAYER_METHODS, METHODS)
