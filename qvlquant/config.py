"""Every setting of a quantization job, as frozen dataclasses, with the per-method defaults and every check here.

``JobConfig`` is what ``qvlquant.quantize`` takes, what ``quantize_report.json`` records and what resume
fingerprints. It nests ``QuantConfig`` (the method), ``CalibSource`` (which samples), ``CalibConfig`` (how they are
turned into batches), ``DeviceConfig`` (where the math runs) and ``ExportConfig`` (what is written).
``JobConfig.from_flat`` builds one from flat settings named like the ``qvlquant quantize`` flags and recipe keys
(``bits=3, method="gptq", device="cuda"``); a setting left out or ``None`` takes its default.
"""

from __future__ import annotations

import dataclasses
import re

from qvlquant.assets.paths import EMBEDDED_MODELS
from qvlquant.calib.dataset import CalibConfig
from qvlquant.quant.formats import (
    CALIBRATED_SCHEMES,
    DATAFREE_SCHEMES,
    EXPORT_FORMATS,
    FP8_SCHEMES,
    NVFP4_SCHEMES,
    SCHEMES,
    Fp8Format,
    Int8Format,
    Nvfp4Format,
    PackFormat,
    W8A8_SCHEMES,
)
from qvlquant.quant.rules import (
    ModulePlan,
    Rule,
    config_with,
    packed_bits,
    parse_rule,
    rule_from_mapping,
)
from qvlquant.quant.spec import QuantConfig, QuantSpec, default_awq_rounding, finite_positive, positive_int

# --smoothing-strength (SmoothQuant's migration strength alpha, calibrated --scheme W8A8 and NVFP4): a number in
# [0, 1], "auto" (W8A8 only: searched per layer and smoothing group for the least W8A8 output error) or "off"; for
# W8A8 with --method gptq and no strength given, llm-compressor's SmoothQuantModifier default; for NVFP4 (W4A4) with
# none given, DEFAULT_NVFP4_SMOOTHING: the same 0.8, which keeps the test bed's outlier channels within qvlquant check
# and, beside 0.5, the lower and steadier answer KLs (docs/RESULTS.md "NVFP4 W4A4 with SmoothQuant")
SMOOTHING_WORDS = ("auto", "off")
DEFAULT_SMOOTHING = 0.8
DEFAULT_NVFP4_SMOOTHING = 0.8
SMOOTHED_SCHEMES = ("W8A8", "NVFP4")  # the schemes --smoothing-strength applies to (W8A8: when calibrated)
W8A8_METHODS = ("gptq", "rtn")  # what rounds the (smoothed) weights of a calibrated W8A8 export


def parse_strength(value) -> float | str | None:
    """A smoothing strength as given (a number, its text, "auto", "off", or None: not given) -> None, "auto",
    "off" or a float in [0, 1]; anything else is an error naming the value and what to give."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in SMOOTHING_WORDS:
        return value.strip().lower()
    try:
        alpha = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        alpha = None
    if alpha is None or not 0.0 <= alpha <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"smoothing_strength must be a number from 0 to 1 (SmoothQuant's alpha; 0.8 is "
                         f"llm-compressor's), 'auto' (searched per layer) or 'off', got {value!r:.40}")
    return alpha

CONFIG_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
OFFLOAD = ("auto", "device", "cpu")
DEFAULT_SHARD_BYTES = 5 * 2**30
# --pad-intermediate-to: a multiple of tensor-parallel ranks x group size (1024 for 8 x 128); the padded size may also
# be at most double the model's (engine.transforms.padded_size, checked with the model in hand)
MAX_PAD_MULTIPLE = 65536


@dataclasses.dataclass(frozen=True)
class CalibSource:
    """Which calibration samples: 'demo', 'easyvqa', a .json/.jsonl file, an image folder, or hf:PATH_OR_ID.
    None: chosen by ``JobConfig`` (the demo chats where they suffice, else an error asking for real data)."""

    source: str | None = None
    num_samples: int = 64
    seed: int = 0
    split: str = "train"  # hf: datasets
    columns: tuple[tuple[str, str | None], ...] = (("image", "image"), ("question", "question"),
                                                   ("answer", "answer"), ("text", None))

    def __post_init__(self):
        positive_int("num_samples", self.num_samples)


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
        positive_int("threads", self.threads, allow_none=True)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    format: str = "auto"  # auto: GPTQ layout (rtn, gptq) or AWQ GEMM (awq); or compressed-tensors
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False  # replace an existing --output that is not a qvlquant export
    protected: tuple[str, ...] = ()  # never replaced by the output, overwrite or not (set from the job's inputs)

    def __post_init__(self):
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        positive_int("max_shard_bytes", self.max_shard_bytes)


SKIP_BITS = 16  # the candidate that keeps a linear group in the checkpoint's dtype (sized at 16 bits per weight)
CANDIDATE_BITS = (2, 3, 4, 8, SKIP_BITS)
MEASURES = ("layer", "output")  # sensitivity: the decoder layer's output error, or the linear's (tr(dW H dW^T))
SEARCH_IN_ONE_PROCESS = ("--target-bits measures in one process: run it without --nproc / torchrun, then pass the "
                         "mixed_precision.yaml it writes with --recipe to a run with --nproc")
NOMINAL_SHAPE = 4096  # in = out features of the linear the job config sizes candidates on, before a model is read


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The sensitivity search (engine.sensitivity): with ``target_bits``, each linear group gets one of
    ``candidate_bits`` (16: kept in the checkpoint's dtype) at the job's group size and sym, chosen to least summed
    ``measure`` error at that average of bits per weight (scales and zeros counted) over the quantizable linears.
    ``candidate_bits`` may be given as text, ``"3,4,8,16"``."""

    target_bits: float | None = None
    candidate_bits: tuple[int, ...] = (3, 4, 8, SKIP_BITS)
    measure: str = "output"  # measured: ties "layer" at +0.25 and +0.5 bits, wins at 6.3 (mixed_precision_cpu.json)

    def __post_init__(self):
        if self.target_bits is not None:
            finite_positive("target_bits", self.target_bits)
        object.__setattr__(self, "candidate_bits", parse_candidates(self.candidate_bits))
        if self.measure not in MEASURES:
            raise ValueError(f"sensitivity must be one of {', '.join(MEASURES)}, got {self.measure!r:.40}")

    @property
    def active(self) -> bool:
        return self.target_bits is not None


