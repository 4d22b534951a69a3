"""The ``qvlquant`` command: quantize, eval, check, inspect, push, bench; a thin shell over the Python API
(qvlquant.api, qvlquant.evaluation, qvlquant.eval.check, qvlquant.recipes, ...).

Exit statuses, each error one line on stderr (nothing half-written is left behind):

- 0: done.
- 1: ``qvlquant check`` found a regression (``inspect``: the export fails verification).
- 2: bad input, named: a file, a flag, a model, a library's refusal (ValueError, OSError, RuntimeError).
- 3: an internal error, a fault no check foresaw: its type and message, and where to report it.
- 130: interrupted (Ctrl-C).

``--debug`` (before or after the command; or QVLQUANT_DEBUG=1) shows the full traceback instead of the line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import sys


class _TorchaoEnumNotice(logging.Filter):
    """torchao 0.18 (imported by transformers once gptqmodel's stack is installed: the interop extra) calls
    ``torch.utils._pytree.register_constant`` on its Enums at import (torchao/utils.py), and torch 2.14 logs a
    deprecation warning for each, on every command that loads a model: noise about a library qvlquant never calls.
    Only that message is dropped; everything else torch's pytree logs still shows."""

    MESSAGE = "is an Enum subclass and is now natively supported by torch.compile as an opaque value type"

    def filter(self, record: logging.LogRecord) -> bool:
        return self.MESSAGE not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnumNotice())
# OpenMP threads that wait for work sleep instead of spinning: on a loaded machine spinning threads take the CPUs
# the working ones need (demo AWQ, 2 threads at load ~4-7 on 2 cores: 171 s and over 300 s spinning, 82 s
# passive; at load ~1.5 passive cost nothing: 17.6-18.2 s against 17.9-20.4 s). Read by OpenMP when torch loads,
# so set before any import below brings torch in; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from qvlquant.assets.paths import EMBEDDED_MODELS
from qvlquant.config import (
    DEFAULT_NVFP4_SMOOTHING,
    DEFAULT_SMOOTHING,
    DTYPES,
    EXPORT_FORMATS,
    MEASURES,
    OFFLOAD,
    SEARCH_IN_ONE_PROCESS,
    JobConfig,
)
from qvlquant.eval.metrics import EVAL_TASKS
from qvlquant.parallel import launch
from qvlquant.quant.formats import CALIBRATED_SCHEMES, SCHEMES
from qvlquant.quant.spec import AWQ_ROUNDING, METHODS, RARE_EXPERTS, resolved_by_bits
from qvlquant.tools.bench import BENCH_VARIANTS, SHAPES
from qvlquant.version import __version__

EMBEDDED = ", ".join(EMBEDDED_MODELS)  # what --model names without a folder

