import pytest
import torch

from qvlquant.quant.formats import (
    AWQ_PACK_ORDER,
    PackFormat,
    QuantizedWeight,
    is_contiguous_groups,
    pack_bits,
    pack_rtn,
    unpack_bits,
)
from qvlquant.quant import rtn
from qvlquant.quant.rtn import default_g_idx, rtn_quantize
from qvlquant.quant.spec import METHODS, QuantSpec


def quantized(n, k, spec, seed=0, act_order=False):
    torch.manual_seed(seed)
    q, scale, zero = rtn_quantize(torch.randn(n, k), spec)
    g_idx = default_g_idx(k, spec)
    if act_order:
        g_idx = g_idx[torch.randperm(k)]
    return QuantizedWeight(q, scale, zero, g_idx, spec)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 2**bits, (64, 5), dtype=torch.int32)
    words = pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 5)
    assert torch.equal(unpack_bits(words, bits, 64), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_whole_code_packing_equals_the_bit_stream(bits):
    """The fast path (whole codes per word) writes the same words as the explicit bit stream 3-bit packing uses,
    high codes (sign bit of the int32) included."""
    from qvlquant.quant.formats import _pack_bits_stream, _unpack_bits_stream

    codes = torch.randint(0, 2**bits, (256, 7), dtype=torch.int32)
    codes[-1] = 2**bits - 1  # the top code of the last word sets bit 31
    words = pack_bits(codes, bits)
    assert torch.equal(words, _pack_bits_stream(codes, bits)) and (words < 0).any()
    assert torch.equal(unpack_bits(words, bits, 256), _unpack_bits_stream(words, bits, 256))
    # a transposed view (GPTQ's qweight packs q.t()) takes the shift-and-sum path: the same words
    transposed = codes.t().contiguous().t()
    assert transposed.stride(0) == 1 and torch.equal(pack_bits(transposed, bits), words)
    assert torch.equal(pack_bits(transposed.float(), bits), words)  # codes held as floats (zero points)


def test_pack_bits_layout_matches_autogptq():
    # 4-bit: value j of a column sits at bits 4j..4j+3 of word j // 8
    codes = torch.arange(8, dtype=torch.int32).view(8, 1)
    assert pack_bits(codes, 4).item() == 0x76543210
    # 3-bit: the 11th value (index 10) straddles words 0 and 1 (bits 30-31, then bit 0), as AutoGPTQ packs it
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10] = 0b111
    words = pack_bits(codes, 3).view(-1).tolist()
    assert words[0] & 0xFFFFFFFF == 0b11 << 30 and words[1] == 1 and words[2] == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_round_trip_exact(bits, group_size, sym):
    w = quantized(64, 256, QuantSpec(bits, group_size, sym))
    packed = PackFormat.GPTQ.pack(w)
    k, n, g = 256, 64, w.spec.groups(256)
    assert packed["qweight"].shape == (k * bits // 32, n)
    assert packed["qzeros"].shape == (g, n * bits // 32)
    assert packed["scales"].shape == (g, n) and packed["scales"].dtype == torch.float16
    back = PackFormat.GPTQ.unpack(packed, w.spec, k)
    assert torch.equal(back.q, w.q) and torch.equal(back.zero, w.zero) and torch.equal(back.g_idx, w.g_idx)
    assert torch.equal(back.scale, w.scale)  # scales are fp16-representable by construction
    assert torch.equal(back.dequantize(), w.dequantize())


def test_gptq_qzeros_store_zero_minus_one():
    w = quantized(8, 128, QuantSpec(4, 128, True))
    words = PackFormat.GPTQ.pack(w)["qzeros"]  # sym 4-bit: zero 8 stored as 7 in every nibble
    assert (words == 0x77777777).all()


def test_act_order_g_idx_round_trip():
    w = quantized(32, 256, QuantSpec(4, 64, True), act_order=True)
    back = PackFormat.GPTQ.unpack(PackFormat.GPTQ.pack(w), w.spec, 256)
    assert torch.equal(back.g_idx, w.g_idx)
    assert torch.equal(back.dequantize(), w.dequantize())


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_round_trip_exact(group_size):
    w = quantized(64, 256, QuantSpec(4, group_size, False))
    packed = PackFormat.AWQ_GEMM.pack(w)
    assert packed["qweight"].shape == (256, 8) and packed["qzeros"].shape == (256 // group_size, 8)
    back = PackFormat.AWQ_GEMM.unpack(packed, w.spec, 256)
    assert torch.equal(back.q, w.q) and torch.equal(back.zero, w.zero)
    assert torch.equal(back.dequantize(), w.dequantize())


def test_awq_interleaved_order():
    # out columns 0..7 of input row 0 hold codes 0..7; nibble i of the word must hold column AWQ_PACK_ORDER[i]
    q = torch.zeros(8, 128, dtype=torch.int32)
    q[:, 0] = torch.arange(8, dtype=torch.int32)
    w = QuantizedWeight(q, torch.ones(8, 1), torch.zeros(8, 1), default_g_idx(128, QuantSpec(4, -1, False)), QuantSpec(4, -1, False))
    word = PackFormat.AWQ_GEMM.pack(w)["qweight"][0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == list(AWQ_PACK_ORDER)


def words(t):
    """Packed int32 words as their unsigned 32-bit values, to compare with hex literals."""
    return [[v & 0xFFFFFFFF for v in row] for row in t.tolist()]


def test_awq_gemm_words_are_autoawqs_literally():
    """Hand-packed AutoAWQ GEMM words (not the packer's own constant): nibble i, from the lowest up, holds column
    n0 + [0, 2, 4, 6, 1, 3, 5, 7][i] of the same input row; qzeros are interleaved alike and store the zero itself."""
    spec = QuantSpec(4, 32, False)
    q = torch.zeros(16, 32, dtype=torch.int32)  # [N, K]
    q[:, 0] = torch.arange(16)  # input row 0: column n holds code n
    q[:, 1] = 15 - torch.arange(16)  # input row 1: column n holds 15 - n
    zero = (15 - torch.arange(16)).float().view(16, 1)  # [N, G]
    packed = PackFormat.AWQ_GEMM.pack(QuantizedWeight(q, torch.ones(16, 1), zero, default_g_idx(32, spec), spec))
    assert words(packed["qweight"][:3]) == [[0x75316420, 0xFDB9ECA8],  # nibbles 0,2,4,6,1,3,5,7 | 8,a,c,e,9,b,d,f
                                            [0x8ACE9BDF, 0x02461357],  # nibbles f,d,b,9,e,c,a,8 | 7,5,3,1,6,4,2,0
                                            [0, 0]]
    assert words(packed["qzeros"]) == [[0x8ACE9BDF, 0x02461357]]


def test_gptq_v1_words_are_autogptqs_literally():
    """Hand-packed GPTQ v1 words: qweight packs along K (nibble i of word j holds input row 8j + i of that column),
    qzeros along N storing zero - 1 (a zero of 0 wraps to 0xf)."""
    spec = QuantSpec(4, 8, False)
    q = torch.zeros(8, 16, dtype=torch.int32)  # [N, K]
    q[0] = torch.arange(16)  # column 0: row k holds code k
    q[1] = 15 - torch.arange(16)  # column 1: row k holds 15 - k
    zero = torch.stack([torch.arange(8), 8 + torch.arange(8)], dim=1).float()  # [N, G=2]: n, then 8 + n
    packed = PackFormat.GPTQ.pack(QuantizedWeight(q, torch.ones(8, 2), zero, default_g_idx(16, spec), spec))
    assert words(packed["qweight"]) == [[0x76543210, 0x89ABCDEF] + [0] * 6,
                                        [0xFEDCBA98, 0x01234567] + [0] * 6]
    assert words(packed["qzeros"]) == [[0x6543210F],  # zeros 0..7 stored as f,0,1,...,6
                                       [0xEDCBA987]]  # zeros 8..15 stored as 7..e


def test_awq_refuses_what_it_cannot_store():
    with pytest.raises(ValueError, match="4-bit only"):
        PackFormat.AWQ_GEMM.pack(quantized(8, 128, QuantSpec(8, 128, False)))
    with pytest.raises(ValueError, match="act-order"):
        PackFormat.AWQ_GEMM.pack(quantized(8, 128, QuantSpec(4, 32, False), act_order=True))


def test_contiguous_groups_are_told_from_act_order():
    """One check decides whether g_idx is the default one: the AWQ and compressed-tensors packers and the kernel's
    act-order switch all use it."""
    spec = QuantSpec(4, 32, True)
    assert is_contiguous_groups(default_g_idx(128, spec), spec, 128)
    assert is_contiguous_groups(torch.arange(128) // 32, spec, 128)  # any integer dtype
    assert is_contiguous_groups(torch.zeros(128, dtype=torch.int32), QuantSpec(4, -1, True), 128)  # per-channel
    swapped = default_g_idx(128, spec)
    swapped[[31, 32]] = swapped[[32, 31]]  # two columns trade groups: act-order, however slight
    assert not is_contiguous_groups(swapped, spec, 128)
    assert not is_contiguous_groups(default_g_idx(128, spec), QuantSpec(4, 64, True), 128)  # another group size
    assert not is_contiguous_groups(default_g_idx(96, spec), spec, 128)  # another length
    with pytest.raises(ValueError, match="contiguous groups only"):
        PackFormat.COMPRESSED.pack(QuantizedWeight(*rtn_quantize(torch.randn(8, 128), spec), swapped, spec))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,sym", [(32, True), (128, False), (-1, False), (-1, True)])
def test_compressed_tensors_round_trip_exact(bits, group_size, sym):
    w = quantized(64, 256, QuantSpec(bits, group_size, sym))
    packed = PackFormat.COMPRESSED.pack(w)
    assert packed["weight_packed"].shape == (64, 256 * bits // 32)
    assert ("weight_zero_point" in packed) == (not sym)
    assert packed["weight_shape"].tolist() == [64, 256]
    back = PackFormat.COMPRESSED.unpack(packed, w.spec, 256)
    assert torch.equal(back.q, w.q) and torch.equal(back.zero, w.zero)
    assert torch.equal(back.dequantize(), w.dequantize())


@pytest.mark.parametrize("method", METHODS)
def test_one_rule_picks_the_pack_format(method):
    """--format compressed-tensors packs every method alike; auto packs AWQ as AWQ GEMM, the others as GPTQ."""
    own = PackFormat.AWQ_GEMM if method == "awq" else PackFormat.GPTQ
    assert PackFormat.for_job(method) is PackFormat.for_job(method, "auto") is own
    assert PackFormat.for_job(method, "compressed-tensors") is PackFormat.COMPRESSED
    with pytest.raises(ValueError, match="export format must be one of auto, compressed-tensors, got 'gguf'"):
        PackFormat.for_job(method, "gguf")


@pytest.mark.parametrize("fmt, bits, group_size, sym", [
    (PackFormat.GPTQ, 4, 32, True), (PackFormat.GPTQ, 3, 32, False), (PackFormat.GPTQ, 2, -1, True),
    (PackFormat.GPTQ, 8, 64, False), (PackFormat.AWQ_GEMM, 4, 32, False), (PackFormat.COMPRESSED, 4, 32, True),
    (PackFormat.COMPRESSED, 3, 64, False), (PackFormat.COMPRESSED, 8, -1, False)])
def test_blockwise_rtn_packs_the_whole_weights_bytes(fmt, bits, group_size, sym, monkeypatch):
    """pack_rtn rounds a block of rows at a time: every tensor equals, bit for bit, the whole weight's rounding
    packed at once, including a last block shorter than the others (160 rows in blocks of 64)."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    w = (torch.randn(160, 128) * torch.rand(160, 1) * 3).to(torch.bfloat16)
    q, scale, zero = rtn_quantize(w.float(), spec)
    whole = fmt.pack(QuantizedWeight(q, scale, zero, default_g_idx(128, spec), spec))
    for block in (64 * 128, 10**9):  # blocks of 64 rows (the last 32), and one block
        monkeypatch.setattr(rtn, "CPU_BLOCK_ELEMENTS", block)
        assert len(rtn.row_blocks(w, 32)) == (3 if block < 10**9 else 1)
        blocks = pack_rtn(w, spec, fmt)
        assert list(blocks) == list(whole)
        for name, t in whole.items():
            assert blocks[name].dtype == t.dtype and torch.equal(blocks[name], t), name
