"""Quantize a Qwen2-VL with llm-compressor from exported calibration batches; write the result as dense weights.

    /work/peers/llmc/bin/python benchmarks/peers/run_llmcompressor.py --model qvlquant/assets/demo \
        --batches /tmp/peer-batches --method gptq --bits 4 --group-size 128 --sym --damp 0.01 --output OUT

Runs inside llm-compressor's own venv (benchmarks/peers/setup_venvs.sh) and never imports qvlquant. The batches
are benchmarks/peers/export_batches.py's, one per sample, fed to ``oneshot`` as a DataLoader in their order. Only the
language model's linears are quantized (``visual.*`` and ``lm_head`` are ignored), on the CPU.

- GPTQ: ``GPTQModifier`` (``--damp`` is its ``dampening_frac``; ``--actorder none|static``; llm-compressor's own
  default is static, so it is always given explicitly; compressed-tensors 0.19 refuses ``group``, the g_idx kind).
- AWQ: 0.14's ``AWQModifier`` (a transform that folds the smoothing scales into the previous ops) followed by a
  ``QuantizationModifier`` with the same scheme, i.e. what ``llmcompressor.modifiers.awq.AWQModifier`` builds.
- Presets (``--method FP8_DYNAMIC|W8A8|NVFP4A16``, data-free: no ``--batches``; ``--method FP8|NVFP4``, calibrated:
  their static activation scales are observed over ``--batches``): ``QuantizationModifier(scheme=S)``, run through
  ``oneshot`` as llm-compressor's own examples do (FP8_DYNAMIC / NVFP4A16 with no dataset; NVFP4 and FP8 over the
  calibration set, its sequential pipeline one decoder layer at a time). ``--method w8a8-gptq``: its W8A8 example,
  ``SmoothQuantModifier`` (``--smoothing``, 0: none) then ``GPTQModifier(scheme="W8A8")``. These keep the
  compressed-tensors checkpoint llm-compressor saves (``--keep DIR``, with the processor) instead of dense weights.

The compressed checkpoint it saves (compressed-tensors ``pack-quantized``) is decompressed with compressed-tensors'
own ``PackedQuantizationCompressor.decompress`` (transformers cannot decompress it with ``run_compressed=False``)
and written as ``OUTPUT/model.safetensors``: every tensor of the input folder's model.safetensors, under the same
keys (the legacy ``model.layers.N`` / ``visual.*`` layout included), float32. ``OUTPUT/meta.json`` records the
versions, the settings, the wall time and the calibration counts.

Work-arounds, each for a failure met on a CPU-only machine:
- text-only samples carry ``pixel_values=None`` / ``image_grid_thw=None`` (the traced pipeline fails without them);
- AWQ pins its cached activations (``IntermediatesCache.pin_memory``) for faster host-to-device copies, which needs
  CUDA: without CUDA it is replaced by a no-op (``_no_pinning``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import json
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/peers: layout.py beside this script
from layout import peak_rss_gib, to_input_layout, weight_errors  # noqa: E402

PRESETS = ("FP8_DYNAMIC", "W8A8", "NVFP4A16")  # llm-compressor's data-free preset schemes, run with no calibration
CALIBRATED_PRESETS = ("FP8", "NVFP4")  # its preset schemes with static activation scales, observed over --batches
W8A8_GPTQ = "w8a8-gptq"  # its INT8 W8A8 recipe: SmoothQuantModifier (--smoothing, 0 = none) then GPTQModifier(W8A8)
KEPT = (*PRESETS, *CALIBRATED_PRESETS, W8A8_GPTQ)  # output: the compressed checkpoint it saves (--keep), not dense
SEQUENTIAL_TARGETS = ["Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen3_5DecoderLayer", "Qwen3_5MoeDecoderLayer"]
# Qwen3.5-MoE's 1-row shared_expert_gate is kept 16-bit, as qvlquant and GPTQModel keep it (the router, mlp.gate, is
# a parameter, not a Linear, so no tool quantizes it)
MOE_IGNORE = ["re:.*mlp\\.shared_expert_gate$"]
IGNORE = ["lm_head", "re:(model\\.)?visual\\..*", *MOE_IGNORE]  # the vision tower stays BF16, as in qvlquant


@dataclasses.dataclass(frozen=True)
class Settings:
    method: str
    bits: int
    group_size: int  # -1: one group per output channel
    sym: bool
    damp: float = 0.01
    actorder: str = "none"
    dtype: str = "float32"  # the dtype the model is loaded and calibrated in
    smoothing: float = 0.8  # w8a8-gptq: SmoothQuantModifier's smoothing_strength; 0: no SmoothQuant
    moe_experts: str = "all"  # oneshot's moe_calibrate_all_experts: all (its default) or routed tokens only

    def __post_init__(self):
        if self.method not in ("gptq", "awq", *KEPT):
            raise ValueError(f"--method {self.method!r}: use gptq, awq, {W8A8_GPTQ}, a data-free preset "
                             f"({', '.join(PRESETS)}) or a calibrated one ({', '.join(CALIBRATED_PRESETS)})")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"--smoothing {self.smoothing}: SmoothQuant's strength in [0, 1) (0: none)")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"--bits {self.bits}: llm-compressor packs 2..8-bit integers")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"--group-size {self.group_size}: a positive group size, or -1 for per-channel")
        if self.actorder not in ("none", "static") or (self.method == "awq" and self.actorder != "none"):
            raise ValueError(f"--actorder {self.actorder!r}: none or static, and GPTQ only")
        if not 0 <= self.damp < 1:
            raise ValueError(f"--damp {self.damp}: a fraction of the Hessian's mean diagonal, in [0, 1)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r}: float32 or bfloat16")
        if self.moe_experts not in ("all", "routed"):
            raise ValueError(f"--moe-experts {self.moe_experts!r}: all (every token through every expert) or routed")


def read_batches(folder: pathlib.Path) -> tuple[list[dict], dict]:
    """export_batches.py's files, in order; text-only samples get pixel_values / image_grid_thw = None."""
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    batches = []
    for name in index["files"]:
        batch = load_file(str(folder / name))
        batch.setdefault("pixel_values", None)
        batch.setdefault("image_grid_thw", None)
        batches.append(batch)
    return batches, index


