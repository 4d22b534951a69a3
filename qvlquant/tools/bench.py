"""``qvlquant bench``: decode speed and peak memory of BF16 vs quantized variants, the published protocol.

Each speed is measured ``repeats`` times (default 3) after one warm-up; rows carry the median and the min-max
range, speed-ups are ratios of medians, and one whose range overlaps BF16's is marked within the noise.

The published tables (the Qwen2-VL README's "Speed Benchmark", https://github.com/QwenLM/Qwen2-VL, shipped here as
qvlquant/eval/reference/qwen2vl_speed_memory.csv): batch 1, an input of 1 / 6144 / 14336 / 30720 tokens, 2048
generated tokens, tokens/s and peak GPU memory. Speed and memory do not depend on weight values, so a
model of the real architecture is built from its config with random weights and its decoder linears are quantized
RTN-style into the real packed formats (QuantLinear, which runs the Triton kernel on CUDA). On CPU a scaled-down
protocol (the demo's shape, short inputs, a few tokens) exercises the same code path.

The vision tower is the released one (32 blocks, 1280 wide, about 0.68 B parameters, kept in bf16 as in the
published checkpoints), so peak memory counts it as the published figures do. Each input of length L >= 16 is an
image plus text, as published: one image of about 99 % of L tokens (a near-square grid of merged 28x28 patches, random
pixels) between <|vision_start|> and <|vision_end|>, the rest text; shorter inputs are text only.

``bnb-nf4`` / ``bnb-int8`` are the no-calibration baseline: the demo checkpoint loaded through transformers'
``BitsAndBytesConfig`` (qvlquant.runtime.bnb; the demo shape only, as they need real weights on disk to load).

Peak memory is measured per variant and input length, never the process-wide maximum that only grows: on CUDA the
allocator's peak is reset (``torch.cuda.reset_peak_memory_stats``) before each variant is built and before each
input length; on the CPU (Linux) the kernel's resident high-water mark (VmHWM) is reset the same way, by writing 5
to /proc/self/clear_refs, so the figure is the peak RSS since then: the model and that run, plus the ~0.5 GiB of
Python, torch and transformers the process holds. (A fresh process per variant does not serve: Linux carries
ru_maxrss, and the child's copy of the parent's RSS at fork, across exec.) Where the reset is refused, rows say
``peak_memory_scope: process``.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import importlib.resources
import math
import pathlib
import resource
import textwrap
import time

import torch

from qvlquant.families import QWEN2_VL
from qvlquant.quant.formats import PackFormat, QuantizedWeight
from qvlquant.quant.rtn import default_g_idx, rtn_quantize
from qvlquant.quant.spec import QuantSpec
from qvlquant.runtime.bnb import BNB_KINDS, load_bnb
from qvlquant.runtime.load import QuantLinear
from qvlquant.ui.progress import progress

SHAPES = {  # text configs of the released checkpoints
    "qwen2-vl-2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "demo": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2008, tie_word_embeddings=True),
}
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu", patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2)
VISION = {"qwen2-vl-2b": QWEN2_VL_VISION, "qwen2-vl-7b": QWEN2_VL_VISION,  # the demo's tower: qvlquant/assets/demo
          "demo": dict(depth=2, embed_dim=128, num_heads=4, mlp_ratio=2, hidden_act="quick_gelu", patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2)}
TOKEN_IDS = {"qwen2-vl-2b": dict(vision_start_token_id=151652, vision_end_token_id=151653, image_token_id=151655,
                                 video_token_id=151656),
             "demo": dict(vision_start_token_id=3, vision_end_token_id=4, image_token_id=5, video_token_id=6)}
TOKEN_IDS["qwen2-vl-7b"] = TOKEN_IDS["qwen2-vl-2b"]
MIN_IMAGE_INPUT = 16  # inputs shorter than this are text only (input length 1 is a single text token, as published)
VARIANTS = {
    "bf16": None,
    "gptq-int8": (PackFormat.GPTQ, QuantSpec(8, 128, True)),
    "gptq-int4": (PackFormat.GPTQ, QuantSpec(4, 128, True)),
    "awq": (PackFormat.AWQ_GEMM, QuantSpec(4, 128, False)),
}
BENCH_VARIANTS = (*VARIANTS, *BNB_KINDS)  # what --variants accepts
PUBLISHED_NAMES = {"qwen2-vl-2b": ("Qwen2-VL-2B-Instruct", "BF16", "GPTQ-Int8", "GPTQ-Int4", "AWQ"),
                   "qwen2-vl-7b": ("Qwen2-VL-7B-Instruct", "BF16", "GPTQ-Int8", "GPTQ-Int4", "AWQ")}


def decoder_linears(shape: str) -> dict[str, tuple[int, int]]:
    """(in_features K, out_features N) of each kind of decoder linear of a shape, from its text config: what the
    kernel benchmark and the compile report run."""
    c = SHAPES[shape]
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]  # key/value heads times head_dim
    return {"q/o_proj": (h, h), "k/v_proj": (h, kv), "gate/up_proj": (h, inter), "down_proj": (inter, h)}


def check_variants(variants: tuple[str, ...], shape: str = "demo") -> None:
    unknown = [v for v in variants if v not in BENCH_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(BENCH_VARIANTS)}")
    bnb = [v for v in variants if v in BNB_KINDS]
    if bnb and shape != "demo":
        raise ValueError(f"variant {bnb[0]} loads the demo checkpoint through bitsandbytes: --shape demo only "
                         f"(random weights of {shape} are never on disk to load)")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One ``bench`` run, checked when it is made."""

    shape: str = "demo"
    variants: tuple[str, ...] = ("bf16", "gptq-int4", "awq", "gptq-int8")
    input_lengths: tuple[int, ...] = (1, 32)
    new_tokens: int = 8
    device: str = "cpu"
    static_cache: bool = False
    compile: bool = False  # torch.compile the forward ("reduce-overhead": CUDA graphs on a GPU); implies static_cache
    repeats: int = 3  # timed generates per variant and input length: the median and the min-max range are reported

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown --shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        check_variants(self.variants, self.shape)
        if not self.input_lengths or min(self.input_lengths) < 1:
            raise ValueError(f"input lengths must be positive token counts, got {self.input_lengths}")
        if self.new_tokens < 2:  # decode speed is time(N tokens) - time(1 token): one token measures nothing
            raise ValueError(f"new_tokens must be at least 2, got {self.new_tokens}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")