COMMANDS = ("quantize", "eval", "inspect", "check", "push", "bench")
EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130
ISSUES = "the qvlquant issue tracker"  # pyproject.toml names no URL for it


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None: the default lives in
    qvlquant.config or is computed, and the help text says it) or the help already names it. A switch (a flag that
    takes no value) never shows one: what its dest holds when it is absent is not what it sets (``--no-desc-act``'s
    would read "default: True")."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def shown(value) -> str:
    """A default as the help writes it: 0.01, 2.4, 0, on / off, rtn."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def by_bits(values: dict[int, object]) -> str:
    """{bits: value} -> '2.4 at 2/3 bits, 0 at 4/8 bits', or the one value when every width agrees."""
    widths: dict[str, list[str]] = {}
    for bits, value in values.items():
        widths.setdefault(shown(value), []).append(str(bits))
    if len(widths) == 1:
        return next(iter(widths))
    return ", ".join(f"{value} at {'/'.join(bits)} bits" for value, bits in widths.items())


def pixels(n: int) -> str:
    """3136 -> '3136 (56x56)' (a square's side when it is one)."""
    side = math.isqrt(n)
    return f"{n} ({side}x{side})" if side * side == n else str(n)


class Parser(argparse.ArgumentParser):
    """Every qvlquant parser, subcommands included (``add_subparsers`` makes them of this class): defaults shown."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def variant_list(text: str) -> tuple[str, ...]:
    """--variants: comma-separated names of qvlquant.tools.bench.BENCH_VARIANTS (an unknown one is an error listing them)."""
    variants = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in variants if v not in BENCH_VARIANTS]
    if unknown or not variants:
        raise argparse.ArgumentTypeError(f"unknown variant {unknown[0] if unknown else text!r}; choose from "
                                         f"{', '.join(BENCH_VARIANTS)}")
    return variants


def recipe_defaults(path: str) -> dict:
    """A recipe's quantize settings (unknown keys and bad values are errors naming the file): the flags' defaults."""
    from qvlquant.recipes import load_recipe

    return dict(load_recipe(path).settings)


class RuleFlag(argparse.Action):
    """--override / --ignore: each appends a per-module rule to one list, in the order given (first match wins)."""

    def __call__(self, parser, namespace, value, option_string=None):
        rule = f"{value}:skip" if option_string == "--ignore" else value  # parsed by the job config: one-line errors
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), rule])


def add_quantize(sub) -> None:
    """Flags default to None, so a recipe can set them; the defaults the help shows are read from what
    JobConfig.from_flat applies and QuantConfig resolves per bit width (never typed twice)."""
    job = JobConfig.from_flat(output="-")  # what a run given no flags applies
    p = sub.add_parser("quantize", help="quantize a model's language layers and export the checkpoint")
    p.add_argument("--recipe", default=None, help="YAML of settings (recipes/*.yaml); flags given override it")
    p.add_argument("--model", help=f"an embedded model ({EMBEDDED}), a local folder, or a hub id (default "
                   f"{job.model})")
    p.add_argument("--scheme", choices=list(SCHEMES), help="llm-compressor's presets, no --method. Data-free (no "
                   "calibration data): FP8_BLOCK, e4m3 in 128x128 blocks as Qwen's official FP8 checkpoints (quant_method "
                   "fp8); FP8_DYNAMIC, e4m3 per output channel in compressed-tensors, llm-compressor's FP8_DYNAMIC; "
                   "both with dynamic per-token FP8 activations at serving time. W8A8: int8 per output channel "
                   "(round-to-nearest) in compressed-tensors int-quantized, llm-compressor's W8A8, with dynamic "
                   "per-token int8 activations at serving time (INT8 tensor cores: Ampere or newer). NVFP4A16: e2m1 "
                   "weights in groups of 16 with e4m3 scales (compressed-tensors nvfp4-pack-quantized), weight-only. "
                   "Calibrated (--calib: the activation scales): FP8, e4m3 per tensor with a static per-tensor "
                   "input scale; NVFP4, NVFP4A16's weights with NVFP4 activations per 16 inputs under a calibrated "
                   "input global scale (W4A4: Blackwell's FP4 matmuls). W8A8 with --method gptq and/or "
                   "--smoothing-strength: calibrated, SmoothQuant then GPTQ (or with --method rtn round-to-nearest), "
                   "the same layout. A flag the scheme does not take is an error, even at its default")
    p.add_argument("--smoothing-strength", metavar="ALPHA|auto|off", help="--scheme W8A8 (calibrated on --calib) "
                   "and NVFP4: SmoothQuant's migration strength, a number from 0 to 1 (s = max|x|^ALPHA / "
                   "max|w|^(1-ALPHA) per input channel, folded into the previous norm / linear), auto (W8A8 only: "
                   "searched per layer and smoothing group for the least int8 output error of its linears) or off; "
                   f"default for W8A8 with --method gptq: {DEFAULT_SMOOTHING} (llm-compressor's SmoothQuantModifier), "
                   f"for NVFP4: {DEFAULT_NVFP4_SMOOTHING} (FP4 activations lose far less on outlier channels)")
    _add_method_flags(p, job)
    _add_calib_flags(p, job)
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N: where each layer, its "
                   f"statistics and the math live (default {job.device.device})")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype of the layer weights (default: float32 on "
                   "the CPU, bfloat16 on a GPU; Hessians are summed in float64 and solved in float32)")
    p.add_argument("--offload", choices=list(OFFLOAD), help="where calibration activations wait between layers: "
                   f"auto (on the device when they fit), device, cpu (default {job.device.offload})")
    add_threads(p)
    p.add_argument("--nproc", type=int, metavar="N", help="start N processes on this machine (torch.distributed: "
                   "gloo on CPUs, nccl on GPUs with one GPU each), the same as torchrun --nproc-per-node N -m "
                   "qvlquant quantize ...: each runs a share of the calibration batches (default 1)")
    p.add_argument("--max-layers", type=int, metavar="N", help="stop after N decoder layers (to measure); the "
                   "partial run stays and a rerun without it finishes")
    p.add_argument("--pad-intermediate-to", type=int, metavar="M",
                   help="zero-pad the MLP intermediate size to a multiple of M for tensor parallelism "
                        "(Qwen2-VL-72B: 1024 turns 29568 into 29696)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow the modelling code shipped with the checkpoint to run (Qwen-VL-Chat only; never "
                        "passed for transformers-native models)")
    p.add_argument("--format", dest="export_format", choices=list(EXPORT_FORMATS),
                   help="auto: GPTQ layout (rtn, gptq) or AWQ GEMM (awq); compressed-tensors: vLLM's native "
                        f"format (default {job.export.format})")
    p.add_argument("--override", dest="cli_rules", action=RuleFlag, metavar="PATTERN:KEY=VALUE,...",
                   help="other settings for the linears whose runtime name matches the regex PATTERN (searched, "
                        "e.g. 'mlp.down_proj:bits=8' or 'layers\\.(0|27)\\.:bits=8,group_size=64'); keys: bits, "
                        "group_size, sym, method (rtn / gptq). Repeatable; with --ignore, the first matching rule "
                        "wins, in the order given, before a recipe's rules")
    p.add_argument("--ignore", dest="cli_rules", action=RuleFlag, metavar="PATTERN",
                   help="keep the linears whose runtime name matches the regex PATTERN in the checkpoint's dtype "
                        "(e.g. 'layers\\.0\\.mlp'); repeatable")
    _add_search_flags(p, job)
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="delete a partial run of this output (.OUTPUT.partial) and start over instead of resuming")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --output that is "
                   "not a qvlquant export (never the base model or the calibration data)")
    p.add_argument("--output", required=True, help="output folder; an earlier qvlquant export there is replaced "
                   "atomically, anything else only with --overwrite")


def _add_method_flags(p, job: JobConfig) -> None:
    """The method's flags; per-width defaults as QuantConfig resolves them at each of the --bits choices."""
    widths = [2, 3, 4, 8]
    gptq = JobConfig.from_flat(output="-", method="gptq").quant
    sym = {m: JobConfig.from_flat(output="-", method=m).quant.spec.sym for m in METHODS}

    def gptq_by(name: str, **given) -> str:
        return by_bits(resolved_by_bits("gptq", name, widths, **given))

    static, static_given = gptq_by("static_groups"), gptq_by("static_groups", desc_act=True)
    p.add_argument("--method", choices=list(METHODS), help=f"default {job.quant.method}")
    p.add_argument("--bits", type=int, choices=widths, help=f"default {job.quant.spec.bits}")
    p.add_argument("--group-size", type=int, help="input columns per scale; -1 for per-channel (default "
                   f"{job.quant.spec.group_size})")
    p.add_argument("--sym", dest="sym", action="store_true", default=None,
                   help=f"symmetric (default for {'/'.join(m for m in METHODS if sym[m])})")
    p.add_argument("--asym", dest="sym", action="store_false", default=None,
                   help=f"asymmetric, with zero points (default for {'/'.join(m for m in METHODS if not sym[m])})")
    p.add_argument("--damp-percent", type=float, help=f"GPTQ: Hessian damping, doubled on Cholesky failure up to "
                   f"{shown(gptq.damp_max)} (default {shown(gptq.damp_percent)})")
    p.add_argument("--desc-act", action="store_true", default=None, help="GPTQ: act-order, columns by decreasing "
                   f"Hessian diagonal (default: {gptq_by('desc_act')}, with static groups {static}); given alone, "
                   f"--desc-act turns static groups {static_given} (off means a permuted g_idx, which vLLM refuses)")
    p.add_argument("--no-desc-act", dest="desc_act", action="store_false", default=None,
                   help="GPTQ: columns in their own order")
    p.add_argument("--static-groups", action="store_true", default=None, help="GPTQ: group parameters fixed "
                   f"before act-order (default: {static} with the default act-order, {static_given} with --desc-act)")
    p.add_argument("--no-static-groups", dest="static_groups", action="store_false", default=None,
                   help="GPTQ: group parameters from the updated columns as each group starts")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false", default=None,
                   help="GPTQ: all Hessians from the unquantized layer instead of group by group (true-sequential: "
                        f"{shown(gptq.true_sequential)} by default)")
    p.add_argument("--mse", type=float, metavar="P", help="GPTQ: shrink each group's range to minimise "
                   "|w - Q(w)|^P (GPTQModel's mse; 0: min-max); default for gptq: "
                   f"{gptq_by('mse')}; for awq with --awq-rounding gptq: "
                   f"{by_bits(resolved_by_bits('awq', 'mse', widths, awq_rounding='gptq'))}")
    p.add_argument("--vision-weight", type=float, metavar="W", help="GPTQ: weight of image / video tokens in the "
                   f"Hessian, VLMQ-style (default {shown(gptq.vision_weight)}; 1 weighs them like text tokens)")
    p.add_argument("--min-expert-tokens", type=int, metavar="N", help="GPTQ / AWQ, MoE models: an expert the router sent "
                   "fewer calibration tokens is handled as --rare-experts says, and named in the report (default "
                   f"{shown(gptq.min_expert_tokens)}: only the experts no token reached)")
    p.add_argument("--rare-experts", choices=list(RARE_EXPERTS), help="GPTQ / AWQ, MoE models: such an expert is "
                   "rounded to nearest (rtn) or calibrated on every token of its layer (all_tokens; its output still "
                   f"only for its routed tokens); default {gptq.rare_experts}")
    p.add_argument("--awq-rounding", choices=list(AWQ_ROUNDING), help="AWQ: rtn (AWQ's clipping search and "
                   "round-to-nearest) or gptq (GPTQ rounds the AWQ-scaled layer); default: "
                   f"{by_bits(resolved_by_bits('awq', 'awq_rounding', widths))}")


