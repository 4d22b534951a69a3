"""Packed on-disk layouts of quantized linears: one Enum value, one pack and one unpack function each.

K = in_features, N = out_features, G = number of groups, b = bits.

- ``GPTQ`` (AutoGPTQ "v1" on disk, what transformers/optimum/gptqmodel and vLLM's gptq_marlin read):
  ``qweight`` [K*b/32, N] int32, codes packed along K as a little-endian bit stream (so 3-bit codes cross word
  boundaries exactly as AutoGPTQ writes them); ``qzeros`` [G, N*b/32] int32, packed the same way along N and storing
  ``zero - 1``; ``scales`` [G, N] fp16; ``g_idx`` [K] int32, the group of each input column (act-order permutes it).
- ``AWQ_GEMM`` (AutoAWQ GEMM, ``version: gemm``; 4-bit only): ``qweight`` [K, N/8] int32 packed along N with the
  interleaved order ``AWQ_PACK_ORDER``; ``qzeros`` [G, N/8] packed the same way, storing the zero itself;
  ``scales`` [G, N] fp16. No g_idx: groups are contiguous.
- ``COMPRESSED`` (compressed-tensors ``pack-quantized``, llm-compressor's output and vLLM's native format):
  ``weight_packed`` [N, K*b/32] int32, codes packed along K as a little-endian bit stream (compressed-tensors stores
  signed codes shifted by 2**(b-1), which are exactly our unsigned codes); ``weight_scale`` [N, G];
  ``weight_zero_point`` [N*b/32, G] packed along N (asymmetric only; symmetric means zero point 0 signed);
  ``weight_shape`` [2] int64. Contiguous groups only.
"""

from __future__ import annotations

import dataclasses
import enum
import sys

import torch

from qvlquant.quant import fp8, int8, nvfp4
from qvlquant.quant.rtn import default_g_idx, dequantize, expand_groups, row_blocks, rtn_quantize
from qvlquant.quant.spec import QuantSpec

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column n0 + AWQ_PACK_ORDER[i] goes to nibble i of a word
EXPORT_FORMATS = ("auto", "compressed-tensors")  # what --format names; auto: the method's own layout


@dataclasses.dataclass
class QuantizedWeight:
    """A quantized linear weight before packing. q [N, K] int32; scale/zero [N, G] fp32; g_idx [K] int32."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    spec: QuantSpec
    # AWQ: the linear's input was divided by this [K] (folded into the previous op); None when nothing was folded.
    input_scale: torch.Tensor | None = None
    # AWQ: the linear's outputs were divided by this [N] (it is the previous op of a folded group); None otherwise.
    output_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """-> [N, K] fp32."""
        return dequantize(self.q, expand_groups(self.scale, self.g_idx), expand_groups(self.zero, self.g_idx))

    def effective_weight(self) -> torch.Tensor:
        """The weight in the original model's terms: dequantize() / input_scale * output_scale. -> [N, K] fp32."""
        w = self.dequantize()
        if self.input_scale is not None:
            w = w / self.input_scale.view(1, -1).float()
        if self.output_scale is not None:
            w = w * self.output_scale.view(-1, 1).float()
        return w


def is_contiguous_groups(g_idx: torch.Tensor, spec: QuantSpec, in_features: int) -> bool:
    """Whether ``g_idx`` [K] is the default one (input column k in group k // group_size), i.e. no act-order
    permutation: what the AWQ and compressed-tensors layouts can store and the fused kernel's fast path reads."""
    return torch.equal(g_idx.long().cpu(), default_g_idx(in_features, spec).long())


