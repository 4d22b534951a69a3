"""Build the test bed: the demo model with the outlier channels real LLMs have, then fine-tuned so that its weights
are its own again. ``python -m qvlquant.tools.demo.testbed [--alpha 32] [--steps 200] [--output DIR]``.

Why: the demo barely tells quantization methods apart (RTN W4 g128 costs it 0.3 % held-out perplexity; real 7B
LLMs lose ~2-5 % on wikitext-2). Real LLMs route a few hidden channels through very large activations (the
RMSNorm gains of those channels are large); rounding error in the weight columns that read them is multiplied by
those activations, which is what AWQ's scales and GPTQ's act-order exist to handle. The demo has none.

How (deterministic: fixed seeds, fixed data order, 2 threads):
1. ``inject_outliers``: in every decoder layer, ``channels`` hidden channels (the same ones in every layer, as the
   residual stream's outlier dimensions are) get their RMSNorm gains multiplied by ``alpha``, and the weight
   columns of q/k/v and gate/up that read them are divided by ``alpha``; likewise ``inter_channels`` MLP channels
   per layer (up_proj rows * alpha, down_proj columns / alpha). This alone leaves the full-precision function
   unchanged (up to float rounding).
2. ``fit`` (the demo's own training loop and data) fine-tunes every parameter for ``steps`` steps, so the small
   columns grow back to what the loss wants while the activations stay large: the regime in which round-to-
   nearest hurts, as in real LLMs.
3. The checkpoint (bf16 safetensors, the demo's processor) and ``testbed_report.json`` are written: perplexity,
   easy-vqa accuracy, the activation ratio of the outlier channels, and the RTN curve (W8 / W4 / W3 / W2).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import random
import sys

import torch

from qvlquant.assets.paths import DATA_DIR, TESTBED_DIR
from qvlquant.calib.easyvqa import load_split
from qvlquant.tools.demo import build
from qvlquant.tools.demo.train import fit, load_data

RTN_CURVE = ((8, 128), (4, 128), (3, 128), (2, 64))


def outlier_channels(hidden: int, intermediate: int, layers: int, channels: int, inter_channels: int,
                     seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Which channels carry outliers: ``channels`` hidden channels shared by every layer, and ``inter_channels`` MLP
    channels per layer, drawn with a fixed seed. -> (hidden [channels], per layer [inter_channels])."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randperm(hidden, generator=g)[:channels]
    return shared, [torch.randperm(intermediate, generator=g)[:inter_channels] for _ in range(layers)]


@torch.no_grad()
def inject_outliers(layers, alpha: float, shared: torch.Tensor, inter: list[torch.Tensor]) -> None:
    """Scale the outlier channels' activations by ``alpha`` and the weights that read them by 1 / alpha, in place
    (function-preserving). ``layers``: the decoder layers (Qwen2-VL's: input_layernorm, self_attn.{q,k,v}_proj,
    post_attention_layernorm, mlp.{gate,up,down}_proj)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be above 0, got {alpha!r}")
    for layer, mlp_channels in zip(layers, inter):
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            norm.weight[shared] *= alpha
            for lin in readers:
                lin.weight[:, shared] /= alpha
        mlp.up_proj.weight[mlp_channels] *= alpha
        mlp.down_proj.weight[:, mlp_channels] /= alpha


@torch.no_grad()
def activation_ratio(model, stream: torch.Tensor, shared: torch.Tensor, window: int = 128) -> float:
    """Mean |x| of the outlier channels over the other channels' at the input of every q_proj, on text."""
    seen = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].abs().flatten(0, 1).mean(0)))
             for layer in model.model.language_model.layers]
    try:
        model(input_ids=stream[: 8 * window].view(8, window))
    finally:
        for h in hooks:
            h.remove()
    mean = torch.stack(seen).mean(0)
    rest = torch.ones_like(mean, dtype=torch.bool)
    rest[shared] = False
    return float(mean[shared].mean() / mean[rest].mean())


def rtn_curve(model, stream: torch.Tensor) -> list[dict]:
    """Held-out perplexity after RTN (symmetric, every decoder linear) at each of ``RTN_CURVE``."""
    from qvlquant.eval.perplexity import perplexity
    from qvlquant.quant.rtn import fake_quantize
    from qvlquant.quant.spec import QuantSpec

    rows = []
    for bits, group in RTN_CURVE:
        q = copy.deepcopy(model)
        with torch.no_grad():
            for name, mod in q.model.language_model.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.copy_(fake_quantize(mod.weight, QuantSpec(bits, group, True)))
        rows.append({"bits": bits, "group_size": group, "perplexity": round(perplexity(q, stream), 3)})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--channels", type=int, default=8, help="outlier hidden channels (of 256), shared by the layers")
    ap.add_argument("--inter-channels", type=int, default=16, help="outlier MLP channels (of 512) per layer")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--output", type=pathlib.Path, default=TESTBED_DIR)
    ap.add_argument("--eval-limit", type=int, default=None, help="test questions to score at the end (default all)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(2)

    from qvlquant.eval.easyvqa import evaluate
    from qvlquant.eval.perplexity import perplexity, token_stream
    from qvlquant.runtime.load import load

    model, processor = load("demo")
    model = model.float()
    for p in model.parameters():
        p.requires_grad_(True)  # qvlquant.load hands out an inference model
    tok = processor.tokenizer
    train_items, test_items = load_split("train"), load_split("test")
    docs_train, _ = build.split_corpus(build.stdlib_docstrings())
    heldout = token_stream(tok, (DATA_DIR / "heldout.txt").read_text(encoding="utf-8").splitlines())
    text_cfg = model.config.text_config
    layers = model.model.language_model.layers
    shared, inter = outlier_channels(text_cfg.hidden_size, text_cfg.intermediate_size, len(layers),
                                     args.channels, args.inter_channels)
    before = {"perplexity": round(perplexity(model, heldout), 3), "rtn": rtn_curve(model, heldout)}
    inject_outliers(layers, args.alpha, shared, inter)
    injected = round(perplexity(model, heldout), 3)
    data = load_data(tok, processor, model.config, train_items, docs_train)
    seconds = fit(model, data, args.steps, args.lr, pct_start=0.05) if args.steps else 0.0
    model = model.to(torch.bfloat16)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    model = model.float()
    limit = args.eval_limit or len(test_items)
    report = {
        "made_by": " ".join(["python -m qvlquant.tools.demo.testbed", *(sys.argv[1:] if argv is None else argv)]),
        "alpha": args.alpha, "channels": shared.tolist(), "inter_channels_per_layer": args.inter_channels,
        "steps": args.steps, "lr": args.lr, "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
        "demo": before,
        "perplexity_after_injection": injected,
        "perplexity": round(perplexity(model, heldout), 3),
        "easyvqa_test_accuracy": round(evaluate(model, processor, test_items[:limit])["accuracy"], 2),
        "easyvqa_test_n": limit,
        "outlier_activation_ratio": round(activation_ratio(model, heldout, shared), 2),
        "rtn": rtn_curve(model, heldout),
    }
    (args.output / "testbed_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