def _add_search_flags(p, job: JobConfig) -> None:
    """The sensitivity search: its result is rules (written to the export as mixed_precision.yaml)."""
    search = job.search
    p.add_argument("--target-bits", type=float, metavar="B", help="choose a width per linear group (q/k/v, o, "
                   "gate/up, down of each layer) from --candidate-bits so that the measured error is least at B bits "
                   "per weight on average over the decoder linears, scales and zeros included (as the printed plan "
                   "counts them); the choice becomes rules, run like --override, and is written beside the weights "
                   "as mixed_precision.yaml for --recipe. Linears your own --override / --ignore / recipe rules "
                   "match keep those rules and count at their size. Not for the AWQ GEMM format (one width)")
    p.add_argument("--candidate-bits", metavar="B,B,...", help="widths the search may give a linear group, at the "
                   "job's group size and sym; 16 keeps it in the checkpoint's dtype; vLLM 0.33 serves GPTQ at 4 and 8 bits, not "
                   "3: 4,8,16 for an export it loads (default "
                   f"{','.join(map(str, search.candidate_bits))})")
    p.add_argument("--sensitivity", choices=list(MEASURES), help="what the search measures per candidate: layer, "
                   "the decoder layer's output with that group rounded (one replay per candidate); output, the "
                   "linears' own output error tr(dW H dW^T) from GPTQ's Hessian (faster) (default "
                   f"{search.measure})")


