"""Every setting of a quantization job, as frozen dataclasses, with the per-method defaults and every check here.

``JobConfig`` is what ``qvlquant.quantize`` takes, what ``quantize_report.json`` records and what resume
fingerprints. It nests ``QuantConfig`` (the method), ``CalibSource`` (which samples), ``CalibConfig`` (how they are
turned into batches), ``DeviceConfig`` (where the math runs) and ``ExportConfig`` (what is written).
``JobConfig.from_flat`` builds one from flat settings named like the ``qvlquant quantize`` flags and recipe keys
(``bits=3, method="gptq", device="cuda"``); a setting left out or ``None`` takes its default.
"""

from __future__ import annotations

import dataclasses
import math
import re

from qvlquant.calib.dataset import CalibConfig
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.rtn import QuantSpec

CONFIG_VERSION = 1
METHODS = ("rtn", "gptq", "awq")
AWQ_ROUNDING = ("rtn", "gptq")
# GPTQ's defaults, chosen by measurement (README, "Methods with error bars"): damping 0.01 of the mean Hessian diagonal
# and act-order with static groups (columns by decreasing Hessian diagonal, group parameters fixed on the original
# order, so the checkpoint needs no runtime g_idx and vLLM serves it). The recipes of published checkpoints keep
# those checkpoints' own settings (damp 0.1, no act-order).
GPTQ_DAMP_PERCENT = 0.01
GPTQ_ACT_ORDER = True
# AWQ's rounding after its scales, by bit width (measured the same way): below 4 bits GPTQ rounds the scaled layer
# (perplexity beyond the spread); at 4 bits and up AWQ's own clipping search and round-to-nearest (a perplexity tie,
# and no GPTQ Hessians in memory).
AWQ_GPTQ_ROUNDING_BELOW_BITS = 4
# GPTQ's group ranges: below 4 bits searched for the least |w - Q(w)|^2.4 (GPTQModel's mse; beyond the spread at
# W3 with act-order), at 4 bits and up min-max (within a hair of the spread, and no search time).
GPTQ_MSE = 2.4
GPTQ_MSE_BELOW_BITS = 4
EXPORT_FORMATS = ("auto", "compressed-tensors")
DTYPES = ("float32", "bfloat16", "float16")
OFFLOAD = ("auto", "device", "cpu")
DEFAULT_SHARD_BYTES = 5 * 2**30