def parse_candidates(value) -> tuple[int, ...]:
    """``"3,4,8,16"`` or a sequence of widths -> sorted unique widths, each one of CANDIDATE_BITS."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = set()
    for item in items:
        try:
            bits = int(str(item).strip()) if not isinstance(item, bool) else None
        except ValueError:
            bits = None
        if bits not in CANDIDATE_BITS:
            raise ValueError(f"candidate_bits: {str(item).strip()!r:.20} is not one of "
                             f"{', '.join(map(str, CANDIDATE_BITS))} ({SKIP_BITS}: kept in the checkpoint's dtype)")
        out.add(bits)
    if not out:
        raise ValueError("candidate_bits: give at least one width, e.g. 3,4,8,16")
    return tuple(sorted(out))


def candidate_config(default: QuantConfig, bits: int) -> QuantConfig | None:
    """The settings candidate ``bits`` gives a linear: the job's at that width (None: kept, for SKIP_BITS)."""
    return None if bits == SKIP_BITS else config_with(default, Rule("candidate", settings=(("bits", bits),)))


def linear_bits(fmt: PackFormat, qcfg: QuantConfig | None, k: int, n: int, storage_bits: int = 16) -> int:
    """Bits a [N, K] linear takes with settings ``qcfg`` (None: kept at ``storage_bits`` per weight) in ``fmt``."""
    return n * k * storage_bits if qcfg is None else packed_bits(fmt, qcfg.spec, k, n)