class PackFormat(str, enum.Enum):
    GPTQ = "gptq"
    AWQ_GEMM = "awq_gemm"
    COMPRESSED = "pack_quantized"

    @classmethod
    def for_job(cls, method: str, export_format: str = "auto") -> PackFormat:
        """The one rule from a job's method and --format to the layout its linears are packed in: compressed-tensors
        when asked, else the method's own (AWQ GEMM for awq, the GPTQ layout for rtn and gptq). Whether the grid
        fits the layout (AWQ GEMM: 4-bit asymmetric) is the job config's check."""
        if export_format not in EXPORT_FORMATS:
            raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {export_format!r}")
        if export_format == "compressed-tensors":
            return cls.COMPRESSED
        return cls.AWQ_GEMM if method == "awq" else cls.GPTQ

    def pack(self, w: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {PackFormat.GPTQ: _pack_gptq, PackFormat.AWQ_GEMM: _pack_awq, PackFormat.COMPRESSED: _pack_compressed}[self](w)

    def unpack(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, in_features: int) -> QuantizedWeight:
        if self is PackFormat.GPTQ:
            return _unpack_gptq(tensors, spec, in_features)
        if self is PackFormat.COMPRESSED:
            return _unpack_compressed(tensors, spec)
        return _unpack_awq(tensors, spec)

    def row_axis(self, tensor: str) -> int | None:
        """The axis of the packed ``tensor`` that runs over the weight's rows (out_features): the packed tensors of
        consecutive blocks of rows, each a multiple of 32 rows, join along it into those of the whole weight. None
        for a tensor that is not per row (``g_idx``, ``weight_shape``)."""
        if tensor in ("g_idx", "weight_shape"):
            return None
        return 0 if self is PackFormat.COMPRESSED else 1

    def tensor_shapes(self, k: int, n: int, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the packed tensors of a [N, K] linear."""
        b, g = spec.bits, spec.groups(k)
        if self is PackFormat.GPTQ:
            return {"qweight": ((k * b // 32, n), torch.int32), "qzeros": ((g, n * b // 32), torch.int32),
                    "scales": ((g, n), torch.float16), "g_idx": ((k,), torch.int32)}
        if self is PackFormat.AWQ_GEMM:
            return {"qweight": ((k, n // 8), torch.int32), "qzeros": ((g, n // 8), torch.int32),
                    "scales": ((g, n), torch.float16)}
        shapes = {"weight_packed": ((n, k * b // 32), torch.int32), "weight_scale": ((n, g), torch.float16),
                  "weight_shape": ((2,), torch.int64)}
        if not spec.sym:
            shapes["weight_zero_point"] = ((n * b // 32, g), torch.int32)
        return shapes


def pack_rtn(w: torch.Tensor, spec: QuantSpec, fmt: PackFormat) -> dict[str, torch.Tensor]:
    """``fmt``'s packed tensors of the round-to-nearest of ``w`` [N, K] (any float dtype): the tensors
    ``fmt.pack(QuantizedWeight(*rtn_quantize(w.float(), spec), ...))`` gives, bit for bit, each block of rows
    (``row_blocks``, multiples of 32 rows: whole packed words along N) rounded and packed while it is in the cache,
    the blocks' packed tensors then joined (``row_axis``)."""
    n, k = w.shape
    g_idx = default_g_idx(k, spec)
    blocks = [fmt.pack(QuantizedWeight(*rtn_quantize(w[rows], spec), g_idx, spec)) for rows in row_blocks(w, 32)]
    out = {}
    for name, first in blocks[0].items():
        axis = fmt.row_axis(name)
        if axis is not None:
            out[name] = first if len(blocks) == 1 else torch.cat([b[name] for b in blocks], dim=axis)
        else:
            out[name] = torch.tensor([n, k], dtype=torch.int64) if name == "weight_shape" else first
    return out


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [L, M] along dim 0 as a little-endian bit stream. -> [L*bits/32, M] int32.

    Widths that divide 32 (2, 4, 8) fill each word with 32/bits whole codes, in int32 (a code shifted into the top
    bit wraps exactly as the stored word does). A transposed view (GPTQ's ``qweight`` packs ``q.t()``) holds each
    word's codes side by side in memory: they are packed into bytes (8/bits codes each, the low bits first) and
    each run of 4 bytes read as the little-endian int32 word they make, in place of a pass per code position (1.7x
    faster at 4 bits, 4.8x at 8). 3 bits, whose codes straddle words, goes through an explicit stream."""
    length, m = codes.shape
    if (length * bits) % 32:
        raise ValueError(f"cannot pack {length} {bits}-bit values into whole 32-bit words")
    if 32 % bits:
        return _pack_bits_stream(codes, bits)
    if m > 1 and codes.stride(0) == 1 and sys.byteorder == "little":
        ints = codes.to(torch.int32) if codes.is_floating_point() else codes  # integers wrap to their low byte
        rows = ints.t().to(torch.uint8) & (2**bits - 1)  # [M, length]: each word's codes adjacent
        per_byte = 8 // bits
        packed = rows.contiguous() if per_byte == 1 else rows[:, 0::per_byte] | (rows[:, 1::per_byte] << bits)
        for j in range(2, per_byte):
            packed |= rows[:, j::per_byte] << (bits * j)
        return packed.view(torch.int32).t().contiguous()  # [length * bits / 32, M]
    per = 32 // bits
    c = (codes.to(torch.int32) & (2**bits - 1)).contiguous().view(length // per, per, m)
    words = torch.zeros(length // per, m, dtype=torch.int32, device=c.device)
    for j in range(per):
        words |= c[:, j] << (bits * j)
    return words


def unpack_bits(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: [W, M] int32 -> [length, M] int32."""
    if 32 % bits:
        return _unpack_bits_stream(words, bits, length)
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(w.shape[0], per, w.shape[1], dtype=torch.int32)
    for j in range(per):
        out[:, j] = (w >> (bits * j)) & (2**bits - 1)
    return out.view(-1, w.shape[1])[:length]


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 with the same 32 bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_bits_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes whose width does not divide 32 (3 bits): 32 codes fill ``bits`` words exactly, so each run of 32 codes
    is placed code by code at bit offset ``bits * i`` of its run, a code that crosses a word boundary split across
    the two words. One pass per code position over [L/32, M] (no per-bit stream: 3-bit packing of a 7B layer took
    38 s that way; the codes are made contiguous first, so each position is one pass over adjacent memory)."""
    length, m = codes.shape
    if length % 32:
        raise ValueError(f"cannot pack {length} {bits}-bit values: runs of 32 codes fill whole words")
    c = (codes.to(torch.int64) & (2**bits - 1)).contiguous().view(length // 32, 32, m)
    words = torch.zeros(length // 32, bits, m, dtype=torch.int64)
    for i in range(32):
        word, shift = divmod(bits * i, 32)
        words[:, word] |= (c[:, i] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the high bits go to the next word
            words[:, word + 1] |= c[:, i] >> (32 - shift)
    return _as_int32(words.view(-1, m))  # [L*b/32, M]


def _unpack_bits_stream(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of ``_pack_bits_stream`` (``length`` codes, a multiple of 32)."""
    m = words.shape[1]
    w = (words.to(torch.int64) & 0xFFFFFFFF)[: length * bits // 32].view(length // 32, bits, m)
    out = torch.empty(length // 32, 32, m, dtype=torch.int64)
    for i in range(32):
        word, shift = divmod(bits * i, 32)
        code = w[:, word] >> shift
        if shift + bits > 32:
            code = code | (w[:, word + 1] << (32 - shift))
        out[:, i] = code & (2**bits - 1)
    return out.view(length, m).to(torch.int32)


def _pack_gptq(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    b = w.spec.bits
    zeros_minus_one = (w.zero.round().to(torch.int64) - 1) & (2**b - 1)  # v1 stores zero-1; loaders add it back
    return {
        "qweight": pack_bits(w.q.t(), b),  # [K*b/32, N]
        "qzeros": pack_bits(zeros_minus_one, b).t().contiguous(),  # [G, N*b/32]
        "scales": w.scale.t().contiguous().to(torch.float16),  # [G, N]
        "g_idx": w.g_idx.to(torch.int32).contiguous(),  # [K]
    }


def _unpack_gptq(t: dict[str, torch.Tensor], spec: QuantSpec, in_features: int) -> QuantizedWeight:
    b = spec.bits
    n = t["scales"].shape[1]
    q = unpack_bits(t["qweight"], b, in_features).t().contiguous()  # [N, K]
    zero = (unpack_bits(t["qzeros"].t(), b, n).to(torch.int64) + 1) & (2**b - 1)  # [N, G]
    g_idx = t["g_idx"].to(torch.int32) if "g_idx" in t else default_g_idx(in_features, spec)
    return QuantizedWeight(q, t["scales"].float().t().contiguous(), zero.float(), g_idx, spec)


def _awq_interleave(x: torch.Tensor) -> torch.Tensor:
    """[R, N] codes -> [R, N/8] int32 words, column n0 + AWQ_PACK_ORDER[i] in nibble i."""
    r, n = x.shape
    if n % 8:
        raise ValueError(f"AWQ GEMM packing needs out_features divisible by 8, got {n}")
    shifts = torch.empty(8, dtype=torch.int32)
    shifts[list(AWQ_PACK_ORDER)] = 4 * torch.arange(8, dtype=torch.int32)  # column n0 + p goes to nibble i, p = ORDER[i]
    cols = (x.to(torch.int32) & 0xF).contiguous().view(r, n // 8, 8)
    return (cols << shifts.to(cols.device)).sum(-1, dtype=torch.int32)  # no bits overlap: the sum is the OR


def _awq_deinterleave(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    nibbles = (w.unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF  # [R, N/8, 8] in pack order
    inverse = torch.argsort(torch.tensor(AWQ_PACK_ORDER))  # [0, 4, 1, 5, 2, 6, 3, 7]
    return nibbles[:, :, inverse].reshape(w.shape[0], -1).to(torch.int32)


def _check_awq(w: QuantizedWeight) -> None:
    if w.spec.bits != 4:
        raise ValueError(f"the AWQ GEMM format is 4-bit only, got {w.spec.bits} bits")
    if not is_contiguous_groups(w.g_idx, w.spec, w.q.shape[1]):
        raise ValueError("the AWQ GEMM format cannot store act-order (permuted g_idx); use the GPTQ format")


def _pack_awq(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    _check_awq(w)
    return {
        "qweight": _awq_interleave(w.q.t()),  # [K, N/8]
        "qzeros": _awq_interleave(w.zero.round().t()),  # [G, N/8]
        "scales": w.scale.t().contiguous().to(torch.float16),  # [G, N]
    }


def _unpack_awq(t: dict[str, torch.Tensor], spec: QuantSpec) -> QuantizedWeight:
    q = _awq_deinterleave(t["qweight"]).t().contiguous()  # [N, K]
    zero = _awq_deinterleave(t["qzeros"]).t().float()  # [N, G]
    return QuantizedWeight(q, t["scales"].float().t().contiguous(), zero, default_g_idx(q.shape[1], spec), spec)


def _pack_compressed(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    if not is_contiguous_groups(w.g_idx, w.spec, w.q.shape[1]):
        raise ValueError("the compressed-tensors export here stores contiguous groups only; quantize without --desc-act")
    packed = {
        "weight_packed": pack_bits(w.q.t(), w.spec.bits).t().contiguous(),  # [N, K*b/32]
        "weight_scale": w.scale.contiguous().to(torch.float16),  # [N, G]
        "weight_shape": torch.tensor(list(w.q.shape), dtype=torch.int64),
    }
    if not w.spec.sym:
        packed["weight_zero_point"] = pack_bits(w.zero.round(), w.spec.bits)  # [N*b/32, G]
    return packed


def _unpack_compressed(t: dict[str, torch.Tensor], spec: QuantSpec) -> QuantizedWeight:
    n, k = (int(v) for v in t["weight_shape"])
    q = unpack_bits(t["weight_packed"].t(), spec.bits, k).t().contiguous()  # [N, K]
    scale = t["weight_scale"].float()
    if spec.sym:
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        zero = unpack_bits(t["weight_zero_point"], spec.bits, n).float()
    return QuantizedWeight(q, scale, zero, default_g_idx(k, spec), spec)


class Fp8Format(str, enum.Enum):
    """FP8 e4m3 layouts of a quantized linear (``qvlquant.quant.fp8`` has the math). Beside ``PackFormat`` rather
    than in it: a PackFormat unpacks to integer codes on a ``QuantSpec`` grid (zero points, g_idx) that the layer
    loop replays and GPTQ / AWQ produce; an FP8 weight is floating codes with a scale grid of its own (2-D blocks),
    made from the weight alone, and its serving kernels also quantize the activations (``activation_group``).

    - ``BLOCK`` (Qwen's official FP8, ``quant_method: fp8``, ``weight_block_size: [128, 128]``): ``weight`` [N, K]
      e4m3, ``weight_scale_inv`` [ceil(N/128), ceil(K/128)] float32, the multiplier of its block.
    - ``CHANNEL`` (compressed-tensors ``float-quantized``, FP8_DYNAMIC): ``weight`` [N, K] e4m3, ``weight_scale``
      [N, 1] in ``scale_dtype`` (an export writes the model's dtype, as llm-compressor does).
    - ``TENSOR`` (compressed-tensors ``float-quantized``, llm-compressor's FP8 preset): ``weight`` [N, K] e4m3,
      ``weight_scale`` [1], and the calibrated ``input_scale`` [1] (``input_tensors``), both in ``scale_dtype``:
      activations are quantized statically, one scale per linear.
    """

    BLOCK = "fp8_block"
    CHANNEL = "fp8_channel"
    TENSOR = "fp8_tensor"

    @property
    def scale_name(self) -> str:
        return "weight_scale_inv" if self is Fp8Format.BLOCK else "weight_scale"

    @property
    def label(self) -> str:
        """What ``inspect`` calls a linear's setting in this layout."""
        scales = {Fp8Format.BLOCK: "128x128 blocks", Fp8Format.CHANNEL: "per-channel", Fp8Format.TENSOR: "per-tensor"}
        activations = "static per-tensor" if self.static_activations else "dynamic"
        return f"FP8 e4m3 {scales[self]}, {activations} activations"

    @property
    def activation_group(self) -> int | None:
        """Inputs per dynamic activation scale in the serving kernels: per token and group of 128 for blocks
        (vLLM's ``GroupShape(1, 128)``), per token for channels; None for TENSOR too, whose scale is static."""
        return fp8.BLOCK[1] if self is Fp8Format.BLOCK else None

    @property
    def static_activations(self) -> bool:
        """Whether the activation scale is calibrated and stored (``input_scale``) rather than computed per token."""
        return self is Fp8Format.TENSOR

    def pack(self, w: torch.Tensor, name: str = "weight", scale_dtype: torch.dtype = torch.float32,
             scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """A float weight [N, K] -> its weight tensors (``name`` is named in a non-finite error; ``scale_dtype``:
        CHANNEL's and TENSOR's scale, BLOCK's is always float32 as Qwen stores it; ``scale``: TENSOR's shared by
        the linears vLLM fuses, None: from ``w`` alone)."""
        if self is Fp8Format.BLOCK:
            q, s = fp8.quantize_blocks(w, name)
        elif self is Fp8Format.TENSOR:
            q, s = fp8.quantize_tensor(w, name, scale_dtype, scale)
        else:
            q, s = fp8.quantize_channels(w, name, scale_dtype)
        return {"weight": q, self.scale_name: s}

    def scale(self, w: torch.Tensor, name: str = "weight", scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``pack(w)[scale_name]`` without computing the codes (a streamed export writes the scale and the weight
        at different times: safetensors orders a file's tensors by dtype)."""
        if self is Fp8Format.TENSOR:
            fp8.check_finite(w, name)
            return fp8.tensor_scale(w.float().abs().max(), scale_dtype)
        return fp8.block_scales(w, name) if self is Fp8Format.BLOCK else fp8.channel_scales(w, name, scale_dtype)

    def unpack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stored tensors -> the weight they stand for, [N, K] float32."""
        if self is Fp8Format.BLOCK:
            return fp8.dequantize_blocks(tensors["weight"], tensors["weight_scale_inv"])
        if self is Fp8Format.TENSOR:
            return fp8.dequantize_tensor(tensors["weight"], tensors["weight_scale"])
        return fp8.dequantize_channels(tensors["weight"], tensors["weight_scale"])

    def tensor_shapes(self, k: int, n: int,
                      scale_dtype: torch.dtype = torch.float32) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the weight tensors of a [N, K] linear (what ``pack`` returns)."""
        if self is Fp8Format.BLOCK:
            return {"weight": ((n, k), fp8.FP8_DTYPE),
                    self.scale_name: ((-(-n // fp8.BLOCK[0]), -(-k // fp8.BLOCK[1])), torch.float32)}
        if self is Fp8Format.TENSOR:
            return {"weight": ((n, k), fp8.FP8_DTYPE), self.scale_name: ((1,), scale_dtype)}
        return {"weight": ((n, k), fp8.FP8_DTYPE), self.scale_name: ((n, 1), scale_dtype)}

    def input_tensors(self, scale_dtype: torch.dtype = torch.float32) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the calibrated activation tensors stored beside the weight ({}: dynamic)."""
        return {"input_scale": ((1,), scale_dtype)} if self.static_activations else {}

    def input_pack(self, amax: float, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The largest |x| a linear (or the group vLLM fuses it into) received in calibration -> ``input_tensors``."""
        return {"input_scale": fp8.tensor_scale(amax, scale_dtype)} if self.static_activations else {}


# --scheme: llm-compressor's preset names for the FP8 layouts (its FP8_BLOCK, FP8_DYNAMIC), quantized data-free
FP8_SCHEMES = {"FP8_BLOCK": Fp8Format.BLOCK, "FP8_DYNAMIC": Fp8Format.CHANNEL}


class Int8Format(str, enum.Enum):
    """INT8 W8A8 layouts of a quantized linear (``qvlquant.quant.int8`` has the math). Beside ``Fp8Format`` and
    for the same reasons: the codes come from the weight alone, one int8 per weight (nothing packed), and the
    serving kernels also quantize the activations (int8 per token, dynamic).

    - ``CHANNEL`` (compressed-tensors ``int-quantized``, llm-compressor's W8A8): ``weight`` [N, K] int8,
      ``weight_scale`` [N, 1] in ``scale_dtype`` (an export writes the model's dtype, as llm-compressor does).
    """

    CHANNEL = "int8_channel"

    @property
    def scale_name(self) -> str:
        return "weight_scale"

    @property
    def label(self) -> str:
        """What ``inspect`` calls a linear's setting in this layout."""
        return "INT8 per-channel, dynamic per-token int8 activations"

    @property
    def activation_group(self) -> int | None:
        """Inputs per dynamic activation scale: None, one scale per token."""
        return None

    def pack(self, w: torch.Tensor, name: str = "weight",
             scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """A float weight [N, K] -> the tensors stored for it (``name`` is named in a non-finite error)."""
        q, scale = int8.quantize_channels(w, name, scale_dtype)
        return {"weight": q, "weight_scale": scale}

    def scale(self, w: torch.Tensor, name: str = "weight", scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``pack(w)["weight_scale"]`` without computing the codes."""
        return int8.channel_scales(w, name, scale_dtype)

    def unpack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stored tensors -> the weight they stand for, [N, K] float32."""
        return int8.dequantize_channels(tensors["weight"], tensors["weight_scale"])

    def tensor_shapes(self, k: int, n: int,
                      scale_dtype: torch.dtype = torch.float32) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the stored tensors of a [N, K] linear."""
        return {"weight": ((n, k), torch.int8), "weight_scale": ((n, 1), scale_dtype)}

    def pack_quantized(self, w: QuantizedWeight, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Codes already on the int8 grid (the calibrated W8A8 path: GPTQ or round-to-nearest on
        ``int8.channel_qparams``, unsigned with zero 128, one group per row) -> the tensors ``pack`` stores."""
        if w.scale.shape[1] != 1 or not bool((w.zero == int8.GRID_ZERO).all()) or w.spec.bits != 8:
            raise ValueError(f"INT8 W8A8 stores symmetric 8-bit codes per channel (zero {int8.GRID_ZERO}, one scale "
                             f"a row), got {w.spec.bits} bits and scales {list(w.scale.shape)}")
        codes = w.q.to(torch.int32) - int8.GRID_ZERO  # [N, K] in [-128, 127]
        return {"weight": codes.to(torch.int8), "weight_scale": w.scale.to(scale_dtype).contiguous()}

    def unpack_quantized(self, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> QuantizedWeight:
        """Inverse of ``pack_quantized``: the stored tensors -> codes on the integer methods' conventions."""
        q = tensors["weight"].to(torch.int32) + int8.GRID_ZERO  # [N, K]
        scale = tensors["weight_scale"].float()  # [N, 1]
        return QuantizedWeight(q, scale, torch.full_like(scale, int8.GRID_ZERO), default_g_idx(q.shape[1], spec), spec)


# --scheme W8A8: llm-compressor's preset (INT8 weights per channel, INT8 activations per token, dynamic), data-free
W8A8_SCHEMES = {"W8A8": Int8Format.CHANNEL}


class Nvfp4Format(str, enum.Enum):
    """NVFP4 layouts of a quantized linear (``qvlquant.quant.nvfp4`` has the math). Beside ``Fp8Format`` for the same
    reason: floating codes with a scale grid of their own, made from the weight alone.

    - ``PACKED`` (compressed-tensors ``nvfp4-pack-quantized``, llm-compressor's NVFP4A16): ``weight_packed`` [N, K/2]
      uint8, two e2m1 codes a byte (the even column in the low nibble); ``weight_scale`` [N, K/16] e4m3, one per 16
      inputs; ``weight_global_scale`` [1] float32, ``448 * 6 / amax``, shared by the linears vLLM fuses.
      Weight-only: activations stay 16-bit.
    - ``W4A4`` (the same layout, llm-compressor's NVFP4 preset): those three tensors and the calibrated
      ``input_global_scale`` [1] float32 (``input_tensors``); activations are quantized to NVFP4 per 16 inputs at
      run time under it.
    """

    PACKED = "nvfp4_pack_quantized"
    W4A4 = "nvfp4_pack_quantized_w4a4"

    @property
    def static_activations(self) -> bool:
        """Whether a calibrated activation scale is stored (``input_global_scale``)."""
        return self is Nvfp4Format.W4A4

    @property
    def label(self) -> str:
        """What ``inspect`` calls a linear's setting in this layout."""
        return "FP4 e2m1 g16, " + ("NVFP4 activations" if self.static_activations else "16-bit activations")

    def pack(self, w: torch.Tensor, name: str = "weight",
             global_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """A float weight [N, K] -> the tensors stored for it (``global_scale``: the fused group's, None: ``w``'s)."""
        codes, scale, gscale = nvfp4.quantize(w, global_scale, name)
        return {"weight_packed": nvfp4.pack(codes), "weight_scale": scale, "weight_global_scale": gscale}

    def unpack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stored tensors -> the weight they stand for, [N, K] float32."""
        codes = nvfp4.unpack(tensors["weight_packed"])
        return nvfp4.dequantize(codes, tensors["weight_scale"], tensors["weight_global_scale"])

    def tensor_shapes(self, k: int, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the weight tensors of a [N, K] linear (what ``pack`` returns)."""
        return {"weight_packed": ((n, k // 2), torch.uint8),
                "weight_scale": ((n, k // nvfp4.GROUP), nvfp4.SCALE_DTYPE),
                "weight_global_scale": ((1,), torch.float32)}

    def input_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the calibrated activation tensors stored beside the weight ({}: weight-only)."""
        return {"input_global_scale": ((1,), torch.float32)} if self.static_activations else {}

    def input_pack(self, amax: float) -> dict[str, torch.Tensor]:
        """The largest |x| a linear (or the group vLLM fuses it into) received in calibration -> ``input_tensors``."""
        return {"input_global_scale": nvfp4.global_scale(amax)} if self.static_activations else {}


# --scheme: llm-compressor's preset name for weight-only NVFP4, quantized data-free
NVFP4_SCHEMES = {"NVFP4A16": Nvfp4Format.PACKED}
# every data-free --scheme (quantized straight from the checkpoint, no --calib)
DATAFREE_SCHEMES = {**FP8_SCHEMES, **W8A8_SCHEMES, **NVFP4_SCHEMES}
# --scheme presets whose activation scales come from calibration data (--calib): llm-compressor's FP8 (static
# per-tensor input scales) and NVFP4 (W4A4: an input global scale); weights still from the checkpoint alone
CALIBRATED_SCHEMES = {"FP8": Fp8Format.TENSOR, "NVFP4": Nvfp4Format.W4A4}
# every --scheme, and the one name of each layout
SCHEMES = {**DATAFREE_SCHEMES, **CALIBRATED_SCHEMES}
SCHEME_NAMES = {fmt: name for name, fmt in SCHEMES.items()}
