"""NVFP4 (e2m1 codes, e4m3 scales per 16 inputs, one float32 global scale) as small pure tensor functions: the
weights of llm-compressor's NVFP4A16 and NVFP4 (W4A4), stored as compressed-tensors ``nvfp4-pack-quantized``, and
the activation quantization NVFP4 W4A4 kernels apply at run time.

N = out_features, K = in_features (a multiple of ``GROUP``). Every function runs on the device its inputs are on.

- ``weight_packed`` [N, K/2] uint8: two 4-bit codes per byte, input column 2j in the low nibble and 2j+1 in the
  high one (compressed-tensors' ``pack_fp4_to_uint8``). A code is bit 3 the sign, bits 0-2 the index of its
  magnitude in ``E2M1_GRID``.
- ``weight_global_scale`` [1] float32: ``448 * 6 / amax`` (e4m3's and e2m1's largest values over the weight's
  largest magnitude). It is stored as that multiplier, not its reciprocal: compressed-tensors divides the group
  scale by it when it dequantizes, and vLLM takes ``1 / weight_global_scale`` when it loads the layer.
- ``weight_scale`` [N, K/16] float8_e4m3fn: ``global * group_amax / 6`` rounded to e4m3, so that
  ``w ~= e2m1(code) * (weight_scale / weight_global_scale)`` group by group (compressed-tensors' dequantize, in that
  order of operations).

Linears that vLLM fuses (q/k/v, gate/up) must share one global scale (vLLM keeps the largest and warns): the
caller passes the group's ``global_scale`` from the largest amax of its linears, as llm-compressor does.
Rounding is to the nearest grid value, ties to the even code (the thresholds compressed-tensors uses).

- Activations (W4A4): ``input_global_scale`` [1] float32 = ``global_scale`` of the largest |x| a linear received in
  calibration (llm-compressor's static_minmax observer); at run time each token's groups of 16 get an e4m3 scale
  ``input_global_scale * group_amax / 6`` and e2m1 codes, computed as vLLM's ``ref_nvfp4_quant`` computes them
  (``fake_quantize_activations``).
"""

from __future__ import annotations

import torch

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitude of code i (bit 3 is the sign)
E2M1_MAX = 6.0
SIGN_BIT = 8
GROUP = 16  # inputs per e4m3 group scale
SCALE_DTYPE = torch.float8_e4m3fn
SCALE_MAX = float(torch.finfo(SCALE_DTYPE).max)  # 448
SCALE_MIN = 2.0**-9  # the smallest positive e4m3 (subnormal): a group scale never rounds to 0
# Midpoints between neighbouring grid values, and whether a tie goes up (the upper code is even): the codes 0, 2,
# 4, 6 have an even mantissa, so round-half-to-even in e2m1 sends 0.25 to 0, 0.75 to 1, 1.25 to 1, 1.75 to 2, ...
_MIDPOINTS = tuple((lo + hi) / 2 for lo, hi in zip(E2M1_GRID, E2M1_GRID[1:]))
_TIE_UP = tuple((i + 1) % 2 == 0 for i in range(len(_MIDPOINTS)))


def check_shape(w: torch.Tensor, name: str) -> None:
    """A ValueError naming ``name`` unless ``w`` is a finite [N, K] weight with K a multiple of ``GROUP``."""
    if w.dim() != 2 or w.shape[1] % GROUP:
        raise ValueError(f"{name} is {list(w.shape)}: NVFP4 needs a 2-D weight whose in_features divide into groups "
                         f"of {GROUP}; leave this model to FP8 or the integer methods")
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name} holds NaN or infinite values ({bad} of {w.numel()}); the base model is damaged "
                         "(re-download it); nothing was exported")


