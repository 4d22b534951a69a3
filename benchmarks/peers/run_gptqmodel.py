"""Quantize a Qwen2-VL with GPTQModel from exported calibration batches; write the result as dense weights.

    GPTQMODEL_CPU_WORKERS=2 /work/peers/gptqmodel/bin/python benchmarks/peers/run_gptqmodel.py \
        --model qvlquant/assets/demo --batches /tmp/peer-batches --method gptq --bits 4 --group-size 128 --sym \
        --damp 0.01 --output OUT

Runs inside GPTQModel's own venv (benchmarks/peers/setup_venvs.sh) and never imports qvlquant. The batches are
benchmarks/peers/export_batches.py's, one per sample, in their order: GPTQModel's Qwen2-VL definition would
re-encode chat conversations through the processor itself, so the model's ``prepare_dataset`` is replaced by one
that hands the already-encoded batches through (``_use_encoded_batches``); its length sort and minimum-length
filter are switched off. Only the language model's decoder linears are quantized (GPTQModel's Qwen2-VL
``module_tree``); the vision tower and lm_head stay as they are. On the CPU.

- ``--damp``: ``damp_percent``; ``--actorder none|static|gar``: none = plain column order (``desc_act=False``,
  ``act_group_aware=False``), static = ``desc_act=True, static_groups=True``, gar = GPTQModel's own default
  (group-aware reordering, ``act_group_aware=True``); ``--mse F``: GPTQModel's MSE scale search (0 = off).
- ``--dynamic JSON``: ``QuantizeConfig.dynamic``, per-module overrides as GPTQModel 7.7 reads them: an object of
  regex -> settings, first match wins, ``"+:regex"`` (or a bare regex) -> overrides such as ``{"bits": 8}``,
  ``"-:regex"`` -> left unquantized. GPTQModel matches a regex from the start of the module name (``re.match``
  semantics, its ``pcre`` module), so ``".*\\.layers\\.(?:0|3)\\."``, not ``"\\.layers\\.(?:0|3)\\."``.

GPTQModel saves GPTQ "v1" (``qweight`` [K*b/32, N] int32 packed along K as a little-endian bit stream, ``qzeros``
[G, N*b/32] packed along N holding zero - 1, ``scales`` [G, N] fp16, ``g_idx`` [K]); ``dequantize_gptq`` reads
those tensors back to W [N, K] = scales[g_idx] * (q - zero), float32, and the result is written as
``OUTPUT/model.safetensors`` under exactly the keys (and shapes) of the input folder's model.safetensors. Each
linear's width is read from its own tensors' shapes (``packed_width``), not from the settings, so what GPTQModel
applied under ``dynamic`` is what is read back. ``OUTPUT/meta.json`` records the versions, the settings, the wall
time, the calibration counts and, per quantized linear, the width, groups and packed bits found on disk.
Needs ``GPTQMODEL_CPU_WORKERS=2`` on a 2-core machine (set here when unset) and ``mm_token_type_ids`` in the
batches (export_batches.py writes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import json
import os
import pathlib
import platform
import re
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/peers: layout.py beside this script
from layout import peak_rss_gib, to_input_layout, weight_errors  # noqa: E402

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # read when gptqmodel is imported; its default hangs on 2 cores


@dataclasses.dataclass(frozen=True)
class Settings:
    bits: int
    group_size: int  # -1: one group per output channel
    sym: bool
    damp: float = 0.01
    actorder: str = "none"
    mse: float = 0.0
    dtype: str = "float32"  # the dtype the model is loaded and calibrated in
    dynamic: dict | None = None  # QuantizeConfig.dynamic: regex (optionally "+:" / "-:") -> overrides

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"--bits {self.bits}: GPTQModel packs 2..8-bit integers")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"--group-size {self.group_size}: a positive group size, or -1 for per-channel")
        if self.actorder not in ("none", "static", "gar"):
            raise ValueError(f"--actorder {self.actorder!r}: none, static or gar")
        if not 0 < self.damp < 1:
            raise ValueError(f"--damp {self.damp}: GPTQModel needs 0 < damp_percent < 1")
        if self.mse < 0:
            raise ValueError(f"--mse {self.mse}: 0 (off) or a positive norm")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r}: float32 or bfloat16")
        if self.dynamic is not None:
            check_dynamic(self.dynamic)


def check_dynamic(dynamic) -> None:
    """``--dynamic``: an object of regex -> object of overrides, each regex valid, "-:" entries without overrides."""
    if not isinstance(dynamic, dict) or not dynamic:
        raise ValueError(f"--dynamic: a JSON object of regex -> overrides, got {dynamic!r:.80}")
    for key, overrides in dynamic.items():
        pattern = key[2:] if key.startswith(("+:", "-:")) else key
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--dynamic {key!r}: not a regular expression ({e})") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--dynamic {key!r}: overrides must be an object such as {{\"bits\": 8}}, "
                             f"got {overrides!r:.80}")
        if key.startswith("-:") and overrides:
            raise ValueError(f"--dynamic {key!r}: a '-:' entry leaves its modules unquantized; give it {{}}")
        bits = overrides.get("bits")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
            raise ValueError(f"--dynamic {key!r}: bits {bits!r}; GPTQModel packs 2..8-bit integers")


def unpack_stream(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Codes packed along dim 0 as a little-endian bit stream (AutoGPTQ's layout, 3 bits crossing words included).
    words [W, M] int32 -> [length, M] int64."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64).view(1, 32, 1)
    stream = ((w.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1, w.shape[1])  # [W*32, M], LSB first
    if stream.shape[0] < length * bits:
        raise ValueError(f"{words.shape[0]} words hold {stream.shape[0] // bits} {bits}-bit codes, not {length}")
    stream = stream[: length * bits].view(length, bits, w.shape[1]).to(torch.int64)
    return (stream << torch.arange(bits, dtype=torch.int64).view(1, bits, 1)).sum(1)


def dequantize_gptq(t: dict[str, torch.Tensor], bits: int, v1: bool = True) -> torch.Tensor:
    """One GPTQ linear (qweight, qzeros, scales, optional g_idx) -> W [N, K] float32. ``v1``: qzeros hold zero - 1
    (the AutoGPTQ checkpoint convention, stored modulo 2**bits), which the loaders add back."""
    scales = t["scales"].float()  # [G, N]
    groups, n = scales.shape
    k = t["qweight"].shape[0] * 32 // bits
    q = unpack_stream(t["qweight"], bits, k)  # [K, N]
    zero = unpack_stream(t["qzeros"].t(), bits, n).t()  # [G, N]
    if v1:
        zero = (zero + 1) & (2**bits - 1)
    g_idx = t["g_idx"].long() if "g_idx" in t else torch.arange(k) // (k // groups)
    return (scales[g_idx] * (q - zero[g_idx]).float()).t().contiguous()  # [N, K]


def packed_width(name: str, t: dict[str, torch.Tensor]) -> dict:
    """The width one GPTQ linear was packed at, read from its tensors' shapes alone: ``qzeros`` [G, N*b/32] against
    ``scales`` [G, N] gives b; ``qweight`` [K*b/32, N] must then hold the K codes ``g_idx`` [K] indexes.
    -> {bits, groups, in_features, out_features, packed_bits (every tensor of the linear, in bits)}."""
    groups, n = t["scales"].shape
    words = t["qzeros"].shape[1]
    bits, rest = divmod(words * 32, n)
    if rest or not 2 <= bits <= 8 or t["qzeros"].shape[0] != groups:
        raise SystemExit(f"{name}: qzeros {list(t['qzeros'].shape)} against scales {list(t['scales'].shape)} is no "
                         "2..8-bit GPTQ packing")
    k, rest = divmod(t["qweight"].shape[0] * 32, bits)
    if rest or t["qweight"].shape[1] != n or ("g_idx" in t and t["g_idx"].numel() != k):
        got = f", g_idx [{t['g_idx'].numel()}]" if "g_idx" in t else ""
        raise SystemExit(f"{name}: qweight {list(t['qweight'].shape)}{got} does not hold {bits}-bit codes of "
                         f"{n} output channels")
    return {"bits": bits, "groups": groups, "in_features": k, "out_features": n,
            "packed_bits": sum(8 * v.numel() * v.element_size() for v in t.values())}


def dequantize_state(packed: dict[str, torch.Tensor], v1: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A saved GPTQ checkpoint's tensors -> (dense state dict, each quantized linear's name -> its
    ``packed_width``), every linear read at the width its own tensors hold."""
    state = dict(packed)
    names = sorted(k[: -len(".qweight")] for k in packed if k.endswith(".qweight"))
    widths = {}
    for name in names:
        keys = ("qweight", "qzeros", "scales", "g_idx")
        parts = {p: state.pop(f"{name}.{p}") for p in keys if f"{name}.{p}" in state}
        widths[name] = packed_width(name, parts)
        state[f"{name}.weight"] = dequantize_gptq(parts, widths[name]["bits"], v1)
    return state, widths