def scheme(s: Settings):
    """The compressed-tensors scheme of the language model's linears."""
    from compressed_tensors.quantization import (  # peer venv only
        QuantizationArgs,
        QuantizationScheme,
    )

    weights = QuantizationArgs(
        num_bits=s.bits, type="int", symmetric=s.sym, strategy="group" if s.group_size > 0 else "channel",
        group_size=s.group_size if s.group_size > 0 else None,
        actorder=None if s.actorder == "none" else s.actorder,
    )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def recipe(s: Settings) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier  # peer venv only
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if s.method in (*PRESETS, *CALIBRATED_PRESETS):
        return [QuantizationModifier(targets="Linear", scheme=s.method, ignore=IGNORE)]
    if s.method == W8A8_GPTQ:  # llm-compressor's W8A8 example: SmoothQuant, then GPTQ on the W8A8 preset
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        smooth = [SmoothQuantModifier(smoothing_strength=s.smoothing)] if s.smoothing else []
        return [*smooth, GPTQModifier(targets="Linear", scheme="W8A8", ignore=IGNORE, dampening_frac=s.damp)]
    if s.method == "gptq":
        actorder = None if s.actorder == "none" else s.actorder
        return [GPTQModifier(config_groups=scheme(s), ignore=IGNORE, dampening_frac=s.damp, actorder=actorder)]
    return [AWQModifier(), QuantizationModifier(config_groups=scheme(s), ignore=IGNORE)]


def _no_pinning():
    """Without CUDA, page-locked memory cannot be allocated: make AWQ's pinning of its cached batches a no-op (it
    only speeds up copies to a GPU)."""
    from llmcompressor.pipelines.cache import IntermediatesCache  # peer venv only

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def _record_gptq(record: dict) -> None:
    """Have GPTQModifier note, as it quantizes, which linears' Hessians are all zero (``record["uncalibrated"]``: an
    expert no calibration token reached, whose columns GPTQ zeroes as dead), how many calls each Hessian accumulated
    (``record["calls"]``, its ``num_samples``: one per batch, and per call of an expert, with or without rows) and
    which linears it rounded to nearest because their Hessian would not factorise (``record["rtn_fallback"]``)."""
    from llmcompressor.modifiers.gptq import GPTQModifier  # peer venv only

    compress, summary = GPTQModifier.compress_module_list, GPTQModifier._log_rtn_fallback_summary
    record.update(calls={}, uncalibrated=[], rtn_fallback=[])

    def compress_module_list(self, module_list):
        for m in module_list:
            record["calls"][self._module_names[m]] = int(self._num_samples[m])
            if not self._hessians[m].diagonal().any():
                record["uncalibrated"].append(self._module_names[m])
        return compress(self, module_list)

    def log_rtn_fallback_summary(self):
        record["rtn_fallback"] += list(self._rtn_fallback_module_names)
        return summary(self)

    GPTQModifier.compress_module_list = compress_module_list
    GPTQModifier._log_rtn_fallback_summary = log_rtn_fallback_summary