def check_target_bits(target: float, sizes: dict[int, float], where: str) -> None:
    """``target`` (bits per weight) within what the candidates can reach: ``sizes`` maps each candidate width to
    its bits per weight, measured ``where`` (on a nominal shape, or the model's linears)."""
    low, high = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    name = lambda b: "16 (kept)" if b == SKIP_BITS else f"W{b}"  # noqa: E731
    if target < sizes[low]:
        raise ValueError(f"target_bits {target:g} is below the smallest candidate, {name(low)} at "
                         f"{sizes[low]:.4f} bits per weight with its scales {where}: raise the target or add a "
                         "narrower candidate_bits")
    if target > sizes[high]:
        raise ValueError(f"target_bits {target:g} is above the largest candidate, {name(high)} at "
                         f"{sizes[high]:.4f} bits per weight {where}: lower the target or add a wider candidate")


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
    # per-module precision (quant.rules): first match wins over runtime linear names; skip, or other settings
    rules: tuple[Rule, ...] = ()
    # llm-compressor's preset names, weights straight from the checkpoint: FP8_BLOCK / FP8_DYNAMIC / W8A8 /
    # NVFP4A16 data-free (no calibration), FP8 / NVFP4 with activation scales from calibration data (``calib``);
    # None: the integer methods of ``quant``
    scheme: str | None = None
    search: SearchConfig = SearchConfig()  # --target-bits: rules chosen by measured sensitivity (engine.sensitivity)
    # --scheme W8A8 calibrated: SmoothQuant's strength (parse_strength); None: not given (data-free W8A8, or
    # DEFAULT_SMOOTHING with --method gptq)
    smoothing_strength: float | str | None = None
    version: int = CONFIG_VERSION
    # the settings the caller gave, by flat name (``from_flat`` records them); None: read as those that differ from
    # their defaults (``given_settings``). What a scheme checks against what it takes; not a setting of the result,
    # so neither the report nor the fingerprint holds it
    given: frozenset[str] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "smoothing_strength", parse_strength(self.smoothing_strength))
        self._check_scheme()
        if self.scheme is None:
            refusal = method_refusal(self.given_settings(), self.quant.method, self.quant.awq_rounding,
                                     lambda key: flag_name(key, self))
            if refusal:
                raise ValueError(refusal)
        if not str(self.output).strip():
            raise ValueError("output must name a folder")
        positive_int("pad_intermediate_to", self.pad_intermediate_to, allow_none=True, ceiling=MAX_PAD_MULTIPLE)
        positive_int("max_layers", self.max_layers, allow_none=True)
        if self.calib.source is None and self.datafree_format is None:  # a data-free scheme reads none
            object.__setattr__(self, "calib", dataclasses.replace(self.calib, source=self._default_calib()))
        self._check_dataset_flags()
        object.__setattr__(self, "rules", tuple(self.rules))
        if not all(isinstance(r, Rule) for r in self.rules):
            raise ValueError("rules must be quant.rules.Rule values (parse_rule('PATTERN:bits=8') builds one)")
        fmt = self.pack_format
        check_fits_format(self.quant, fmt)
        for rule, qcfg in self.module_plan.rules:
            if qcfg is None:
                continue
            if fmt is PackFormat.AWQ_GEMM:
                raise ValueError(f"rule {rule.text()!r}: the AWQ GEMM format holds one width for every linear, so "
                                 "a rule may only skip (PATTERN:skip); use --format compressed-tensors for "
                                 "per-module bits, group size or sym")
            try:
                check_fits_format(qcfg, fmt)
            except ValueError as e:
                raise ValueError(f"rule {rule.text()!r}: {e}") from None
        if self.search.active:
            self._check_search(fmt)

    def _check_search(self, fmt: PackFormat) -> None:
        """--target-bits: a format that holds several widths, candidates it can store, a reachable target (on a
        nominal NOMINAL_SHAPE-square linear; the search checks again on the model's own linears)."""
        if fmt is PackFormat.AWQ_GEMM:
            raise ValueError("target_bits: the AWQ GEMM format holds one width (4-bit) for every linear, so there "
                             "is nothing to choose; use --format compressed-tensors for a per-module mix")
        sizes = {}
        for bits in self.search.candidate_bits:
            try:
                qcfg = candidate_config(self.quant, bits)
                if qcfg is not None:
                    check_fits_format(qcfg, fmt)
            except ValueError as e:
                raise ValueError(f"candidate_bits {bits}: {e}") from None
            sizes[bits] = linear_bits(fmt, qcfg, NOMINAL_SHAPE, NOMINAL_SHAPE) / NOMINAL_SHAPE**2
        check_target_bits(self.search.target_bits, sizes, f"(a {NOMINAL_SHAPE}x{NOMINAL_SHAPE} linear, group size "
                          f"{self.quant.spec.group_size}, {fmt.value})")

    @property
    def module_plan(self) -> ModulePlan:
        """The rules with the config each gives, checked against the method and each other (not yet against a
        model's linears: ``ModulePlan.resolve`` with the names does that before any data work)."""
        return ModulePlan.resolve(self.rules, self.quant)

    def _check_dataset_flags(self) -> None:
        """The split and the column names are read from hf: datasets only: given with another source (the demo
        chats, a .json file, an image folder) they would be silently unused, so they are an error naming them."""
        source = self.calib.source
        unused = sorted(self.given_settings() & {"split", *_COLUMN_KEYS}, key=_FLAT_ORDER.index)
        if unused and source is not None and not str(source).startswith("hf:"):
            names = ", ".join(flag_name(key, self) for key in unused)
            raise ValueError(f"{names} {'applies' if len(unused) == 1 else 'apply'} to hf: datasets only "
                             f"(--calib hf:PATH_OR_ID); --calib {source!r} is not one: drop "
                             f"{'it' if len(unused) == 1 else 'them'}")

    def _check_scheme(self) -> None:
        """A scheme takes only the settings in SCHEME_TAKES: the data-free ones (FP8_BLOCK, FP8_DYNAMIC, W8A8,
        NVFP4A16) none of the integer methods', calibration's or layout's; the calibrated ones (FP8, NVFP4) the
        calibration settings too; calibrated W8A8 (``w8a8_calibrated``) also its method and GPTQ's options. Any other
        setting the caller gave (``given_settings``: a value equal to the default counts) is an error naming its flag,
        the scheme and what to do, rather than a setting silently unused."""
        if self.scheme not in SMOOTHED_SCHEMES and self.smoothing_strength is not None:
            raise ValueError("smoothing_strength: SmoothQuant is for --scheme W8A8 (with --method gptq or rtn) and "
                             "--scheme NVFP4 (W4A4); "
                             + ("leave it out" if self.scheme is None else f"not for scheme {self.scheme}"))
        if self.scheme == "NVFP4" and self.smoothing_strength == "auto":
            raise ValueError("smoothing_strength auto searches for the least int8 (W8A8) output error; for --scheme "
                             "NVFP4 give a number from 0 to 1 (default "
                             f"{DEFAULT_NVFP4_SMOOTHING}) or off")
        if self.scheme is None:
            return
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.w8a8_calibrated and self.quant.method not in W8A8_METHODS:
            raise ValueError(f"scheme W8A8 rounds its (smoothed) weights with --method gptq or rtn, got "
                             f"{self.quant.method}; SmoothQuant (--smoothing-strength) moves the activation outliers, "
                             "AWQ's scales are for weight-only formats")
        takes = SCHEME_TAKES["w8a8" if self.w8a8_calibrated else "nvfp4" if self.scheme == "NVFP4" else
                             "calibrated" if self.scheme in CALIBRATED_SCHEMES else "datafree"]
        if self.w8a8_calibrated and self.quant.method != "gptq":
            takes -= set(_GPTQ_KEYS)  # rounded to nearest: GPTQ's options do not apply
        if self.smoothing_strength != "auto":
            takes -= {"awq_max_tokens"}  # only the strength search scores tokens
        if self.scheme in W8A8_SCHEMES and not self.w8a8_calibrated:
            takes |= {"method"}  # data-free W8A8 rounds to nearest: --method rtn names what it does
        if self.datafree_format is not None and self.device.device == "cpu":
            takes |= {"device"}  # a data-free scheme runs on the CPU: --device cpu names where
        refused = sorted(self.given_settings() - takes, key=_FLAT_ORDER.index)
        if refused:
            raise ValueError(self._refusal(refused))
        if self.w8a8_calibrated and self.smoothing_strength is None:
            object.__setattr__(self, "smoothing_strength", DEFAULT_SMOOTHING)
        if self.scheme == "NVFP4" and self.smoothing_strength is None:
            object.__setattr__(self, "smoothing_strength", DEFAULT_NVFP4_SMOOTHING)

    def _refusal(self, refused: list[str]) -> str:
        """The error for settings ``refused`` by the scheme: the flags, the scheme and what it is, what to do."""
        fmt = SCHEMES[self.scheme]
        if self.w8a8_calibrated:
            how = (f"calibrated: SmoothQuant, then {self.quant.method} on the fixed int8 grid, 8 bits per output "
                   "channel, symmetric, absmax / 127, in the data-free W8A8's format")
        elif self.scheme in CALIBRATED_SCHEMES:
            how = "weights from the checkpoint, activation scales from --calib, in its own format"
        else:
            how = "data-free: weights from the checkpoint, no calibration, in its own format"
        names = ", ".join(flag_name(key, self) for key in refused)
        one = len(refused) == 1
        hints, quant = [], set(refused) & set(_QUANT_KEYS)
        if self.w8a8_calibrated and quant & set(_GPTQ_KEYS):  # refused with --method rtn
            hints.append("GPTQ's options take --method gptq")
            quant -= set(_GPTQ_KEYS)
        if self.w8a8_calibrated and "awq_max_tokens" in quant:
            hints.append("awq_max_tokens is the token budget of --smoothing-strength auto's search")
            quant.discard("awq_max_tokens")
        if quant:
            bits = self.quant.spec.bits if "bits" in refused else None
            hints.append(f"for {bits}-bit integer weights leave out --scheme and use --method gptq --bits {bits}"
                         if bits else "for integer weights of your own bits, group size and symmetry leave out "
                         "--scheme and use --method rtn, gptq or awq")
        if set(refused) & set(_CALIB_KEYS):
            hints.append(f"only {' and '.join(CALIBRATED_SCHEMES)} take calibration data (the calibrated schemes)"
                         + ("; W8A8 calibrates with --method gptq or --smoothing-strength (SmoothQuant)"
                            if self.scheme in W8A8_SCHEMES else ""))
        if set(refused) & set(_LAYOUT_KEYS):
            hints.append("a scheme quantizes every decoder linear alike in its own format; per-module widths, "
                         "--format, padding and --target-bits are the integer methods'")
        if "max_layers" in refused:
            hints.append("only the layer loop of the integer methods and calibrated W8A8 stops after N layers")
        if set(refused) & set(_COMPUTE_KEYS):
            hints.append("a data-free scheme runs no layer: it quantizes each weight on the CPU as the export streams "
                         "it from the checkpoint (--device cpu may stay)"
                         + ("; W8A8 runs its layers on a device when calibrated (--method gptq or "
                            "--smoothing-strength)" if self.scheme in W8A8_SCHEMES else ""))
        return (f"{names} {'does' if one else 'do'} not apply to --scheme {self.scheme} ({fmt.label}; {how}): "
                f"drop {'it' if one else 'them'}" + "".join(f"; {hint}" for hint in hints))

    def given_settings(self) -> frozenset[str]:
        """The settings the caller gave, by their flat names (the quantize flags' with underscores): as
        ``from_flat`` recorded them, a value equal to its default included; for a JobConfig built field by field,
        those whose value differs from the default (a default value given there cannot be told apart)."""
        if self.given is not None:
            return self.given
        q, spec = self.quant, QuantConfig(self.quant.method).spec
        plain, calib, processing = QuantConfig(q.method, q.spec), CalibSource(), CalibConfig()
        values = [("method", q.method, "rtn"), *((k, getattr(q.spec, k), getattr(spec, k)) for k in _SPEC_KEYS),
                  *((k, getattr(q, k), getattr(plain, k)) for k in _QUANT_KEYS if k not in ("method", *_SPEC_KEYS)),
                  ("calib", self.calib.source, None),
                  *((k, getattr(self.calib, k), getattr(calib, k)) for k in ("num_samples", "seed", "split")),
                  *((f"{k}_column", v, dict(calib.columns).get(k)) for k, v in self.calib.columns),
                  *((k, getattr(self.processing, k), getattr(processing, k)) for k in _PROCESSING_KEYS),
                  ("export_format", self.export.format, ExportConfig.format),
                  ("target_bits", self.search.target_bits, None),
                  ("candidate_bits", self.search.candidate_bits, SearchConfig.candidate_bits),
                  ("sensitivity", self.search.measure, SearchConfig.measure),
                  *((k, getattr(self, k), None) for k in ("pad_intermediate_to", "max_layers", "smoothing_strength")),
                  ("rules", self.rules, ())]
        return frozenset(key for key, value, default in values if value != default)

    @property
    def w8a8_calibrated(self) -> bool:
        """Whether this is the calibrated INT8 W8A8 job: --scheme W8A8 with --method gptq or a smoothing strength
        (SmoothQuant, then GPTQ or round-to-nearest, in the data-free W8A8's layout)."""
        return self.scheme in W8A8_SCHEMES and (self.quant.method != "rtn" or self.smoothing_strength is not None)

    @property
    def smoothing(self) -> float | str | None:
        """SmoothQuant's strength the layer loop (calibrated W8A8) or the calibration pass (NVFP4) applies: a float
        or "auto"; None: no smoothing."""
        return None if self.smoothing_strength in (None, "off") else self.smoothing_strength

    @property
    def loop_quant(self) -> QuantConfig:
        """The method and grid the layer loop rounds with: the job's ``quant``; for calibrated W8A8, its method
        (and GPTQ options) on the int8 per-channel symmetric grid."""
        if not self.w8a8_calibrated:
            return self.quant
        return dataclasses.replace(self.quant, spec=QuantSpec(8, -1, sym=True))

    @property
    def fp8_format(self) -> Fp8Format | None:
        """The FP8 layout a data-free ``scheme`` names; None otherwise."""
        return FP8_SCHEMES.get(self.scheme)

    @property
    def datafree_format(self) -> Fp8Format | Int8Format | Nvfp4Format | None:
        """The layout a data-free ``scheme`` names (FP8, INT8 W8A8 or NVFP4); None for the integer methods and the
        calibrated schemes (and calibrated W8A8)."""
        return None if self.w8a8_calibrated else DATAFREE_SCHEMES.get(self.scheme)

    @property
    def nvfp4_format(self) -> Nvfp4Format | None:
        """The NVFP4 layout a data-free ``scheme`` names (NVFP4A16); None otherwise."""
        return NVFP4_SCHEMES.get(self.scheme)

    @property
    def calibrated_format(self) -> Fp8Format | Nvfp4Format | None:
        """The layout a calibrated ``scheme`` names (FP8: ``Fp8Format.TENSOR``, NVFP4: ``Nvfp4Format.W4A4``);
        None otherwise."""
        return CALIBRATED_SCHEMES.get(self.scheme)

    def _default_calib(self) -> str:
        """The demo's chats for the embedded models, and for RTN (which rounds without data; the samples only run
        through the layers to check that activations stay finite). GPTQ, AWQ and the calibrated schemes on any other
        model need real data: an error, as llm-compressor's and GPTQModel's GPTQ / AWQ ask for a dataset, rather than
        auto-round's silent text default, which calibrates a vision-language model on no images at all."""
        if str(self.model) in EMBEDDED_MODELS or (self.scheme is None and self.quant.method == "rtn"):
            return "demo"
        what = (f"scheme W8A8 with {self.quant.method} and SmoothQuant" if self.w8a8_calibrated else
                f"scheme {self.scheme} (its activation scales)" if self.scheme else self.quant.method)
        raise ValueError(f"{what} on {self.model} needs calibration data that looks like what the model "
                         "will serve: pass --calib FILE.jsonl (chats with images), an image folder with captions, or "
                         "hf:DATASET; '--calib easyvqa' or '--calib demo' pick the toy 64x64-shape chats on purpose")

    @property
    def pack_format(self) -> PackFormat:
        return PackFormat.for_job(self.quant.method, self.export.format)

    def to_dict(self) -> dict:
        """JSON-ready settings (what the report records); rules as a recipe writes them."""
        d = dataclasses.asdict(self)
        d.pop("given")
        d["rules"] = [rule.to_dict() for rule in self.rules]
        return d

    def result_settings(self) -> dict:
        """The settings that decide the exported tensors (what resume fingerprints): not where the output goes,
        whether it may be overwritten, resumed, stopped early, or how many threads compute it."""
        d = self.to_dict()
        for key in ("output", "resume", "max_layers"):
            d.pop(key)
        d["export"].pop("overwrite")
        d["export"].pop("protected")
        d["device"].pop("threads")
        if not d["rules"]:
            d.pop("rules")  # a job without rules fingerprints as it did before rules existed (its partial run resumes)
        if not self.search.active:
            d.pop("search")
        if self.smoothing_strength is None:
            d.pop("smoothing_strength")  # likewise for every job but calibrated W8A8  # likewise without a search (the search's own run quantizes with its rules, search off)
        return d

    @classmethod
    def from_flat(cls, **flat) -> "JobConfig":
        """From flat settings named like the quantize flags; unknown names are an error naming them."""
        flat = {k: v for k, v in flat.items() if v is not None and not (k == "rules" and not v)}
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
        if "scheme" not in flat:  # before QuantConfig's checks of the values, so the error names the flag given
            bits = quant["spec"].bits if "spec" in quant else QuantSpec.bits
            refusal = method_refusal(frozenset(flat), method,
                                     flat.get("awq_rounding") or default_awq_rounding(method, bits),
                                     lambda key: flag_name(key, value=flat[key]))
            if refusal:
                raise ValueError(refusal)
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
            rules=tuple(as_rule(r, i) for i, r in enumerate(flat.get("rules") or ())),
            search=SearchConfig(**{field: flat[key] for key, field in _SEARCH_KEYS.items() if key in flat}),
            **pick(("output", "model", "pad_intermediate_to", "trust_remote_code", "resume", "max_layers", "scheme",
                    "smoothing_strength")),
            given=frozenset(flat),
        )