def read_batches(folder: pathlib.Path) -> tuple[list[dict], dict]:
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    batches = [load_file(str(folder / name)) for name in index["files"]]
    missing = [n for n, b in zip(index["files"], batches) if "mm_token_type_ids" not in b]
    if missing:
        raise SystemExit(f"{folder / missing[0]}: no mm_token_type_ids; re-export with export_batches.py")
    return batches, index


def quantize_config(s: Settings):
    from gptqmodel import QuantizeConfig  # peer venv only

    order = {"none": {"desc_act": False, "act_group_aware": False},
             "static": {"desc_act": True, "static_groups": True, "act_group_aware": False},
             "gar": {"desc_act": False, "act_group_aware": True}}[s.actorder]
    return QuantizeConfig(bits=s.bits, group_size=s.group_size, sym=s.sym, damp_percent=s.damp, mse=s.mse,
                          dynamic=s.dynamic, **order)


def _use_encoded_batches(model) -> None:
    """The batches are already the processor's output: pass them through instead of re-encoding conversations."""
    model.prepare_dataset = lambda calibration_dataset, **_: calibration_dataset


HYBRID_LAYERS = ("Qwen3_5DecoderLayer", "Qwen3_5MoeDecoderLayer")  # decoder layers given position_ids only sometimes