def quantize(model_dir: pathlib.Path, batches: list[dict], s: Settings, saved: pathlib.Path) -> dict:
    """oneshot over the batches, then save the compressed checkpoint to ``saved``. -> what GPTQ recorded
    (``_record_gptq``; empty for other methods)."""
    from llmcompressor import oneshot  # peer venv only
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _no_pinning()
    record: dict = {}
    if s.method == "gptq":
        _record_gptq(record)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, s.dtype))
    processor = AutoProcessor.from_pretrained(model_dir)
    if s.method in PRESETS:  # data-free: no dataset, as llm-compressor's own FP8_DYNAMIC / W8A8 / NVFP4A16 examples
        oneshot(model=model, recipe=recipe(s))
        model.save_pretrained(saved, save_compressed=True)
        processor.save_pretrained(saved)
        return record
    loader = torch.utils.data.DataLoader(batches, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])
    targets = [t for t in SEQUENTIAL_TARGETS if any(type(m).__name__ == t for m in model.modules())]
    oneshot(model=model, processor=processor, dataset=loader, recipe=recipe(s), num_calibration_samples=len(batches),
            sequential_targets=targets, shuffle_calibration_samples=False,
            moe_calibrate_all_experts=s.moe_experts == "all")
    model.save_pretrained(saved, save_compressed=True)
    if s.method in KEPT:  # a checkpoint to load as it is
        processor.save_pretrained(saved)
    return record