def as_rule(value, index: int = 0) -> Rule:
    """A rule given as a Rule, as text (``PATTERN:bits=8`` / ``PATTERN:skip``) or as a recipe mapping."""
    if isinstance(value, Rule):
        return value
    if isinstance(value, str):
        return parse_rule(value)
    return rule_from_mapping(value, f"rules[{index}]")


def check_fits_format(qcfg: QuantConfig, fmt: PackFormat) -> None:
    """Whether the layout ``fmt`` can store what ``qcfg`` produces."""
    spec = qcfg.spec
    if fmt is PackFormat.AWQ_GEMM and (spec.bits != 4 or spec.sym):
        raise ValueError("AWQ exports the AWQ GEMM format: 4-bit with zero point (asymmetric) only; "
                         "use --format compressed-tensors for other widths")
    if fmt is PackFormat.COMPRESSED and qcfg.desc_act and not qcfg.static_groups:
        raise ValueError("the compressed-tensors export stores contiguous groups only: add --static-groups "
                         "to --desc-act, or use the GPTQ format")


_QUANT_KEYS = ("method", "bits", "group_size", "sym", "damp_percent", "damp_max", "block_size", "desc_act",
               "static_groups", "true_sequential", "awq_grid", "awq_clip", "awq_max_tokens", "awq_rounding",
               "mse", "vision_weight", "min_expert_tokens", "rare_experts")