def _no_layer_position_ids(model) -> int:
    """Qwen3.5's text model hands its decoder layers ``position_ids`` for some batches only (its text positions
    when it built them itself, None when the 3-D mRoPE positions came from the image grid), and GPTQModel 7.7's
    input capture keeps a layer's ``position_ids`` only when not None, so its list comes out shorter than the
    batches and the replay fails (``IndexError: list index out of range`` at ``pos = position_ids[batch_idx]``,
    gptqmodel/looper/forward_executor.py). The layers do not read them (RoPE arrives as ``position_embeddings``;
    SDPA ignores ``position_ids``), so each such layer is called with ``position_ids=None`` for every batch.
    -> how many layers were hooked."""
    layers = [m for m in model.model.modules() if type(m).__name__ in HYBRID_LAYERS]
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, args, kwargs: (args, {**kwargs, "position_ids": None}),
                                        with_kwargs=True)
    return len(layers)


def calibration_log(quant_log: list[dict]) -> dict:
    """GPTQModel's per-linear log (``model.quant_log``: process, layer, module, loss, samples, ...) -> the linears
    it calibrated, the fewest rows any of them saw, and those it rounded to nearest instead (its ``fallback``, by
    default RTN for a linear that saw under 0.5 % of the calibration tokens: a rarely routed expert), as
    "layer.module (rows)"."""
    rows = [e for e in quant_log if e.get("process") == "gptq" and "module" in e]
    samples = [int(e["samples"]) for e in rows if str(e.get("samples", "")).isdigit()]
    fallback = [f"{e.get('layer')}.{e['module']} ({e.get('samples')})" for e in rows
                if str(e.get("loss", "")).startswith("fallback")]
    return {"linears": len(rows), "min_samples": min(samples, default=None), "fallback": fallback}


def quantize(model_dir: pathlib.Path, batches: list[dict], s: Settings, saved: pathlib.Path) -> dict:
    """-> ``calibration_log`` of the run."""
    from gptqmodel import GPTQModel  # peer venv only

    model = GPTQModel.load(str(model_dir), quantize_config(s), device="cpu", dtype=getattr(torch, s.dtype))
    _use_encoded_batches(model)
    _no_layer_position_ids(model)
    model.quantize(batches, batch_size=1, calibration_sort=None, calibration_data_min_length=0)
    model.save(str(saved))
    return calibration_log(list(getattr(model, "quant_log", None) or []))


def versions() -> dict:
    names = ("gptqmodel", "torch", "transformers")
    return {n: md.version(n) for n in names} | {"python": platform.python_version()}