def _finite_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number above 0, got {value!r}")


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The method and its settings. ``spec`` defaults to 4-bit, group 128, symmetric (asymmetric for AWQ, whose
    format stores zero points); the GPTQ options are refused for the other methods."""

    method: str = "rtn"
    spec: QuantSpec | None = None
    damp_percent: float | None = None  # GPTQ: Hessian damping (x mean diagonal); None: GPTQ_DAMP_PERCENT
    damp_max: float = 1.0  # GPTQ: damping is doubled on Cholesky failure up to this, then it is an error
    block_size: int = 128  # GPTQ: columns per lazy update
    desc_act: bool | None = None  # GPTQ: act-order (columns by decreasing Hessian diagonal); None: GPTQ_ACT_ORDER
    static_groups: bool | None = None  # GPTQ: group parameters fixed before act-order permutes the columns; None:
    # with the default act-order, static; with an explicit desc_act, dynamic (the g_idx layout)
    true_sequential: bool = True  # GPTQ: each linear group's Hessian re-captured after the groups before it
    awq_grid: int = 20  # AWQ: grid points of the scale search
    awq_clip: bool = True  # AWQ: clipping search after scaling
    awq_max_tokens: int = 4096  # AWQ: tokens kept per linear for its statistics and scale search
    awq_rounding: str | None = None  # AWQ: "rtn" (AWQ's own, after the clipping search) or "gptq" (GPTQ rounds the
    # scaled layer); None: gptq below AWQ_GPTQ_ROUNDING_BELOW_BITS bits, else rtn
    mse: float | None = None  # GPTQ: group ranges shrunk to minimise |w - Q(w)|^mse (GPTQModel's mse, 2.4 typical);
    # 0: min-max; None: GPTQ_MSE below GPTQ_MSE_BELOW_BITS bits for method gptq, else 0
    vision_weight: float = 1.0  # GPTQ: weight of image / video tokens in the Hessian (VLMQ-style); 1: as text

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.spec is None:
            object.__setattr__(self, "spec", QuantSpec(4, 128, sym=self.method != "awq"))
        self._resolve_defaults()
        if self.awq_rounding not in AWQ_ROUNDING:
            raise ValueError(f"awq_rounding must be one of {', '.join(AWQ_ROUNDING)}, got {self.awq_rounding!r}")
        if self.awq_rounding != "rtn" and self.method != "awq":
            raise ValueError(f"awq_rounding: an AWQ option, not for method {self.method}")
        gptq_rounds = self.method == "gptq" or self.awq_rounding == "gptq"
        rounding = {"damp_percent": self.damp_percent is not None, "mse": self.mse != 0.0,
                    "vision_weight": self.vision_weight != 1.0}  # wherever GPTQ rounds (gptq, awq + gptq)
        ordering = {"desc_act": self.desc_act, "static_groups": self.static_groups,
                    "true_sequential": not self.true_sequential}  # GPTQ's own column order and layout
        misplaced = [k for k, v in rounding.items() if v and not gptq_rounds]
        misplaced += [k for k, v in ordering.items() if v and self.method != "gptq"]
        if misplaced:
            hint = " (AWQ takes damp_percent, mse and vision_weight with awq_rounding 'gptq')" if self.method == "awq" else ""
            raise ValueError(f"{', '.join(misplaced)}: GPTQ options, not for method {self.method}{hint}")
        if not (isinstance(self.mse, (int, float)) and math.isfinite(self.mse) and self.mse >= 0):
            raise ValueError(f"mse must be a finite number >= 0 (0: off; 2.4 is GPTQModel's), got {self.mse!r}")
        _finite_positive("vision_weight", self.vision_weight)
        if gptq_rounds:
            if self.damp_percent is None:
                object.__setattr__(self, "damp_percent", GPTQ_DAMP_PERCENT)
            _finite_positive("damp_percent", self.damp_percent)
            _finite_positive("damp_max", self.damp_max)
            if self.damp_percent > self.damp_max:
                raise ValueError(f"damp_percent {self.damp_percent:g} is above its limit damp_max {self.damp_max:g}")
        for name in ("block_size", "awq_grid", "awq_max_tokens"):
            _positive_int(name, getattr(self, name))

    def _resolve_defaults(self) -> None:
        """Settings left None take their measured defaults: for GPTQ, act-order with static groups unless desc_act
        was given, and mse below GPTQ_MSE_BELOW_BITS bits; AWQ's rounding by bit width; for the others, off."""
        gptq = self.method == "gptq"
        if self.static_groups is None:
            static = gptq and self.desc_act is None and GPTQ_ACT_ORDER
            object.__setattr__(self, "static_groups", static)
        if self.desc_act is None:
            object.__setattr__(self, "desc_act", gptq and GPTQ_ACT_ORDER)
        if self.awq_rounding is None:
            below = self.method == "awq" and self.spec.bits < AWQ_GPTQ_ROUNDING_BELOW_BITS
            object.__setattr__(self, "awq_rounding", "gptq" if below else "rtn")
        if self.mse is None:
            object.__setattr__(self, "mse", GPTQ_MSE if gptq and self.spec.bits < GPTQ_MSE_BELOW_BITS else 0.0)