def _add_calib_flags(p, job: JobConfig) -> None:
    """Which calibration samples and how they become batches."""
    calib, proc, columns = job.calib, job.processing, dict(job.calib.columns)
    p.add_argument("--calib", help="'demo', 'easyvqa', a .json/.jsonl file (chat or sharegpt), an image folder "
                   "with captions, or hf:PATH_OR_ID (default: the demo's chats for the embedded models and for rtn; "
                   "required for gptq and awq on any other model)")
    p.add_argument("--num-samples", type=int, help=f"default {calib.num_samples}")
    p.add_argument("--split", help=f"hf: datasets: the split to read (default {calib.split})")
    for col in ("image", "question", "answer", "text"):
        default = f" (default {columns[col]})" if columns[col] else ""
        p.add_argument(f"--{col}-column", help=f"hf: datasets: the {col} column{default}")
    p.add_argument("--batch-size", type=int, help=f"calibration samples per forward (default {proc.batch_size})")
    p.add_argument("--max-length", type=int, help="tokens per sample; longer samples are errors (default "
                   f"{proc.max_length})")
    p.add_argument("--min-pixels", type=int, help=f"default {pixels(proc.min_pixels)}")
    p.add_argument("--max-pixels", type=int, help=f"default {pixels(proc.max_pixels)}")
    p.add_argument("--allow-urls", action="store_true", default=None, help="fetch http(s) images (timeout, 32 MB "
                   f"cap, private addresses refused); {shown(proc.allow_urls)} by default")
    p.add_argument("--seed", type=int, help=f"which samples are drawn (default {calib.seed})")


