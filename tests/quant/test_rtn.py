import itertools

import pytest
import torch

from qvlquant.quant.rtn import (
    default_g_idx,
    dequantize,
    expand_groups,
    fake_quantize,
    group_qparams,
    minmax_qparams,
    mse_qparams,
    quantize,
    rtn_quantize,
)
from qvlquant.quant.spec import QuantSpec


def reference_rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Plain-Python loop reference: quantize-dequantize each group from its min/max."""
    n, k = w.shape
    g = k if spec.group_size == -1 else spec.group_size
    out = torch.empty_like(w)
    maxq = 2**spec.bits - 1
    for r, c0 in itertools.product(range(n), range(0, k, g)):
        grp = w[r, c0:c0 + g].double()
        lo, hi = min(grp.min().item(), 0.0), max(grp.max().item(), 0.0)
        if spec.sym:
            hi = max(abs(lo), hi)
            lo = -hi
        scale = float(torch.tensor((hi - lo) / maxq).clamp(min=1e-7).half().float())
        zero = (maxq + 1) / 2 if spec.sym else round(-lo / scale)
        q = torch.clamp(torch.round(grp / scale) + zero, 0, maxq)
        out[r, c0:c0 + g] = (scale * (q - zero)).float()
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_loop_reference(bits, group_size, sym):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(6, 128)
    spec = QuantSpec(bits, group_size, sym)
    torch.testing.assert_close(fake_quantize(w, spec), reference_rtn(w, spec), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
def test_rtn_error_bounded_by_half_step(bits, sym):
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    spec = QuantSpec(bits, 128, sym)
    q, scale, zero = rtn_quantize(w, spec)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    g_idx = default_g_idx(256, spec)
    err = (dequantize(q, expand_groups(scale, g_idx), expand_groups(zero, g_idx)) - w).abs()
    step = expand_groups(scale, g_idx)
    # within the representable range the error is at most half a step; sym clips one code at the top
    slack = step if sym else 0.5 * step
    assert (err <= slack + 1e-6).all()
    assert err.mean() < 0.3 * step.mean()


def test_more_bits_less_error():
    torch.manual_seed(1)
    w = torch.randn(32, 256)
    errs = [(fake_quantize(w, QuantSpec(b, 64, True)) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[3] < errs[2] / 100


def test_zero_group_and_bad_shapes():
    w = torch.zeros(2, 64)
    assert torch.equal(fake_quantize(w, QuantSpec(4, 32, False)), w)
    with pytest.raises(ValueError, match="not divisible"):
        group_qparams(torch.zeros(2, 96), QuantSpec(4, 64, True))
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=5)


def test_docstring_example_holds():
    import doctest

    import qvlquant.quant.rtn as rtn

    result = doctest.testmod(rtn)
    assert result.attempted >= 1 and result.failed == 0


@pytest.mark.parametrize("spec", [QuantSpec(4, 128, True), QuantSpec(3, 64, False), QuantSpec(8, -1, True),
                                  QuantSpec(2, 32, False)])
def test_grouped_rounding_equals_the_per_column_formula(spec):
    """rtn_quantize / fake_quantize broadcast each group's scale and zero; the values are exactly those of
    quantize / dequantize with per-column parameters (what GPTQ's column loop and the packed formats use)."""
    from qvlquant.quant.rtn import dequantize, expand_groups, group_qparams, quantize

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    scale, zero = group_qparams(w, spec)
    g_idx = default_g_idx(256, spec)
    q = quantize(w, expand_groups(scale, g_idx), expand_groups(zero, g_idx), spec.bits)
    codes, s, z = rtn_quantize(w, spec)
    assert torch.equal(codes, q.to(torch.int32)) and torch.equal(s, scale) and torch.equal(z, zero)
    assert torch.equal(fake_quantize(w, spec), dequantize(q, expand_groups(scale, g_idx), expand_groups(zero, g_idx)))


@pytest.mark.parametrize("bits,sym", [(3, True), (4, True), (3, False), (4, False)])
def test_mse_qparams_never_worse_than_minmax_in_its_norm(bits, sym):
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(2.0).sample((64, 128))  # heavy tails: a range set by one outlier
    spec = QuantSpec(bits, -1, sym)
    err = lambda s, z: (dequantize(quantize(w, s, z, bits), s, z) - w).abs().pow(2.4).sum(1)  # noqa: E731
    s0, z0 = minmax_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), spec)
    s1, z1 = mse_qparams(w, spec, norm=2.4)
    assert (err(s1, z1) <= err(s0, z0) + 1e-6).all()
    assert err(s1, z1).sum() < 0.97 * err(s0, z0).sum()  # heavy-tailed rows gain from a shrunk range (5-21 % here)
    assert (s1 <= s0 + 1e-7).all()  # only ever shrinks the range