def build_model(shape: str, device: str, dtype: torch.dtype):
    """A Qwen2-VL of the given shape with random weights, built directly on ``device``."""
    from transformers import (  # heavy: only once a model is built
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    if shape not in SHAPES:
        raise ValueError(f"unknown --shape {shape!r}; choose one of {', '.join(SHAPES)}")
    text = dict(SHAPES[shape], bos_token_id=0, eos_token_id=1, pad_token_id=0)
    tie = text.pop("tie_word_embeddings")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # Qwen2-VL's [16, 24, 24] at head_dim 128
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    vision = dict(VISION[shape], hidden_size=text["hidden_size"])
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **TOKEN_IDS[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(dtype)
    return model.eval()


@torch.no_grad()
def quantize_random(model, fmt: PackFormat, spec: QuantSpec) -> None:
    """Replace every decoder linear by a QuantLinear holding the RTN codes of its (random) weight."""
    for layer in model.get_submodule(QWEN2_VL.decoder_layers):
        for name in QWEN2_VL.linears:
            parent, leaf = name.rsplit(".", 1)
            old = layer.get_submodule(name)
            if old.weight.is_meta:  # sizes only (--weights-only): packed buffers of the right shapes, no data
                with torch.device("meta"):
                    new = QuantLinear(old.in_features, old.out_features, spec, fmt, old.bias is not None, old.weight.dtype)
                setattr(layer.get_submodule(parent), leaf, new)
                continue
            # rounding on the model's device (a GPU does 7B in seconds), packing on the CPU
            q, scale, zero = (t.cpu() for t in rtn_quantize(old.weight.data.float(), spec))
            w = QuantizedWeight(q, scale, zero, default_g_idx(old.in_features, spec), spec)
            new = QuantLinear.from_weight(w, fmt, old.bias.data if old.bias is not None else None)
            setattr(layer.get_submodule(parent), leaf, new.to(old.weight.device))
            del old


def variant_model(shape: str, variant: str, device: str, dtype: torch.dtype):
    """The model a variant measures: random weights of ``shape`` quantized RTN-style into the variant's packed
    format (none for bf16); a bnb-* variant: the demo checkpoint loaded through bitsandbytes."""
    if variant in BNB_KINDS:
        return load_bnb(variant, "demo", "cpu" if device == "meta" else device, dtype)[0]
    model = build_model(shape, device, dtype)
    if VARIANTS[variant] is not None:
        quantize_random(model, *VARIANTS[variant])
    return model


def image_grid(input_length: int) -> tuple[int, int] | None:
    """(rows, cols) of merged image tokens for an input of ``input_length`` tokens, or None for text only: a
    near-square grid of about 99 % of the input, leaving room for <|vision_start|>, <|vision_end|> and the text."""
    if input_length < MIN_IMAGE_INPUT:
        return None
    budget = input_length - 2 - max(1, input_length // 100)
    rows = math.isqrt(budget)
    return rows, budget // rows


def prefill_inputs(model, input_length: int, device: str) -> dict[str, torch.Tensor]:
    """Exactly ``input_length`` tokens for ``generate``: random text ids, with one image (random pixels, patches as
    the Qwen2-VL processor lays them out) when the input is long enough."""
    cfg, vcfg = model.config, model.config.vision_config
    special = {cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.text_config.vocab_size, (1, input_length), generator=gen)
    for t in special:  # random text never contains the vision markers
        ids[ids == t] = 10
    grid = image_grid(input_length)
    if grid is None:
        return {"input_ids": ids.to(device)}
    rows, cols = grid
    n_image = rows * cols
    text = input_length - 2 - n_image
    start = text // 2  # text before and after the image, as in "<question> <image> <instruction>"
    ids[0, start] = cfg.vision_start_token_id
    ids[0, start + 1:start + 1 + n_image] = cfg.image_token_id
    ids[0, start + 1 + n_image] = cfg.vision_end_token_id
    merge = vcfg.spatial_merge_size
    thw = torch.tensor([[1, rows * merge, cols * merge]])
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    pixels = torch.randn(int(thw.prod()), patch_dim, generator=gen)
    dtype = next(model.model.visual.parameters()).dtype
    return {"input_ids": ids.to(device), "mm_token_type_ids": (ids == cfg.image_token_id).long().to(device),
            "pixel_values": pixels.to(device, dtype), "image_grid_thw": thw.to(device)}


def model_gb(model) -> float:
    """Bytes held by the model's parameters and buffers (packed codes included), in GiB: the floor of peak memory."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # tied embeddings counted once
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30


def weights_table(shape: str, variants: tuple[str, ...]) -> list[dict]:
    """Bytes each variant's model holds (built on the meta device: nothing is allocated), beside the published peak
    memory at input length 1 (weights plus activations and KV cache). The floor of any run's peak; runs anywhere."""
    check_variants(variants, shape)
    refs = published(shape)
    rows = []
    for variant in variants:
        model = variant_model(shape, variant, "meta", torch.bfloat16)  # bnb-*: the demo, loaded on the CPU
        pub = refs.get((variant, 1))
        rows.append(dict(shape=shape, variant=variant, weights_gb=model_gb(model),
                         vision_gb=model_gb(model.model.visual), published_memory_gb_input_1=pub[1] if pub else None))
    return rows


def format_weights_table(shape: str, rows: list[dict]) -> str:
    """``weights_table``'s rows as a Markdown table under a title line (what ``bench --weights-only`` prints)."""
    lines = [f"{shape}: bytes held by the weights, GiB to 3 significant digits (vision tower in bf16)",
             "| variant | weights GiB | of which vision GiB | published peak GB at input 1 |", "|---|---|---|---|"]
    for r in rows:
        pub = r["published_memory_gb_input_1"]
        lines.append(f"| {r['variant']} | {r['weights_gb']:.3g} | {r['vision_gb']:.3g} | "
                     f"{'-' if pub is None else f'{pub:.2f}'} |")
    return "\n".join(lines)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TokenClock:
    """A ``generate`` streamer that notes the time each token reaches the host: ``put`` gets the prompt, then one
    token per step, already copied to the CPU (so on a GPU the step has finished)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass  # the decode's peak memory is read after generate returns: nothing to reset here


@torch.no_grad()
def decode_speed(model, input_length: int, new_tokens: int, device: str, static_cache: bool,
                 repeats: int = 1) -> list[tuple[float, float, float]]:
    """-> per timed ``generate`` of ``new_tokens`` (``repeats`` of them after one warm-up): (decode tokens/s,
    seconds to the first token, seconds of the decode). The decode is the time from the first token to the last,
    so tokens/s is (new_tokens - 1) over it, prefill excluded."""
    inputs = prefill_inputs(model, input_length, device)
    kw = dict(inputs, do_sample=False, pad_token_id=0, eos_token_id=None)
    if static_cache:
        kw["cache_implementation"] = "static"
    model.generate(max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up (kernels compiled, caches allocated)
    runs = []
    for _ in range(repeats):
        _sync(device)
        clock = TokenClock()
        t0 = time.perf_counter()
        model.generate(max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock, **kw)
        if len(clock.times) != new_tokens + 1:  # the prompt, then each new token
            raise RuntimeError(f"generate streamed {len(clock.times) - 1} tokens, {new_tokens} were asked for")
        first, last = clock.times[1], clock.times[-1]
        runs.append(((new_tokens - 1) / max(last - first, 1e-9), first - t0, last - first))
    return runs


PROC_STATUS, CLEAR_REFS = pathlib.Path("/proc/self/status"), pathlib.Path("/proc/self/clear_refs")


def reset_peak_memory(device: str) -> str:
    """Start a new peak: the CUDA allocator's, or the kernel's resident high-water mark of this process (Linux:
    5 to /proc/self/clear_refs). -> the scope the next ``peak_memory_gb`` covers: "since reset" or "process"."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return "since reset"
    try:
        CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or the kernel refuses: only the process-wide peak is left
        return "process"
    return "since reset"


def peak_memory_gb(device: str) -> float:
    """GiB: the CUDA allocator's peak, or this process's peak RSS (VmHWM), both since ``reset_peak_memory``; the
    process-wide ru_maxrss where /proc is missing."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        hwm = next(line for line in PROC_STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 2**20  # kB
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def published(shape: str) -> dict[tuple[str, int], tuple[float, float]]:
    if shape not in PUBLISHED_NAMES:
        return {}
    name, *labels = PUBLISHED_NAMES[shape]
    text = importlib.resources.files("qvlquant.eval").joinpath("reference/qwen2vl_speed_memory.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    variant_of = dict(zip(labels, VARIANTS))
    return {(variant_of[r["quantization"]], int(r["input_length"])): (float(r["speed_tokens_per_s"]), float(r["memory_gb"]))
            for r in rows if r["model"] == name}


def measure_variant(cfg: BenchConfig, variant: str) -> list[dict]:
    """The rows of one variant: every input length, on a model built for it, peak memory reset before the build
    (which counts towards the first length's peak) and before each further length."""
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    refs = published(cfg.shape)
    scope = reset_peak_memory(cfg.device)
    model = variant_model(cfg.shape, variant, cfg.device, dtype)
    weights = model_gb(model)
    if cfg.compile:  # a static KV cache keeps shapes fixed, so the decode step compiles (and graphs) once
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
    rows = []
    for i, length in enumerate(cfg.input_lengths):
        if i:
            reset_peak_memory(cfg.device)
        runs = decode_speed(model, length, cfg.new_tokens, cfg.device, cfg.static_cache or cfg.compile, cfg.repeats)
        speeds = [r[0] for r in runs]
        middle = sorted(runs)[(len(runs) - 1) // 2]  # the median run (the lower one of an even count)
        pub = refs.get((variant, length))
        rows.append(dict(shape=cfg.shape, variant=variant, input_length=length, new_tokens=cfg.new_tokens,
                         repeats=cfg.repeats, tokens_per_s=middle[0], tokens_per_s_min=min(speeds),
                         tokens_per_s_max=max(speeds), tokens_per_s_runs=speeds, first_token_s=middle[1],
                         decode_s=middle[2], weights_gb=weights,
                         peak_memory_gb=peak_memory_gb(cfg.device), peak_memory_scope=scope,
                         published_tokens_per_s=pub[0] if pub else None, published_memory_gb=pub[1] if pub else None))
    del model
    return rows


def run(cfg: BenchConfig) -> list[dict]:
    rows = []
    for variant in progress(cfg.variants, desc=f"bench {cfg.shape}", unit="variant"):
        rows += measure_variant(cfg, variant)
    compare_to_bf16(rows)
    return rows


def compare_to_bf16(rows: list[dict]) -> None:
    """Add each row's speed-up over bf16 at its input length (a ratio of medians; None without a bf16 row) and
    whether it is within the noise: its min-max range overlaps bf16's (None for bf16 itself, or with one
    repetition, which has no range to judge by)."""
    base = {r["input_length"]: r for r in rows if r["variant"] == "bf16"}
    for r in rows:
        b = base.get(r["input_length"])
        r["speedup_vs_bf16"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
        judged = b is not None and r is not b and r["repeats"] > 1
        r["speedup_within_noise"] = (r["tokens_per_s_min"] <= b["tokens_per_s_max"]
                                     and b["tokens_per_s_min"] <= r["tokens_per_s_max"]) if judged else None


def title(cfg: BenchConfig, where: str) -> str:
    """The line above the table (and the plot's title): shape, device, tokens, repetitions, units."""
    runs = (f"median of {cfg.repeats} repetitions (min-max)" if cfg.repeats > 1
            else "1 repetition (no spread: pass --repeats 3)")
    return (f"qvlquant bench: {cfg.shape} on {where}, batch 1, {cfg.new_tokens} new tokens per input "
            f"(input lengths {', '.join(map(str, cfg.input_lengths))}); tokens/s: {runs}; memory in GiB")


def _speed_cells(r: dict) -> tuple[str, str]:
    """The tokens/s cell (median, and the min-max range when repeated) and the x bf16 cell."""
    speed = f"{r['tokens_per_s']:.1f}"
    if r.get("repeats", 1) > 1:
        speed += f" ({r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f})"
    ratio = "-" if r["speedup_vs_bf16"] is None else f"{r['speedup_vs_bf16']:.2f}"
    if r.get("speedup_within_noise"):
        ratio += " (within noise)"
    return speed, ratio


def format_table(rows: list[dict], device: str) -> str:
    """Weights in MiB (so 4- and 8-bit differ visibly), peak memory per variant in GiB; published figures as
    Qwen's README states them (GB)."""
    mem = "peak GPU GiB" if device.startswith("cuda") else "peak RSS GiB"
    lines = [f"| variant | input | tokens/s | x bf16 | weights MiB | {mem} | published tokens/s | published GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed, sp = _speed_cells(r)
        pt = f"{r['published_tokens_per_s']:.2f}" if r["published_tokens_per_s"] is not None else "-"
        pm = f"{r['published_memory_gb']:.2f}" if r["published_memory_gb"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['input_length']} | {speed} | {sp} | "
                     f"{r['weights_gb'] * 1024:.1f} | {r['peak_memory_gb']:.2f} | {pt} | {pm} |")
    return "\n".join(lines)


def require_pyplot():
    """matplotlib's pyplot (headless), or a RuntimeError saying how to install it: checked before a benchmark runs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'qvlquant[plot]'") from None
    return plt


def figure(rows: list[dict], heading: str = ""):
    """Speed and peak memory as bars, one group per input length and one bar per variant (no line joins two
    lengths: the protocol measures a few, nothing in between), speed with its min-max range; both axes from 0."""
    plt = require_pyplot()
    lengths = list(dict.fromkeys(r["input_length"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, variant in enumerate(variants):
        sel = [r for r in rows if r["variant"] == variant]
        xs = [lengths.index(r["input_length"]) + (i - (len(variants) - 1) / 2) * width for r in sel]
        speed = [r["tokens_per_s"] for r in sel]
        spread = [[m - r.get("tokens_per_s_min", m) for m, r in zip(speed, sel)],
                  [r.get("tokens_per_s_max", m) - m for m, r in zip(speed, sel)]]
        axes[0].bar(xs, speed, width, yerr=spread, capsize=3, label=variant)
        axes[1].bar(xs, [r["peak_memory_gb"] for r in sel], width, label=variant)
    axes[0].set(ylabel="decode tokens/s (median, min-max)", title="speed")
    axes[1].set(ylabel="peak memory (GiB)", title="memory")
    for ax in axes:
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("input length (tokens)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the bars, not over them
    if heading:
        fig.suptitle(textwrap.fill(heading, 110), fontsize=9)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path: str, heading: str = "") -> None:
    fig = figure(rows, heading)
    fig.savefig(path, dpi=100)
    require_pyplot().close(fig)