_SPEC_KEYS = ("bits", "group_size", "sym")
_GPTQ_KEYS = ("damp_percent", "damp_max", "block_size", "desc_act", "static_groups", "true_sequential",
              "vision_weight", "min_expert_tokens", "rare_experts")
_SEARCH_KEYS = {"target_bits": "target_bits", "candidate_bits": "candidate_bits", "sensitivity": "measure"}
_COLUMN_KEYS = ("image_column", "question_column", "answer_column", "text_column")
_PROCESSING_KEYS = ("max_length", "min_pixels", "max_pixels", "batch_size", "allow_urls")
_CALIB_KEYS = ("calib", "num_samples", "seed", "split", *_COLUMN_KEYS, *_PROCESSING_KEYS)
# what the integer methods' layout takes and a scheme's own format does not
_LAYOUT_KEYS = ("export_format", "pad_intermediate_to", "rules", *_SEARCH_KEYS)
# every job's: which model, where it is written and how, where and on how many threads it computes
_ANY_JOB_KEYS = ("output", "model", "scheme", "trust_remote_code", "resume", "overwrite", "max_shard_bytes",
                 "device", "dtype", "offload", "threads")
_FLAT_ORDER = (*_QUANT_KEYS, *_CALIB_KEYS, *_LAYOUT_KEYS, *_ANY_JOB_KEYS, "max_layers", "smoothing_strength")
FLAT_KEYS = frozenset(_FLAT_ORDER)
# where the layer math runs and its activations wait: a data-free scheme runs no layer (it quantizes each weight on
# the CPU as the export streams it from the checkpoint), so it takes none of them but --device cpu
_COMPUTE_KEYS = ("device", "dtype", "offload")
# the settings each kind of --scheme job takes (JobConfig._check_scheme): a data-free scheme only what every job
# takes but _COMPUTE_KEYS; a calibrated one (FP8, NVFP4) its calibration data too; calibrated W8A8 also its method
# (gptq or rtn), GPTQ's options (with --method gptq), SmoothQuant's strength, awq_max_tokens (the tokens
# --smoothing-strength auto's search scores: with auto only) and --max-layers; NVFP4 (W4A4) the calibrated ones'
# and SmoothQuant's strength
SCHEME_TAKES = {
    "datafree": frozenset(_ANY_JOB_KEYS) - frozenset(_COMPUTE_KEYS),
    "calibrated": frozenset(_ANY_JOB_KEYS + _CALIB_KEYS),
    "nvfp4": frozenset(_ANY_JOB_KEYS + _CALIB_KEYS + ("smoothing_strength",)),
    "w8a8": frozenset(_ANY_JOB_KEYS + _CALIB_KEYS + _GPTQ_KEYS + ("method", "awq_max_tokens", "smoothing_strength",
                                                                   "max_layers")),
}
# how a flat setting is spelled on the quantize command line where it is not --NAME-WITH-DASHES (None: no flag, a
# Python API setting only); a switch by the value given (False, True)
_FLAGS = {"sym": ("--asym", "--sym"), "desc_act": ("--no-desc-act", "--desc-act"),
          "static_groups": ("--no-static-groups", "--static-groups"), "true_sequential": ("--no-true-sequential",) * 2,
          "resume": ("--no-resume",) * 2, "export_format": "--format", "rules": "--override / --ignore",
          "damp_max": None, "block_size": None, "awq_grid": None, "awq_clip": None, "awq_max_tokens": None,
          "max_shard_bytes": None}