def test_mse_qparams_keeps_minmax_when_shrinking_cannot_help():
    w = torch.arange(16.0).view(1, 16)  # exactly the 4-bit asymmetric grid of its own range: error 0
    spec = QuantSpec(4, -1, False)
    s, z = mse_qparams(w, spec)
    assert torch.equal(s, minmax_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), spec)[0])


@pytest.mark.parametrize("bits,sym", [(3, True), (3, False), (2, True)])
def test_mse_coarse_to_fine_search_tracks_the_exhaustive_one(bits, sym):
    """The coarse-to-fine range search (every 5th shrink, then each row's neighbours) against the exhaustive grid
    (coarse=1): never better than it (the exhaustive one is the optimum on the grid), within 0.5 % of its summed
    error, and the same choice for most rows (a coarse pass alone agrees on about a fifth)."""
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(2.0).sample((128, 128))
    spec = QuantSpec(bits, -1, sym)
    err = lambda s, z: (dequantize(quantize(w, s, z, bits), s, z) - w).abs().pow(2.4).sum(1)  # noqa: E731
    exhaustive, fast = mse_qparams(w, spec, coarse=1), mse_qparams(w, spec)
    e_exh, e_fast = err(*exhaustive), err(*fast)
    assert (e_fast >= e_exh - 1e-5 * e_exh).all()
    assert e_fast.sum() <= 1.005 * e_exh.sum()
    assert (exhaustive[0] == fast[0]).float().mean() > 0.9  # the fine pass reaches shrinks off the coarse grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(3, 64, False), QuantSpec(8, -1, False)])
def test_rounding_a_block_of_rows_at_a_time_changes_no_bit(dtype, spec, monkeypatch):
    """rtn_quantize, fake_quantize and AWQ's scaled fake quantization round a block of rows at a time on a CPU
    (``row_blocks``): codes, scales, zeros and dequantized weights equal those of one block, bit for bit, with a
    last block shorter than the others."""
    from qvlquant.quant import rtn
    from qvlquant.quant.awq import scaled_fake_quant

    torch.manual_seed(1)
    w = (torch.randn(100, 128) * torch.rand(100, 1) * 4).to(dtype)
    s = torch.rand(128) + 0.5
    monkeypatch.setattr(rtn, "CPU_BLOCK_ELEMENTS", 10**9)
    assert len(rtn.row_blocks(w)) == 1
    whole = (rtn_quantize(w, spec), fake_quantize(w, spec), scaled_fake_quant(w, s, spec))
    monkeypatch.setattr(rtn, "CPU_BLOCK_ELEMENTS", 24 * 128)
    assert [b.stop - b.start for b in rtn.row_blocks(w)] == [24, 24, 24, 24, 4]
    blocks = (rtn_quantize(w, spec), fake_quantize(w, spec), scaled_fake_quant(w, s, spec))
    for a, b in zip([*whole[0], *whole[1:]], [*blocks[0], *blocks[1:]]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert whole[1].dtype == dtype and whole[0][0].dtype == torch.int32