def run(model_dir: pathlib.Path, batch_dir: pathlib.Path, s: Settings, out: pathlib.Path, dense: bool = True) -> dict:
    """Quantize; then either write the dense result (``dense``) or only check it against the input's weights, one
    linear at a time (``--check-only``: what a real-size run can afford)."""
    batches, index = read_batches(batch_dir)
    with tempfile.TemporaryDirectory(prefix="gptqmodel-") as tmp:
        saved = pathlib.Path(tmp)
        t0 = time.time()
        log = quantize(model_dir, batches, s, saved)
        seconds = time.time() - t0
        peak = peak_rss_gib()
        saved_bytes = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
        qcfg = json.loads((saved / "quantize_config.json").read_text())
        packed = {}
        for f in sorted(saved.glob("*.safetensors")):
            packed.update(load_file(str(f)))
    fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise SystemExit(f"GPTQModel saved checkpoint_format {fmt!r}; this runner reads gptq (v1) and gptq_v2")
    meta = {
        "peer": "GPTQModel", "versions": versions(), "settings": {"method": "gptq", **dataclasses.asdict(s)},
        "model": str(model_dir), "batches": str(batch_dir), "wall_seconds": round(seconds, 2),
        "peak_rss_gib_quantize": peak, "saved_bytes": saved_bytes,
        "calibration": {k: index.get(k) for k in ("count", "num_tokens", "num_images", "seed", "calib")},
        "checkpoint_format": fmt, "quantize_config": qcfg,
        "threads": torch.get_num_threads(), "cpu_workers": os.environ["GPTQMODEL_CPU_WORKERS"], "gptq": log,
    }
    out.mkdir(parents=True, exist_ok=True)
    if dense:
        state, widths = dequantize_state(packed, v1=fmt == "gptq")
        dense_state, renamed = to_input_layout(state, model_dir)
        save_file(dense_state, str(out / "model.safetensors"))
        meta["quantized_linears"] = [renamed[n + ".weight"][: -len(".weight")] for n in widths]
        meta["packed"] = {n: dict(w, key=renamed[n + ".weight"][: -len(".weight")]) for n, w in widths.items()}
    else:
        names = sorted(k[: -len(".qweight")] for k in packed if k.endswith(".qweight"))

        def one(name: str) -> torch.Tensor:
            parts = {p: packed[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx") if f"{name}.{p}" in packed}
            return dequantize_gptq(parts, packed_width(name, parts)["bits"], fmt == "gptq")

        meta["sanity"] = weight_errors(names, one, model_dir)
        meta["quantized_linears"] = len(names)
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
    return meta


def json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r:.80}") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=pathlib.Path, help="BF16 model folder (with its processor)")
    ap.add_argument("--batches", required=True, type=pathlib.Path, help="export_batches.py's output folder")
    ap.add_argument("--method", default="gptq", choices=["gptq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", dest="sym", action="store_true", default=True)
    ap.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--actorder", default="none", choices=["none", "static", "gar"])
    ap.add_argument("--mse", type=float, default=0.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--dynamic", type=json_arg, default=None,
                    help='QuantizeConfig.dynamic as JSON, e.g. \'{"+:.*\\\\.layers\\\\.(?:0|3)\\\\.": {"bits": 8}}\'')
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check-only", action="store_true",
                    help="write only meta.json, with each linear's error against the input instead of dense weights")
    ap.add_argument("--output", required=True, type=pathlib.Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Settings(args.bits, args.group_size, args.sym, args.damp, args.actorder, args.mse, args.dtype, args.dynamic)
    meta = run(args.model.resolve(), args.batches.resolve(), s, args.output, dense=not args.check_only)
    if args.check_only:
        print(f"GPTQModel gptq W{s.bits}g{s.group_size}: {meta['quantized_linears']} linears, "
              f"{meta['wall_seconds']} s -> {args.output}", file=sys.stderr)
        return
    widths = sorted({w["bits"] for w in meta["packed"].values()})
    print(f"GPTQModel gptq W{s.bits}g{s.group_size}: {len(meta['quantized_linears'])} linears at "
          f"{'/'.join(map(str, widths))} bits, {meta['wall_seconds']} s -> {args.output / 'model.safetensors'}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