def flag_name(key: str, job: JobConfig | None = None, value=True) -> str:
    """The quantize flag of flat setting ``key`` (``export_format`` -> ``--format``; ``sym`` -> ``--sym`` or
    ``--asym`` by ``job``'s value, else by ``value``); the key itself where no flag sets it (``block_size``)."""
    spelled = _FLAGS.get(key, "--" + key.replace("_", "-"))
    if isinstance(spelled, tuple):
        if job is not None:
            value = getattr(job.quant.spec if key == "sym" else job.quant, key, True)
        return spelled[bool(value)]
    return key if spelled is None else spelled


# The settings only some integer methods read (every other setting is every method's): GPTQ's rounding wherever GPTQ
# rounds (gptq; awq with awq_rounding gptq), its column order and layout with gptq alone (AWQ's GPTQ rounding keeps the
# columns in order), the handling of rarely reached MoE experts where calibration statistics are taken (gptq, awq),
# AWQ's own settings with awq, its clipping search only where AWQ rounds itself (awq_rounding rtn). A setting given
# that the job's method does not read is an error (``method_refusal``), even at its default.
_ROUNDING_KEYS = ("damp_percent", "damp_max", "block_size", "mse", "vision_weight")
_ORDER_KEYS = ("desc_act", "static_groups", "true_sequential")
_EXPERT_KEYS = ("min_expert_tokens", "rare_experts")
_AWQ_KEYS = ("awq_grid", "awq_clip", "awq_max_tokens", "awq_rounding")
METHOD_TAKES = {
    "rtn": frozenset(),
    "gptq": frozenset(_ROUNDING_KEYS + _ORDER_KEYS + _EXPERT_KEYS),
    "awq": frozenset(_AWQ_KEYS + _EXPERT_KEYS),  # awq_rounding rtn
    "awq+gptq": frozenset(_ROUNDING_KEYS + _EXPERT_KEYS + _AWQ_KEYS) - {"awq_clip"},
}
_METHOD_ONLY = frozenset().union(*METHOD_TAKES.values())
_SEARCH_ONLY = ("candidate_bits", "sensitivity")  # read by the --target-bits search alone
# what the job does, then where a refused setting does apply: the two halves of the error
_METHOD_DOES = {
    "rtn": "--method rtn rounds each weight to nearest, with no Hessian, column order, scale search or calibration "
           "statistics",
    "gptq": "--method gptq rounds with GPTQ, with no AWQ scales",
    "awq": "--method awq rounds its scaled weights with its own clipping search (--awq-rounding rtn)",
    "awq+gptq": "--method awq --awq-rounding gptq: GPTQ rounds the AWQ-scaled layer in column order, with no "
                "clipping search",
    "search": "without --target-bits nothing is searched",
}
_APPLIES = {
    **dict.fromkeys(("desc_act", "static_groups"), "GPTQ's act-order and its groups: --method gptq"),
    "true_sequential": "GPTQ's group-by-group Hessians: --method gptq",
    **dict.fromkeys(_ROUNDING_KEYS, "GPTQ's rounding: --method gptq, or --method awq --awq-rounding gptq"),
    **dict.fromkeys(_EXPERT_KEYS, "how GPTQ and AWQ calibrate rarely reached MoE experts: --method gptq or awq"),
    **dict.fromkeys(("awq_grid", "awq_max_tokens", "awq_rounding"), "AWQ's: --method awq"),
    "awq_clip": "the clipping search of AWQ's own rounding: --method awq --awq-rounding rtn",
    **dict.fromkeys(_SEARCH_ONLY, "the search's: add --target-bits B, or fix widths with --override"),
}


def method_refusal(given: frozenset[str], method: str, awq_rounding: str, flag) -> str | None:
    """The error for the settings in ``given`` that an integer ``method`` job (AWQ rounding with ``awq_rounding``)
    does not read (METHOD_TAKES), or that only the --target-bits search reads when no target is given; None when it
    reads them all. ``flag``: a flat name -> the flag the error names."""
    kind = "awq+gptq" if method == "awq" and awq_rounding == "gptq" else method
    if kind not in METHOD_TAKES:
        return None  # an unknown method: QuantConfig's error
    unread = given & _METHOD_ONLY - METHOD_TAKES[kind]
    if not unread and "target_bits" not in given:
        kind, unread = "search", given & set(_SEARCH_ONLY)
    if not unread:
        return None
    unread = sorted(unread, key=_FLAT_ORDER.index)
    where: dict[str, list[str]] = {}
    for key in unread:
        where.setdefault(_APPLIES[key], []).append(flag(key))
    return (f"drop {', '.join(map(flag, unread))}: {_METHOD_DOES[kind]}; "
            + "; ".join(f"{', '.join(flags)} {'is' if len(flags) == 1 else 'are'} {applies}"
                        for applies, flags in where.items()))