def _is_default_g_idx(g_idx: torch.Tensor, groups: int) -> bool:
    """g_idx [K]: input column k in group k // (K / groups), i.e. no act-order permutation of the groups."""
    k = g_idx.numel()
    return bool(torch.equal(g_idx.long(), torch.arange(k) // (k // groups)))


def _read_saved(saved: pathlib.Path):
    """The saved checkpoint's (one pack-quantized scheme group, all its tensors, the quantized linears' names)."""
    from compressed_tensors.quantization import QuantizationConfig  # peer venv only

    qc = QuantizationConfig.model_validate(json.loads((saved / "config.json").read_text())["quantization_config"])
    if qc.format != "pack-quantized" or len(qc.config_groups) != 1:
        raise SystemExit(f"{saved}: format {qc.format}, {len(qc.config_groups)} groups; "
                         "expected one pack-quantized group")
    state = {}
    for f in sorted(saved.glob("*.safetensors")):
        state.update(load_file(str(f)))
    names = sorted(k[: -len(".weight_packed")] for k in state if k.endswith(".weight_packed"))
    return next(iter(qc.config_groups.values())), state, names


def _decompress_one(state: dict, prefix: str, group, pop: bool = True) -> torch.Tensor:
    """One linear's packed tensors -> its dense weight, through compressed-tensors' own decompressor."""
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,  # peer venv only
    )

    get = state.pop if pop else state.get
    parts = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
    local = {n: get(f"{prefix}.{n}") for n in parts if f"{prefix}.{n}" in state}
    g_idx = get(f"{prefix}.weight_g_idx", None)
    if g_idx is not None and not _is_default_g_idx(g_idx, local["weight_scale"].shape[-1]):
        raise SystemExit(f"{prefix}: permuted weight_g_idx, which the pack-quantized decompressor does not apply")
    return PackedQuantizationCompressor.decompress(local, group)["weight"]


def decompress(saved: pathlib.Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The saved pack-quantized checkpoint -> (dense state dict, names of the quantized linears)."""
    group, state, names = _read_saved(saved)
    for prefix in names:
        state[f"{prefix}.weight"] = _decompress_one(state, prefix, group)
    return state, names


def check(saved: pathlib.Path, model_dir: pathlib.Path) -> dict:
    """The saved checkpoint's linears dequantized one at a time against the input's weights (layout.weight_errors)."""
    group, state, names = _read_saved(saved)
    return weight_errors(names, lambda name: _decompress_one(state, name, group, pop=False), model_dir)


def versions() -> dict:
    names = ("llmcompressor", "compressed-tensors", "torch", "transformers")
    return {n: md.version(n) for n in names} | {"python": platform.python_version()}


def run(model_dir: pathlib.Path, batch_dir: pathlib.Path | None, s: Settings, out: pathlib.Path, dense: bool = True,
        keep: pathlib.Path | None = None) -> dict:
    """Quantize; then either write the dense result (``dense``) or only check it against the input's weights, one
    linear at a time (``--check-only``: what a real-size run can afford). ``keep``: a copy of the compressed
    checkpoint llm-compressor saved (the only output of a data-free preset)."""
    batches, index = read_batches(batch_dir) if batch_dir is not None else ([], {})
    with tempfile.TemporaryDirectory(prefix="llmc-") as tmp:
        saved = pathlib.Path(tmp)
        t0 = time.time()
        record = quantize(model_dir, batches, s, saved)
        seconds = time.time() - t0
        peak = peak_rss_gib()
        saved_bytes = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
        if keep is not None:
            shutil.copytree(saved, keep, dirs_exist_ok=True)
        if s.method in KEPT:  # int-quantized / float-quantized / nvfp4-pack-quantized: kept as saved
            dense, sanity = False, None
        elif dense:
            state, names = decompress(saved)
        else:
            sanity = check(saved, model_dir)
    meta = {
        "peer": "llm-compressor", "versions": versions(), "settings": dataclasses.asdict(s),
        "model": str(model_dir), "batches": str(batch_dir) if batch_dir else None, "kept": str(keep) if keep else None,
        "wall_seconds": round(seconds, 2),
        "peak_rss_gib_quantize": peak, "saved_bytes": saved_bytes,
        "calibration": {k: index.get(k) for k in ("count", "num_tokens", "num_images", "seed", "calib")},
        "threads": torch.get_num_threads(),
    }
    if record:  # GPTQ: linears whose Hessian no token reached; RTN fallbacks; Hessian calls per linear
        meta["gptq"] = {"linears": len(record["calls"]), **record}
    out.mkdir(parents=True, exist_ok=True)
    if dense:
        dense_state, renamed = to_input_layout(state, model_dir, "decompression")
        save_file(dense_state, str(out / "model.safetensors"))
        meta["quantized_linears"] = [renamed[n + ".weight"][: -len(".weight")] for n in names]
    elif sanity is not None:
        meta["sanity"] = sanity
        meta["quantized_linears"] = sanity["linears"]
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=pathlib.Path, help="BF16 model folder (with its processor)")
    ap.add_argument("--batches", type=pathlib.Path, help="export_batches.py's output folder (not for a preset)")
    ap.add_argument("--method", required=True, choices=["gptq", "awq", *KEPT])
    ap.add_argument("--smoothing", type=float, default=0.8, help=f"{W8A8_GPTQ}: SmoothQuant's strength (0: none)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", dest="sym", action="store_true", default=None)
    ap.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--actorder", default="none", choices=["none", "static"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--moe-experts", default="all", choices=["all", "routed"],
                    help="MoE calibration: every token through every expert (oneshot's default) or routed tokens only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check-only", action="store_true",
                    help="write only meta.json, with each linear's error against the input instead of dense weights")
    ap.add_argument("--keep", type=pathlib.Path, default=None, help="copy llm-compressor's compressed checkpoint here")
    ap.add_argument("--output", required=True, type=pathlib.Path)
    args = ap.parse_args(argv)
    if (args.method in PRESETS) != (args.batches is None):
        ap.error(f"--batches is needed by gptq, awq, {W8A8_GPTQ} and the calibrated presets "
                 f"({', '.join(CALIBRATED_PRESETS)}), and taken by no data-free preset ({', '.join(PRESETS)})")
    if args.method in KEPT and args.keep is None:
        ap.error(f"--method {args.method}: its output is the compressed checkpoint; give --keep DIR")
    torch.set_num_threads(args.threads)
    sym = args.sym if args.sym is not None else args.method == "gptq"  # each method's published default
    s = Settings(args.method, args.bits, args.group_size, sym, args.damp, args.actorder, args.dtype, args.smoothing,
                 args.moe_experts)
    meta = run(args.model.resolve(), args.batches.resolve() if args.batches else None, s, args.output,
               dense=not args.check_only, keep=args.keep)
    count = meta.get("quantized_linears")
    count = len(count) if isinstance(count, list) else count
    print(f"llm-compressor {s.method} W{s.bits}g{s.group_size}: {count} linears, "
          f"{meta['wall_seconds']} s -> {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