def global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """The largest |w| of a weight (or of the linears fused with it) -> ``weight_global_scale`` [1] float32,
    ``448 * 6 / amax``; 1 for an all-zero weight (its group scales and codes are then all zero anyway)."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    scale = SCALE_MAX * E2M1_MAX / amax
    return torch.where(torch.isfinite(scale) & (amax > 0), scale, torch.ones_like(scale))


def weight_amax(w: torch.Tensor) -> float:
    """The largest magnitude of ``w``: what ``global_scale`` reads (the max over a fused group's linears)."""
    return float(w.abs().max()) if w.numel() else 0.0


def group_scales(w: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """[N, K] and the global scale [1] -> ``weight_scale`` [N, K/16] e4m3: each group's ``amax / 6`` times the
    global scale, rounded to e4m3 (at least ``SCALE_MIN``, at most 448)."""
    n, k = w.shape
    amax = w.float().abs().view(n, k // GROUP, GROUP).amax(-1)  # [N, K/16]
    return (amax / E2M1_MAX * gscale.float()).clamp(SCALE_MIN, SCALE_MAX).to(SCALE_DTYPE)


def effective_scales(scale: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """(``weight_scale`` [N, G] e4m3, global [1]) -> the multiplier of each group's codes, [N, G] float32, computed as
    compressed-tensors computes it (``scale / global_scale``)."""
    return scale.float() / gscale.float()


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Float values (already divided by their group's scale) -> 4-bit codes [same shape] uint8: the nearest value
    of +-``E2M1_GRID`` (saturating at 6), ties to the even code; zero is always code 0 (no negative zero)."""
    mag = x.float().abs()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for mid, up in zip(_MIDPOINTS, _TIE_UP):
        index += (mag >= mid) if up else (mag > mid)
    sign = ((x < 0) & (index > 0)).to(torch.uint8) * SIGN_BIT
    return index | sign


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, 0-15) -> their values, float32."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    value = grid[(codes & 7).long()]
    return torch.where((codes & SIGN_BIT) > 0, -value, value)


def quantize(w: torch.Tensor, gscale: torch.Tensor | None = None,
             name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (codes [N, K] uint8, weight_scale [N, K/16] e4m3, weight_global_scale [1] float32). ``gscale``:
    the global scale of the linears fused with this one (None: from ``w`` alone)."""
    check_shape(w, name)
    n, k = w.shape
    gscale = global_scale(weight_amax(w)) if gscale is None else gscale.float().reshape(1)
    scale = group_scales(w, gscale)  # [N, K/16]
    step = effective_scales(scale, gscale)  # [N, K/16] float32
    codes = round_to_e2m1(w.float().view(n, k // GROUP, GROUP) / step.unsqueeze(-1)).view(n, k)
    return codes, scale, gscale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """(codes [N, K] uint8, weight_scale [N, K/16] e4m3, global [1]) -> [N, K] float32."""
    n, k = codes.shape
    if tuple(scale.shape) != (n, k // GROUP) or k % GROUP:
        raise ValueError(f"weight_scale is {list(scale.shape)}, a [{n}, {k}] NVFP4 weight needs [{n}, {k // GROUP}] "
                         f"(one e4m3 scale per {GROUP} inputs)")
    step = effective_scales(scale, gscale)  # [N, K/16]
    return (e2m1_values(codes).view(n, k // GROUP, GROUP) * step.unsqueeze(-1)).view(n, k)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] uint8 -> ``weight_packed`` [N, K/2] uint8: column 2j in the low nibble, 2j+1 in the high."""
    n, k = codes.shape
    if k % 2:
        raise ValueError(f"cannot pack {k} 4-bit codes per row into whole bytes")
    pairs = codes.view(n, k // 2, 2)
    return (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack``: [N, K/2] uint8 -> codes [N, K] uint8."""
    n, half = packed.shape
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(n, 2 * half)


def fake_quantize_activations(x: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """Activations ``x`` [..., K] (K a multiple of ``GROUP``) through NVFP4 with the input global scale ``gscale``
    [1] and back, in ``x``'s dtype: per token and group of 16, the e4m3 scale ``gscale * (amax * (1/6))`` (0 when
    it rounds to 0), the inputs times ``1 / (scale * (1 / gscale))`` saturated at 6 and rounded to e2m1, times
    ``scale / gscale``: vLLM's ``ref_nvfp4_quant`` and its dequantize, in that order of operations."""
    k = x.shape[-1]
    if k % GROUP:
        raise ValueError(f"NVFP4 activations need a multiple of {GROUP} inputs, got {k}")
    gs = gscale.float().reshape(()).to(x.device)
    groups = x.float().reshape(-1, k // GROUP, GROUP)  # [T, K/16, 16]
    amax = groups.abs().amax(-1, keepdim=True)  # [T, K/16, 1]
    scale = (gs * (amax * (1.0 / E2M1_MAX))).clamp(-SCALE_MAX, SCALE_MAX).to(SCALE_DTYPE).float()
    step = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / (scale * (1.0 / gs)))
    codes = round_to_e2m1((groups * step).clamp(-E2M1_MAX, E2M1_MAX))
    return (e2m1_values(codes) * (scale / gs)).reshape(x.shape).to(x.dtype)
