"""Per-layer glue between the pipeline loop and the pure quantization math: one function per method, each taking a
decoder layer and its captured inputs, quantizing its linears in place and returning their codes."""

from __future__ import annotations

import torch

from qvlquant.families import ModelFamily
from qvlquant.quant.formats import QuantizedWeight
from qvlquant.quant.rtn import default_g_idx, rtn_quantize


def rtn_layer(layer: torch.nn.Module, inputs, family: ModelFamily, qcfg, prefix: str):
    """Round-to-nearest: needs no calibration statistics."""
    from qvlquant.pipeline import set_weight

    weights = {}
    for name in family.linears:
        linear = layer.get_submodule(name)
        q, scale, zero = rtn_quantize(linear.weight.data, qcfg.spec)
        weights[name] = QuantizedWeight(q, scale, zero, default_g_idx(q.shape[1], qcfg.spec), qcfg.spec)
        set_weight(linear, weights[name])
    return weights, {}


def collect_hessians(layer: torch.nn.Module, inputs, groups) -> dict[tuple[str, ...], tuple[torch.Tensor, int]]:
    """Replay ``layer`` over ``inputs`` and accumulate one Hessian per linear group (its members share the input)."""
    from qvlquant.pipeline import run_layer
    from qvlquant.quant.gptq import accumulate_hessian

    stats: dict = {}
    current_mask: list = [None]

    def hook_for(group):
        def hook(module, args, output):
            k = args[0].shape[-1]
            H, n = stats.get(group, (torch.zeros(k, k), 0))
            stats[group] = accumulate_hessian(H, n, args[0], current_mask[0])

        return hook

    handles = [layer.get_submodule(g[0]).register_forward_hook(hook_for(g)) for g in groups]
    try:
        for x in inputs:
            current_mask[0] = x.token_mask
            run_layer(layer, x)
    finally:
        for h in handles:
            h.remove()
    return stats


def gptq_layer(layer: torch.nn.Module, inputs, family: ModelFamily, qcfg, prefix: str):
    """GPTQ, one linear group at a time (true-sequential: each group's Hessian is re-captured after the groups
    before it were quantized), or all groups from the unquantized layer when true_sequential is off."""
    from qvlquant.pipeline import QuantizationError, set_weight
    from qvlquant.quant.gptq import CholeskyError, gptq_quantize

    steps = [[g] for g in family.linear_groups] if qcfg.true_sequential else [list(family.linear_groups)]
    weights, info = {}, {}
    for step in steps:
        hessians = collect_hessians(layer, inputs, step)
        for group in step:
            H, n = hessians.get(group, (None, 0))
            if n == 0:
                raise QuantizationError(f"{prefix}.{group[0]} received no calibration tokens; add samples or exclude it")
            for name in group:
                linear = layer.get_submodule(name)
                try:
                    weights[name], info[name] = gptq_quantize(
                        linear.weight.data, H, qcfg.spec, qcfg.block_size, qcfg.damp_percent, qcfg.damp_max,
                        qcfg.desc_act, qcfg.static_groups,
                    )
                except CholeskyError as e:
                    raise QuantizationError(f"{prefix}.{name}: {e}") from None
                info[name]["tokens"] = n
                set_weight(linear, weights[name])
    return weights, info