@dataclasses.dataclass(frozen=True)
class CalibSource:
    """Which calibration samples: 'demo', 'easyvqa', a .json/.jsonl file, an image folder, or hf:PATH_OR_ID."""

    source: str = "demo"
    num_samples: int = 64
    seed: int = 0
    split: str = "train"  # hf: datasets
    columns: tuple[tuple[str, str | None], ...] = (("image", "image"), ("question", "question"),
                                                   ("answer", "answer"), ("text", None))

    def __post_init__(self):
        _positive_int("num_samples", self.num_samples)


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Where the layer, its statistics and the math live. ``dtype`` None: float32 on the CPU, bfloat16 layer
    weights on a GPU (Hessians and statistics summed in float64, solved in float32). ``offload``: where the calibration
    activations wait between layers (auto: on the device when they fit)."""

    device: str = "auto"
    dtype: str | None = None
    offload: str = "auto"
    threads: int | None = None  # CPU threads; None: the machine's real CPU quota

    def __post_init__(self):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD)}, got {self.offload!r}")
        _positive_int("threads", self.threads, allow_none=True)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    format: str = "auto"  # auto: GPTQ layout (rtn, gptq) or AWQ GEMM (awq); or compressed-tensors
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False  # replace an existing --output that is not a qvlquant export
    protected: tuple[str, ...] = ()  # never replaced by the output, overwrite or not (set from the job's inputs)

    def __post_init__(self):
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        _positive_int("max_shard_bytes", self.max_shard_bytes)

    def pack_format(self, method: str) -> PackFormat:
        if self.format == "compressed-tensors":
            return PackFormat.COMPRESSED
        return PackFormat.AWQ_GEMM if method == "awq" else PackFormat.GPTQ


@dataclasses.dataclass(frozen=True)
class JobConfig:
    output: str
    model: str = "demo"
    quant: QuantConfig = QuantConfig()
    calib: CalibSource = CalibSource()
    processing: CalibConfig = CalibConfig()
    device: DeviceConfig = DeviceConfig()
    export: ExportConfig = ExportConfig()
    pad_intermediate_to: int | None = None  # zero-pad the MLP intermediate size to a multiple of this
    trust_remote_code: bool = False
    resume: bool = True
    max_layers: int | None = None  # stop after this many layers (measurement); the partial run stays resumable
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if not str(self.output).strip():
            raise ValueError("output must name a folder")
        _positive_int("pad_intermediate_to", self.pad_intermediate_to, allow_none=True)
        _positive_int("max_layers", self.max_layers, allow_none=True)
        spec, fmt = self.quant.spec, self.export.pack_format(self.quant.method)
        if fmt is PackFormat.AWQ_GEMM and (spec.bits != 4 or spec.sym):
            raise ValueError("AWQ exports the AWQ GEMM format: 4-bit with zero point (asymmetric) only; "
                             "use --format compressed-tensors for other widths")
        if fmt is PackFormat.COMPRESSED and self.quant.desc_act and not self.quant.static_groups:
            raise ValueError("the compressed-tensors export stores contiguous groups only: add --static-groups "
                             "to --desc-act, or use the GPTQ format")

    @property
    def pack_format(self) -> PackFormat:
        return self.export.pack_format(self.quant.method)

    def to_dict(self) -> dict:
        """JSON-ready settings (what the report records)."""
        return dataclasses.asdict(self)

    def result_settings(self) -> dict:
        """The settings that decide the exported tensors (what resume fingerprints): not where the output goes,
        whether it may be overwritten, resumed, stopped early, or how many threads compute it."""
        d = self.to_dict()
        for key in ("output", "resume", "max_layers"):
            d.pop(key)
        d["export"].pop("overwrite")
        d["export"].pop("protected")
        d["device"].pop("threads")
        return d

    @classmethod
    def from_flat(cls, **flat) -> "JobConfig":
        """From flat settings named like the quantize flags; unknown names are an error naming them."""
        flat = {k: v for k, v in flat.items() if v is not None}
        unknown = sorted(set(flat) - FLAT_KEYS)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {', '.join(sorted(FLAT_KEYS))}")
        pick = lambda names: {n: flat[n] for n in names if n in flat}  # noqa: E731
        quant = pick(_QUANT_KEYS)
        spec_keys = {k: quant.pop(k) for k in ("bits", "group_size", "sym") if k in quant}
        method = quant.get("method", "rtn")
        if spec_keys:
            default = QuantSpec(4, 128, sym=method != "awq")
            quant["spec"] = QuantSpec(spec_keys.get("bits", default.bits), spec_keys.get("group_size", default.group_size),
                                      spec_keys.get("sym", default.sym))
        columns = dict(CalibSource.columns)
        columns.update({k[: -len("_column")]: flat[k] for k in _COLUMN_KEYS if k in flat})
        calib = pick(("num_samples", "seed", "split"))
        if "calib" in flat:
            calib["source"] = flat["calib"]
        export = pick(("overwrite", "max_shard_bytes"))
        if "export_format" in flat:
            export["format"] = flat["export_format"]
        return cls(
            quant=QuantConfig(**quant),
            calib=CalibSource(columns=tuple(columns.items()), **calib),
            processing=CalibConfig(**pick(_PROCESSING_KEYS)),
            device=DeviceConfig(**pick(("device", "dtype", "offload", "threads"))),
            export=ExportConfig(**export),
            **pick(("output", "model", "pad_intermediate_to", "trust_remote_code", "resume", "max_layers")),
        )


_QUANT_KEYS = ("method", "bits", "group_size", "sym", "damp_percent", "damp_max", "block_size", "desc_act",
               "static_groups", "true_sequential", "awq_grid", "awq_clip", "awq_max_tokens", "awq_rounding",
               "mse", "vision_weight")
_COLUMN_KEYS = ("image_column", "question_column", "answer_column", "text_column")
_PROCESSING_KEYS = ("max_length", "min_pixels", "max_pixels", "batch_size", "allow_urls")
FLAT_KEYS = frozenset(_QUANT_KEYS + _COLUMN_KEYS + _PROCESSING_KEYS + (
    "calib", "num_samples", "seed", "split", "device", "dtype", "offload", "threads", "overwrite", "max_shard_bytes",
    "export_format", "output", "model", "pad_intermediate_to", "trust_remote_code", "resume", "max_layers"))