def run_quantize(args) -> int:
    from qvlquant.api import (
        quantize,  # transformers: each command imports its heavy modules when it runs
    )

    settings = {k: v for k, v in vars(args).items()
                if k not in ("command", "recipe", "nproc", "argv", "debug", "cli_rules")}
    settings["rules"] = [*(args.cli_rules or []), *(settings.get("rules") or [])]  # the flags' before the recipe's
    if args.nproc is not None and args.nproc != 1:
        config = JobConfig.from_flat(**settings)  # its checks and the batch count, before any process starts
        if config.search.active:
            raise ValueError(SEARCH_IN_ONE_PROCESS)
        if config.scheme is not None:
            raise ValueError(f"scheme {config.scheme} runs in one process (data-free: as fast as the checkpoint "
                             "reads; calibrated: one forward pass, one decoder layer at a time); drop --nproc")
        launch.check_batches(-(-config.calib.num_samples // config.processing.batch_size), args.nproc)
        return launch.run_ranks(args.nproc, [sys.executable, "-m", "qvlquant", *launch.without_option(args.argv, "--nproc")])
    report = quantize(JobConfig.from_flat(**settings))
    if report is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return 0
    if report.get("scheme") and report.get("complete", True):  # FP8 / INT8 W8A8 / NVFP4, data-free or calibrated
        how = "data-free" if report["scheme"] not in CALIBRATED_SCHEMES else \
            f"activation scales from {report['calibration']['tokens']} calibration tokens"
        if "smoothing" in report and "rounding" in report:  # calibrated W8A8
            how = (f"SmoothQuant {report['smoothing']['strength']} and {report['rounding']} on "
                   f"{report['calibration']['tokens']} calibration tokens")
        elif "smoothing" in report:  # NVFP4 (W4A4)
            how = f"SmoothQuant {report['smoothing']['strength']}, {how}"
        print(f"quantized {len(report['layers'])} linears ({report['scheme']}, {how}) in "
              f"{report['total_seconds']:.1f}s, peak RSS {report['peak_rss_gib']:.2f} GiB -> {args.output}")
        return 0
    if not report["complete"]:  # --max-layers
        of = f" of {report['estimate']['layers']}" if report.get("estimate") else ""  # calibrated W8A8: none
        print(f"quantized {len(report['layer_seconds'])}{of} layers "
              f"in {report['quantize_seconds']:.1f}s, peak RSS {report['peak_rss_gib']:.2f} GiB (stopped early)")
        return 0
    mixed = report.get("mixed_precision")
    setting = (f"{report['method']} mixed, {mixed['bits_per_weight']:.3f} bits per weight" if mixed else
               f"{report['method']} W{report['bits']} g{report['group_size']}")
    print(f"quantized {len(report['layers'])} linears ({setting}) in {report['quantize_seconds']:.1f}s, peak RSS "
          f"{report['peak_rss_gib']:.2f} GiB -> {args.output}"
          + (f" (the search's plan: {args.output}/{mixed['recipe']})" if mixed else ""))
    experts = report.get("experts")
    if experts:
        fewer = report['config']['quant']['min_expert_tokens']
        said = [f"{len(names)} linears of experts with fewer than {fewer} {how} (e.g. {names[0]})"
                for names, how in ((experts["rounded_to_nearest"], "rounded to nearest"),
                                   (experts.get("calibrated_on_all_tokens", []), "calibrated on all tokens")) if names]
        print(f"experts: {experts['fewest_tokens']} to {experts['most_tokens']} calibration tokens each"
              + (f"; {'; '.join(said)}; all in quantize_report.json 'experts'" if said else ""))
    return 0


def restore_stranded_export(command: str, *paths: str | None) -> None:
    """Before a command reads an export: put back the previous one a quantize killed between the two renames of its
    publish left in ``.NAME.old-PID`` (the same step quantize takes), saying so."""
    from qvlquant.storage.outputs import restore_stranded

    for path in filter(None, paths):
        restored = restore_stranded(path)
        if restored:
            print(f"qvlquant {command}: restored {pathlib.Path(path).expanduser().resolve()} from {restored}, where "
                  "a quantize killed while publishing left it", file=sys.stderr)


def add_eval(sub) -> None:
    about = ("task accuracy (the embedded easy-vqa, or a VLMEvalKit TSV / hf: benchmark) and held-out perplexity of "
             "a checkpoint, beside its base model; bnb-nf4 / bnb-int8 load a base through bitsandbytes")
    p = sub.add_parser("eval", help=about, description=about[0].upper() + about[1:] + ".")
    p.add_argument("--model", default="demo", help=f"a checkpoint folder (quantized or not), an embedded model "
                   f"({EMBEDDED}), a hub id, or bnb-nf4:BASE / bnb-int8:BASE (BASE loaded through transformers' "
                   "BitsAndBytesConfig)")
    p.add_argument("--base", default=None, help="model to compare with (default: the base recorded at quantization; "
                   "'none' to skip)")
    p.add_argument("--task", default="easyvqa", choices=list(EVAL_TASKS), help="what to score")
    p.add_argument("--data", default=None, help="the task's questions: a VLMEvalKit TSV, or hf:PATH_OR_ID (columns "
                   "image, question, answer, A, B, ...); all tasks but the embedded easyvqa")
    p.add_argument("--split", default="test", help="hf: datasets: the split")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="vllm: generate on vLLM with --tensor-parallel GPUs (TSV / hf: tasks)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="vllm: GPUs to shard the model over")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per answer (TSV / hf: tasks; "
                   "easy-vqa answers are one word)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N test questions (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="questions per generate call")
    p.add_argument("--no-perplexity", action="store_true", help="skip the held-out perplexity")
    p.add_argument("--report", default=None, help="write the JSON summary here (per-sample outputs beside it)")


def eval_config(args):
    """The eval flags as a qvlquant.evaluation.EvalConfig (validated there)."""
    from qvlquant.evaluation import (
        EvalConfig,  # torch and transformers: imported when the command runs
    )

    return EvalConfig(task=args.task, data=args.data, split=args.split, backend=args.backend,
                      tensor_parallel=args.tensor_parallel, max_new_tokens=args.max_new_tokens, limit=args.limit,
                      batch_size=args.batch_size, perplexity=not args.no_perplexity)


def run_eval(args) -> int:
    from qvlquant.evaluation import (
        evaluate_with_baseline,
        format_table,
        published_figures,
        recorded_base,
        write_report,
    )

    restore_stranded_export("eval", args.model, None if args.base == "none" else args.base)
    config = eval_config(args)
    base = args.base if args.base is not None else recorded_base(args.model)
    result = evaluate_with_baseline(args.model, config, base=base)
    baseline = result.summary.get("baseline")
    print(format_table([baseline, result.summary] if baseline else [result.summary]))
    published = published_figures(base or args.model, args.task)
    if published:
        print(published)
    if args.report:
        write_report(result, args.report)
    return 0


def add_check(sub) -> None:
    about = ("CI gate: exit 1 when an eval report regresses against its baseline (2 for bad input: an unreadable "
             "report or recipe, an unknown task, a negative tolerance)")
    p = sub.add_parser("check", help=about, description=about + ".")
    p.add_argument("report", help="eval JSON of the quantized model (from qvlquant eval --report)")
    p.add_argument("--baseline", default=None, help="eval JSON of the baseline (default: the one embedded in report)")
    p.add_argument("--max-drop", action="append", default=[], metavar="TASK=POINTS",
                   help="accuracy points TASK may lose (default 1.0); repeatable; TASK must be in the report")
    p.add_argument("--max-ppl-increase", type=float, default=None, metavar="PERCENT", help="default 2.0")
    p.add_argument("--recipe", default=None, help="take tolerances from the recipe's check: section "
                   "(max_drop: {task: points}, max_ppl_increase: percent; tasks the report lacks are ignored); "
                   "flags override it")


def run_check(args) -> int:
    from qvlquant.eval.check import check, format_rows, parse_max_drop, tolerance
    from qvlquant.recipes import check_tolerances

    ppl = None if args.max_ppl_increase is None else tolerance(args.max_ppl_increase, "--max-ppl-increase")
    flags = parse_max_drop(args.max_drop)
    result = check(args.report, args.baseline, check_tolerances(args.recipe, flags, ppl), named=flags)
    print(format_rows(result.rows))
    for warning in result.warnings:
        print(f"qvlquant check: warning: {warning}", file=sys.stderr)
    print(f"check: {'FAILED: ' + ', '.join(result.failed) if result.failed else 'passed'}")
    return 0 if result.passed else EXIT_REGRESSION


def add_push(sub) -> None:
    about = ("upload a verified export to the Hugging Face hub in one commit, its model card regenerated for the "
             "repo (with the eval table when --eval is given)")
    p = sub.add_parser("push", help=about, description=about[0].upper() + about[1:] + ".")
    p.add_argument("model", help="export folder written by qvlquant quantize")
    p.add_argument("--repo", required=True, help="owner/name on the hub (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                   "visibility)")
    p.add_argument("--revision", default=None, help="branch to commit to (created if needed; default main)")
    p.add_argument("--eval", default=None, help="eval JSON from qvlquant eval, for the model card's table")
    p.add_argument("--dry-run", action="store_true", help="list what would be sent, send nothing")


def run_push(args) -> int:
    from qvlquant.checkpoint.push import PushError, push

    restore_stranded_export("push", args.model)
    try:
        plan = push(args.model, args.repo, args.private, args.revision, args.dry_run, args.eval)
    except PushError as e:
        raise RuntimeError(str(e)) from None
    verb = "would push" if plan["dry_run"] else "pushed"
    print(f"{verb} {len(plan['files'])} files to {plan['repo']}@{plan['revision']} in one commit:")
    for name in plan["files"]:
        print(f"  {name}")
    return 0


def add_bench(sub) -> None:
    about = ("decode tokens/s and peak memory per variant (BF16, GPTQ, AWQ on random weights of a real shape; "
             "bitsandbytes on the demo), beside the published tables")
    p = sub.add_parser("bench", help=about, description=about[0].upper() + about[1:] + ".")
    p.add_argument("--shape", default="demo", choices=list(SHAPES), help="qwen2-vl-2b / qwen2-vl-7b: random "
                   "weights of the real shapes, for a GPU; demo: the scaled-down CPU protocol")
    p.add_argument("--variants", type=variant_list, default="bf16,gptq-int4,awq,gptq-int8",
                   metavar="V,V,...", help=f"comma-separated, from: {', '.join(BENCH_VARIANTS)} (bnb-*: "
                   "bitsandbytes, the demo shape only)")
    p.add_argument("--input-lengths", default=None, help="default 1,6144,14336,30720 on CUDA, 1,32 on CPU")
    p.add_argument("--new-tokens", type=int, default=None, help="default 2048 on CUDA, 8 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--static-cache", action="store_true", help="generate with a static KV cache")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on a GPU); "
                   "implies --static-cache")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant and input length: the table "
                   "shows their median and min-max, and marks a speed-up within the noise when the ranges overlap")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--plot", default=None, help="write tokens/s and memory per input length here (PNG; needs "
                   "matplotlib: pip install 'qvlquant[plot]')")
    p.add_argument("--weights-only", action="store_true", help="only the bytes each variant's weights hold (built on "
                   "the meta device, any machine, seconds), beside the published peak memory at input length 1")