def capture_linear_inputs(layer: torch.nn.Module, inputs, names) -> dict[str, list[torch.Tensor]]:
    """Replay ``layer`` and keep the input [B, S, K] of each named linear, per batch."""
    from qvlquant.pipeline import run_layer

    seen: dict[str, list] = {n: [] for n in names}
    handles = [
        layer.get_submodule(n).register_forward_hook(lambda m, args, out, n=n: seen[n].append(args[0].detach()))
        for n in names
    ]
    try:
        for x in inputs:
            run_layer(layer, x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _tokens(feats: list[torch.Tensor], inputs, limit: int) -> torch.Tensor:
    """Real (unpadded) tokens of per-batch features, evenly subsampled to at most ``limit``. -> [T, K]."""
    x = torch.cat([f[i.token_mask] for f, i in zip(feats, inputs)])
    if x.shape[0] > limit:
        x = x[torch.linspace(0, x.shape[0] - 1, limit).long()]
    return x


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


def _output_fn(layer, group, linears, feats, inputs):
    """output_of(weights) for AWQ's scale search: the inspected module's output on the real tokens. -> [T, out]."""

    def run(x, li):
        if group.inspect is None:
            return torch.cat([torch.nn.functional.linear(x, lin.weight) for lin in linears], dim=-1)
        module = layer.get_submodule(group.inspect)
        if group.inspect == "self_attn":
            kw = {k: v for k, v in li.kwargs.items() if k in ("attention_mask", "position_ids", "position_embeddings")}
            return module(hidden_states=x, **kw)[0]
        return module(x)

    @torch.no_grad()
    def output_of(weights):
        with _swapped_weights(linears, weights):
            return torch.cat([run(f, li)[li.token_mask] for f, li in zip(feats, inputs)])

    return output_of


def _fold(prev: torch.nn.Module, linears, s: torch.Tensor, storage_dtype) -> None:
    """prev's output / s, the linears' input columns * s: the full-precision function is unchanged. The changed
    parameters of ``prev`` are rounded to the storage dtype so the exported model is exactly the in-memory one."""
    with torch.no_grad():
        if isinstance(prev, torch.nn.Linear):
            prev.weight.div_(s.view(-1, 1).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
                prev.bias.data = prev.bias.data.to(storage_dtype).to(prev.bias.dtype)
        else:
            prev.weight.div_(s.to(prev.weight.dtype))
            prev.weight.data = prev.weight.data.to(storage_dtype).to(prev.weight.dtype)
        for lin in linears:
            lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))


def awq_layer(layer: torch.nn.Module, inputs, family: ModelFamily, qcfg, prefix: str):
    """AWQ: search every scaling group's scales on the full-precision layer, fold them all, search clipping ranges
    (not for q/k, whose errors the softmax hides), then quantize with zero points."""
    from qvlquant.pipeline import set_weight
    from qvlquant.quant.awq import activation_scale, apply_clip, search_clip, search_scale

    firsts = [g[0] for g in family.linear_groups]
    feats = capture_linear_inputs(layer, inputs, firsts)
    owner = {name: g[0] for g in family.linear_groups for name in g}
    info: dict[str, dict] = {}
    found = []
    for group in family.scaling_groups:
        prev = layer.get_submodule(group.prev)
        linears = [layer.get_submodule(n) for n in group.linears]
        if isinstance(prev, torch.nn.Linear) and prev.out_features != linears[0].in_features:
            continue  # v_proj -> o_proj under GQA: v's outputs are shared by several heads, no per-channel fold
        x_mean = activation_scale(_tokens(feats[owner[group.linears[0]]], inputs, qcfg.awq_max_tokens))
        output_of = _output_fn(layer, group, linears, feats[owner[group.linears[0]]], inputs)
        s, found_info = search_scale([lin.weight.data for lin in linears], x_mean, qcfg.spec, output_of, qcfg.awq_grid)
        found.append((group, prev, linears, s))
        for n in group.linears:
            info[n] = dict(found_info, scaled_by=group.prev)
    for group, prev, linears, s in found:
        _fold(prev, linears, s, qcfg.storage_dtype)
        key = owner[group.linears[0]]
        feats[key] = [f / s.to(f.dtype) for f in feats[key]]
    scale_of = {n: s for group, _, _, s in found for n in group.linears}
    out_scale_of = {group.prev: s for group, prev, _, s in found if isinstance(prev, torch.nn.Linear)}
    weights = {}
    for name in family.linears:
        linear = layer.get_submodule(name)
        w = linear.weight.data
        if qcfg.awq_clip and not name.endswith(("q_proj", "k_proj")):
            max_val = search_clip(w, _tokens(feats[owner[name]], inputs, min(qcfg.awq_max_tokens, 512)), qcfg.spec)
            w = apply_clip(w, max_val)
        q, scale, zero = rtn_quantize(w, qcfg.spec)
        g_idx = default_g_idx(q.shape[1], qcfg.spec)
        weights[name] = QuantizedWeight(q, scale, zero, g_idx, qcfg.spec, scale_of.get(name), out_scale_of.get(name))
        set_weight(linear, weights[name])
        info.setdefault(name, {})
    return weights, info
