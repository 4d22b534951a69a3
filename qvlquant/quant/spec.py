"""What a quantization is: the integer grid (``QuantSpec``) and the method with its settings (``QuantConfig``),
with the per-method defaults chosen by measurement and every check of them. Frozen; validated here, once."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group per output row (per-channel)
    sym: bool = True

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per-channel), got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


METHODS = ("rtn", "gptq", "awq")
AWQ_ROUNDING = ("rtn", "gptq")
# MoE models, an expert the router sent fewer than min_expert_tokens calibration tokens: rounded to nearest ("rtn"),
# or calibrated on every token of its layer ("all_tokens", as llm-compressor's calibrate-all-experts does for every
# expert), its output still taken only for the tokens routed to it
RARE_EXPERTS = ("rtn", "all_tokens")
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
# Floors and ceilings of the numeric settings: each bounds time or memory, far from any useful value. A damping of
# 1e-320 took GPTQ 510 s instead of 20 (a thousand doublings before the Cholesky holds); beyond 10x the mean
# diagonal GPTQ is round-to-nearest. mse is the exponent p of |w - Q(w)|^p: below 1 it is no norm, above 10 float32
# under- or overflows and the search silently keeps min-max. The rest cap loops and buffers at 50-500x the defaults.
DAMP_MIN, DAMP_CEILING = 1e-6, 10.0
MSE_RANGE = (1.0, 10.0)
VISION_WEIGHT_RANGE = (1e-4, 1e4)
CEILINGS = {"block_size": 65536, "awq_grid": 1000, "awq_max_tokens": 2**18, "min_expert_tokens": 2**20}


def finite_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number above 0, got {value!r}")


def positive_int(name: str, value, allow_none: bool = False, ceiling: int | None = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r:.80}")
    if ceiling is not None and value > ceiling:
        raise ValueError(f"{name} must be at most {ceiling}, got {value}")


def within(name: str, value: float, low: float, high: float, why: str = "") -> None:
    """``value`` (already a finite number) in [low, high]."""
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value:g}{why}")


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
    # GPTQ / AWQ, MoE models: an expert that the router sent fewer calibration tokens is handled as ``rare_experts``
    # says (named in the report); 1: only the experts no token reached
    min_expert_tokens: int = 1
    rare_experts: str = "rtn"  # RARE_EXPERTS: round them to nearest, or calibrate them on all tokens of the layer

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
        if self.method == "rtn" and (self.min_expert_tokens != 1 or self.rare_experts != "rtn"):
            raise ValueError("min_expert_tokens, rare_experts: GPTQ / AWQ options (how rarely reached experts are "
                             "calibrated); RTN uses no calibration tokens")
        if self.rare_experts not in RARE_EXPERTS:
            raise ValueError(f"rare_experts must be one of {', '.join(RARE_EXPERTS)}, got {self.rare_experts!r:.80}")
        if misplaced:
            hint = " (AWQ takes damp_percent, mse and vision_weight with awq_rounding 'gptq')" if self.method == "awq" else ""
            raise ValueError(f"{', '.join(misplaced)}: GPTQ options, not for method {self.method}{hint}")
        self._check_numbers(gptq_rounds)

    def _check_numbers(self, gptq_rounds: bool) -> None:
        """Each number finite, of its type, and within its floor and ceiling (DAMP_MIN, MSE_RANGE, CEILINGS...)."""
        mse = self.mse
        if isinstance(mse, bool) or not isinstance(mse, (int, float)) or not math.isfinite(mse) or mse < 0:
            raise ValueError(f"mse must be a finite number >= 0 (0: off; 2.4 is GPTQModel's), got {mse!r:.80}")
        if mse and not MSE_RANGE[0] <= mse <= MSE_RANGE[1]:
            raise ValueError(f"mse must be 0 (off) or between {MSE_RANGE[0]:g} and {MSE_RANGE[1]:g} (the exponent p "
                             f"of |w - Q(w)|^p; 2.4 is GPTQModel's), got {mse:g}")
        finite_positive("vision_weight", self.vision_weight)
        within("vision_weight", self.vision_weight, *VISION_WEIGHT_RANGE)
        if gptq_rounds:
            if self.damp_percent is None:
                object.__setattr__(self, "damp_percent", GPTQ_DAMP_PERCENT)
            finite_positive("damp_percent", self.damp_percent)
            finite_positive("damp_max", self.damp_max)
            if self.damp_percent < DAMP_MIN:
                raise ValueError(f"damp_percent must be at least {DAMP_MIN:g} (a smaller damping only costs "
                                 f"Cholesky retries), got {self.damp_percent:g}")
            if self.damp_max > DAMP_CEILING:
                raise ValueError(f"damp_max must be at most {DAMP_CEILING:g} (beyond it GPTQ is round-to-nearest), "
                                 f"got {self.damp_max:g}")
            if self.damp_percent > self.damp_max:
                raise ValueError(f"damp_percent {self.damp_percent:g} is above its limit damp_max {self.damp_max:g}")
        for name, ceiling in CEILINGS.items():
            positive_int(name, getattr(self, name), ceiling=ceiling)

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
            object.__setattr__(self, "awq_rounding", default_awq_rounding(self.method, self.spec.bits))
        if self.mse is None:
            object.__setattr__(self, "mse", GPTQ_MSE if gptq and self.spec.bits < GPTQ_MSE_BELOW_BITS else 0.0)


def default_awq_rounding(method: str, bits: int) -> str:
    """The rounding after AWQ's scales when none is given: gptq below AWQ_GPTQ_ROUNDING_BELOW_BITS bits, else rtn
    (rtn for the other methods, which take no AWQ rounding)."""
    return "gptq" if method == "awq" and bits < AWQ_GPTQ_ROUNDING_BELOW_BITS else "rtn"


def resolved_by_bits(method: str, name: str, widths, **given) -> dict[int, object]:
    """What QuantConfig resolves setting ``name`` to for ``method`` at each bit width in ``widths`` (the method's
    default spec at that width; every other setting its default, or as ``given``). -> {bits: value}: the one
    source of the defaults ``qvlquant quantize --help`` shows, so the help cannot drift from the resolution."""
    spec = QuantConfig(method).spec
    return {b: getattr(QuantConfig(method, dataclasses.replace(spec, bits=b), **given), name) for b in widths}