def run_bench(args) -> int:
    import torch

    from qvlquant.tools.bench import (
        BenchConfig,
        format_table,
        format_weights_table,
        plot,
        require_pyplot,
        run,
        title,
        weights_table,
    )

    if args.plot:
        require_pyplot()  # before the benchmark runs, not after it

    if args.weights_only:
        rows = weights_table(args.shape, args.variants)
        print(format_weights_table(args.shape, rows))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    lengths = args.input_lengths or ("1,6144,14336,30720" if gpu else "1,32")
    try:
        input_lengths = tuple(int(v) for v in lengths.split(","))
    except ValueError:
        raise ValueError(f"--input-lengths {lengths!r}: expected comma-separated integers") from None
    cfg = BenchConfig(args.shape, args.variants, input_lengths,
                      args.new_tokens or (2048 if gpu else 8), device, args.static_cache, args.compile,
                      args.repeats)
    rows = run(cfg)
    where = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    heading = title(cfg, where)
    print(heading)
    print(format_table(rows, device))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"device": where, "config": dataclasses.asdict(cfg), "rows": rows}, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot, heading)
    return 0


def add_inspect(sub) -> None:
    about = "what a quantized checkpoint is, whether it verifies, and whether vLLM / transformers load it right"
    p = sub.add_parser("inspect", help=about, description=about[0].upper() + about[1:] + ". Exit status 1 when "
                       "the export fails verification, transformers 5 would replace its vision tower, or vLLM would "
                       "refuse or mis-load it at tensor-parallel 1 (larger tensor-parallel sizes are reported only).")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--repair", action="store_true", help="rewrite modules_to_not_convert so the vision tower stays "
                   "unquantized in transformers 5")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run_inspect(args) -> int:
    from qvlquant.checkpoint.inspection import inspect_checkpoint
    from qvlquant.checkpoint.repair import repair_config

    restore_stranded_export("inspect", args.model)
    if args.repair:
        names = repair_config(args.model)
        print(f"repaired {args.model}: modules_to_not_convert = {names}")
    report = inspect_checkpoint(args.model)
    verified = report["verification"]
    failed = verified["status"] == "failed"
    misdescribed = {s: n for s, n in report["module_settings"].items() if " but held " in s}
    broken = failed or report["vision_exposed_in_transformers"] or bool(report["marlin"].get(1)) or misdescribed
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_REGRESSION if broken else 0
    print(f"{report['folder']}: {report['model_type']}, {describe_quantization(report['quantization'])}")
    if failed:
        print(f"  FAILED verification: {verified['error']}. What follows describes the files as they are now, not as "
              "exported. Re-export the model (or restore the files).")
    else:
        print(f"  manifest: {verified['files']} files verified" if verified["status"] == "verified"
              else "  manifest: none (not a qvlquant export; nothing to verify)")
    print(f"  {report['quantized_linears']} quantized linears, {report['unquantized_linears']} unquantized "
          f"({report['vision_linears']} in the vision tower)")
    if len(report["module_settings"]) > 1:  # a mixed checkpoint: how many decoder linears have each setting
        print("  decoder linears: " + ", ".join(f"{n} {s}" for s, n in report["module_settings"].items()))
    if misdescribed:
        print(f"  PROBLEM: config.json does not describe {sum(misdescribed.values())} decoder linears as the "
              "checkpoint holds them (see above): every loader would read them wrongly. Re-export the model.")
    exposed = report["vision_exposed_in_transformers"]
    if exposed:
        print(f"  PROBLEM: transformers 5 would replace {len(exposed)} vision linears (e.g. {exposed[0]}) with "
              "randomly initialised quantized modules: modules_to_not_convert does not match their names. "
              "Fix: qvlquant inspect --repair")
    else:
        print("  vision tower: stays full precision in transformers 5")
    if report["vllm"]:
        print(f"  vLLM: judged by {report['vllm']['checked_by']}")
        methods = {m for v, m in report["vllm"].get("layers", {}).items() if not v.startswith("visual.")}
        if methods:  # {vLLM layer: its quantization method (and compressed-tensors scheme)}, the language model's
            print(f"  vLLM methods (language model): {', '.join(sorted(methods))}")
        at_tp1 = report["vllm"].get("kernels", {}).get(1) or {}  # {vLLM layer: kernel class}
        if at_tp1:
            print(f"  vLLM kernels at tensor-parallel 1: {', '.join(sorted(set(at_tp1.values())))}")
    for tp, problems in report["marlin"].items():
        status = "ok" if not problems else f"{len(problems)} problem(s), e.g. {problems[0]}"
        print(f"  vLLM at tensor-parallel {tp}: {status}")
    if failed:
        print(f"qvlquant inspect: error: {args.model} fails verification against its manifest", file=sys.stderr)
    elif broken:
        print(f"qvlquant inspect: error: {args.model} would load wrongly or be refused (see PROBLEM / tensor-parallel "
              "1 above)", file=sys.stderr)
    return EXIT_REGRESSION if broken else 0


