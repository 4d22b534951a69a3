"""``qvlquant bench``: decode speed and peak memory of BF16 vs quantized variants, the published protocol.

The published tables (shared/reference/qwen2vl_speed_memory.csv): batch 1, an input of 1 / 6144 / 14336 / 30720
tokens, 2048 generated tokens, tokens/s and peak GPU memory. Speed and memory do not depend on weight values, so a
model of the real architecture is built from its config with random weights and its decoder linears are quantized
RTN-style into the real packed formats (QuantLinear, which runs the Triton kernel on CUDA). On CPU a scaled-down
protocol (the demo's shape, short inputs, a few tokens) exercises the same code path.

Inputs are text tokens (random ids); the image part of the published inputs is not reproduced here, so prefill
differs from the published setup, while decode, which the tables measure, reads the same weights and KV cache.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import resource
import time

import torch

from qvlquant.quant.formats import PackFormat, QuantizedWeight
from qvlquant.quant.rtn import QuantSpec, default_g_idx, rtn_quantize

SHAPES = {  # text configs of the released checkpoints (the vision tower does not run in this protocol)
    "qwen2-vl-2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "demo": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2008, tie_word_embeddings=True),
}
VARIANTS = {
    "bf16": None,
    "gptq-int8": (PackFormat.GPTQ, QuantSpec(8, 128, True)),
    "gptq-int4": (PackFormat.GPTQ, QuantSpec(4, 128, True)),
    "awq": (PackFormat.AWQ_GEMM, QuantSpec(4, 128, False)),
}
PUBLISHED_NAMES = {"qwen2-vl-2b": ("Qwen2-VL-2B-Instruct", "BF16", "GPTQ-Int8", "GPTQ-Int4", "AWQ"),
                   "qwen2-vl-7b": ("Qwen2-VL-7B-Instruct", "BF16", "GPTQ-Int8", "GPTQ-Int4", "AWQ")}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    shape: str = "demo"
    variants: tuple[str, ...] = ("bf16", "gptq-int4", "awq", "gptq-int8")
    input_lengths: tuple[int, ...] = (1, 32)
    new_tokens: int = 8
    device: str = "cpu"
    static_cache: bool = False
    compile: bool = False  # torch.compile the forward ("reduce-overhead": CUDA graphs on a GPU); implies static_cache


def build_model(shape: str, device: str, dtype: torch.dtype):
    """A Qwen2-VL of the given shape with random weights, built directly on ``device``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if shape not in SHAPES:
        raise ValueError(f"unknown --shape {shape!r}; choose one of {', '.join(SHAPES)}")
    text = dict(SHAPES[shape], bos_token_id=0, eos_token_id=1, pad_token_id=0)
    tie = text.pop("tie_word_embeddings")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # Qwen2-VL's [16, 24, 24] at head_dim 128
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=64, hidden_size=text["hidden_size"],
                                                                num_heads=1), tie_word_embeddings=tie)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(dtype)
    return model.eval()


@torch.no_grad()
def quantize_random(model, fmt: PackFormat, spec: QuantSpec) -> None:
    """Replace every decoder linear by a QuantLinear holding the RTN codes of its (random) weight."""
    from qvlquant.families import QWEN2_VL
    from qvlquant.runtime import QuantLinear

    for layer in model.get_submodule(QWEN2_VL.decoder_layers):
        for name in QWEN2_VL.linears:
            parent, leaf = name.rsplit(".", 1)
            old = layer.get_submodule(name)
            q, scale, zero = rtn_quantize(old.weight.data.float().cpu(), spec)  # packing runs on the CPU
            w = QuantizedWeight(q, scale, zero, default_g_idx(old.in_features, spec), spec)
            new = QuantLinear.from_weight(w, fmt, old.bias.data if old.bias is not None else None)
            setattr(layer.get_submodule(parent), leaf, new.to(old.weight.device))
            del old


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_speed(model, input_length: int, new_tokens: int, device: str, static_cache: bool) -> tuple[float, float]:
    """-> (decode tokens/s, seconds to the first token). Decode time = time(N tokens) - time(1 token)."""
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(10, vocab, (1, input_length), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if static_cache:
        kw["cache_implementation"] = "static"
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up (kernels compiled, caches allocated)
    _sync(device)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    _sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    _sync(device)
    total = time.perf_counter() - t0
    return (new_tokens - 1) / max(total - first, 1e-9), first


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (monotone on CPU)


def published(shape: str) -> dict[tuple[str, int], tuple[float, float]]:
    if shape not in PUBLISHED_NAMES:
        return {}
    name, *labels = PUBLISHED_NAMES[shape]
    text = importlib.resources.files("qvlquant.eval").joinpath("reference/qwen2vl_speed_memory.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    variant_of = dict(zip(labels, VARIANTS))
    return {(variant_of[r["quantization"]], int(r["input_length"])): (float(r["speed_tokens_per_s"]), float(r["memory_gb"]))
            for r in rows if r["model"] == name}


def run(cfg: BenchConfig) -> list[dict]:
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    refs = published(cfg.shape)
    rows = []
    for variant in cfg.variants:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
        model = build_model(cfg.shape, cfg.device, dtype)
        if VARIANTS[variant] is not None:
            quantize_random(model, *VARIANTS[variant])
        if cfg.compile:  # a static KV cache keeps shapes fixed, so the decode step compiles (and graphs) once
            model.forward = torch.compile(model.forward, mode="reduce-overhead")
        for length in cfg.input_lengths:
            if cfg.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            speed, first = decode_speed(model, length, cfg.new_tokens, cfg.device, cfg.static_cache or cfg.compile)
            pub = refs.get((variant, length))
            rows.append(dict(shape=cfg.shape, variant=variant, input_length=length, new_tokens=cfg.new_tokens,
                             tokens_per_s=speed, first_token_s=first, peak_memory_gb=peak_memory_gb(cfg.device),
                             published_tokens_per_s=pub[0] if pub else None, published_memory_gb=pub[1] if pub else None))
        del model
    base = {r["input_length"]: r["tokens_per_s"] for r in rows if r["variant"] == "bf16"}
    for r in rows:
        r["speedup_vs_bf16"] = r["tokens_per_s"] / base[r["input_length"]] if r["input_length"] in base else None
    return rows


def format_table(rows: list[dict], device: str) -> str:
    mem = "peak GPU GB" if device.startswith("cuda") else "peak RSS GB"
    lines = [f"| variant | input | tokens/s | x bf16 | {mem} | published tokens/s | published GB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup_vs_bf16']:.2f}" if r["speedup_vs_bf16"] is not None else "-"
        pt = f"{r['published_tokens_per_s']:.2f}" if r["published_tokens_per_s"] is not None else "-"
        pm = f"{r['published_memory_gb']:.2f}" if r["published_memory_gb"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['input_length']} | {r['tokens_per_s']:.1f} | {sp} | {r['peak_memory_gb']:.2f} | {pt} | {pm} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sel = [r for r in rows if r["variant"] == variant]
        xs = [r["input_length"] for r in sel]
        axes[0].plot(xs, [r["tokens_per_s"] for r in sel], marker="o", label=variant)
        axes[1].plot(xs, [r["peak_memory_gb"] for r in sel], marker="o", label=variant)
    axes[0].set(xlabel="input length (tokens)", ylabel="decode tokens/s", title="speed")
    axes[1].set(xlabel="input length (tokens)", ylabel="peak memory (GB)", title="memory")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