def describe_quantization(q: dict) -> str:
    """``inspect``'s one-line summary of the report's quantization: method, width, group, symmetry, act-order."""
    if not q:
        return "not quantized"
    group = "per-channel" if q.get("group_size") == -1 else f"group {q.get('group_size')}"
    sym = "symmetric" if q.get("sym") else "asymmetric (zero points)"
    act = ", act-order (g_idx)" if q.get("desc_act") else ""
    mixed = f"; mixed precision: {q['mixed']}" if q.get("mixed") else ""
    return f"{q.get('quant_method')} ({q.get('format')}) W{q.get('bits')}, {group}, {sym}{act}{mixed}"


def add_threads(p) -> None:
    """--threads, taken by every subcommand."""
    p.add_argument("--threads", type=int, help="CPU threads per process (default: the CPU quota's share of each "
                   "process, cut to the CPUs the load average leaves idle; OMP_NUM_THREADS when set)")


def main(argv=None) -> int:
    """Run one command; -> its exit status (the module docstring lists them). Never a traceback, unless --debug
    (or QVLQUANT_DEBUG=1) asks for one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("QVLQUANT_DEBUG") == "1" or "--debug" in argv  # before the arguments are parsed
    who = " ".join(["qvlquant"] + [a for a in argv if a in COMMANDS][:1])  # "qvlquant check"
    try:
        return _main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{who}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, RuntimeError) as e:  # bad input: a file, a flag, a model, a library's refusal
        if debug:
            raise
        print(f"{who}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a fault no check foresaw: said in one line, with where to report it
        if debug:
            raise
        print(f"{who}: internal error: {type(e).__name__}: {one_line(e)} (please report it at "
              f"{ISSUES}, with --debug output)", file=sys.stderr)
        return EXIT_INTERNAL


def one_line(e: BaseException, limit: int = 2000) -> str:
    """An exception's text on one line, cut at ``limit`` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def build_parser() -> tuple[argparse.ArgumentParser, argparse.Action]:
    """The parser and its subcommands' action (whose parsers a recipe sets defaults on)."""
    parser = Parser(prog="qvlquant", description="Quantize Qwen vision-language models (RTN, GPTQ, AWQ) into "
                    "checkpoints transformers and vLLM load; evaluate, gate, inspect, push and benchmark them.")
    parser.add_argument("--version", action="version", version=f"qvlquant {__version__}")
    add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_quantize(sub)
    add_eval(sub)
    add_inspect(sub)
    add_check(sub)
    add_push(sub)
    add_bench(sub)
    for name, p in sub.choices.items():
        if name != "quantize":  # quantize adds it beside its other device flags
            add_threads(p)
        add_debug(p, argparse.SUPPRESS)  # after the command too; absent there, the top-level value stands
    return parser, sub


def add_debug(p, default) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, show the full traceback instead of one line (as QVLQUANT_DEBUG=1 does)")


def _main(argv: list[str]) -> int:
    parser, sub = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version (0), or a bad flag or choice, already printed (2)
        return e.code
    if args.command == "quantize" and args.recipe:
        sub.choices["quantize"].set_defaults(**recipe_defaults(args.recipe))  # a bad recipe: ValueError, exit 2
        args = parser.parse_args(argv)  # recipe values are now defaults: flags on the command line win
    args.argv = argv
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.command != "quantize":  # quantize sets them per process (api.quantize, with --nproc's share)
        from qvlquant.parallel.devices import set_threads

        set_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # qvlquant shows its own progress; stderr stays readable
    run = {"quantize": run_quantize, "eval": run_eval, "inspect": run_inspect, "check": run_check, "push": run_push,
           "bench": run_bench}
    return run[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
