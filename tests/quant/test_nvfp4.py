import pytest
import torch

from qvlquant.quant import nvfp4
from qvlquant.quant.formats import NVFP4_SCHEMES, Nvfp4Format

SHAPES = [(64, 256), (3, 16), (130, 48), (1, 1024)]
GRID = torch.tensor(nvfp4.E2M1_GRID)


def nearest_even(x: torch.Tensor) -> torch.Tensor:
    """Brute force: the grid index nearest |x| (saturating), a tie to the even index; sign bit for x < 0 unless 0."""
    dist = (x.abs().clamp(max=6.0).unsqueeze(-1) - GRID).abs()  # [..., 8]
    best = dist.min(-1, keepdim=True).values
    ties = dist == best
    lo = dist.argmin(-1)  # the lower of two tied neighbours i, i+1: take the even one of them
    index = torch.where(ties.sum(-1) > 1, torch.where(lo % 2 == 0, lo, lo + 1), lo)
    return (index | torch.where((x < 0) & (index > 0), 8, 0)).to(torch.uint8)


def test_rounding_is_to_the_nearest_grid_value_ties_to_even():
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.cat([GRID, -GRID, mids, -mids, mids + 1e-3, mids - 1e-3, torch.tensor([7.0, -100.0, 1e-9, -1e-9]),
                   torch.randn(10_000) * 3])
    assert torch.equal(nvfp4.round_to_e2m1(x), nearest_even(x))
    assert nvfp4.round_to_e2m1(mids).tolist() == [0, 2, 2, 4, 4, 6, 6]  # compressed-tensors' thresholds
    assert nvfp4.round_to_e2m1(torch.tensor([-0.1, -0.0])).tolist() == [0, 0]  # no negative zero


def test_pack_puts_the_even_column_in_the_low_nibble_and_round_trips():
    codes = torch.tensor([[1, 15, 0, 7]], dtype=torch.uint8)
    assert nvfp4.pack(codes).tolist() == [[0xF1, 0x70]]
    every = torch.randint(0, 16, (37, 64), dtype=torch.uint8)
    assert torch.equal(nvfp4.unpack(nvfp4.pack(every)), every)


def grid_weight(n: int, k: int, seed: int = 0):
    """A weight made of grid values: random codes with a +-6 in every group, e4m3 group scales (one of them 448),
    a power-of-two global scale, so every step of ``quantize`` is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    codes[:, :: nvfp4.GROUP] = torch.where(torch.rand(n, k // nvfp4.GROUP, generator=g) < 0.5, 7, 15).to(torch.uint8)
    codes = torch.where(codes == 8, 0, codes)  # no negative zero
    scale = (torch.rand(n, k // nvfp4.GROUP, generator=g) * 400 + 0.01).to(nvfp4.SCALE_DTYPE)
    scale[0, 0] = 448.0
    gscale = torch.tensor([2.0**9])
    return codes, scale, gscale


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_of_dequantize_is_exact_on_grid_values(shape):
    codes, scale, gscale = grid_weight(*shape)
    w = nvfp4.dequantize(codes, scale, gscale)
    q, s, gs = nvfp4.quantize(w)
    assert torch.equal(gs, gscale)
    assert torch.equal(s.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(q, codes)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_error_is_within_half_a_grid_step_of_each_group(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 0.05
    w[0, 3] = 0.9  # an outlier: the global scale is set by it
    codes, scale, gscale = nvfp4.quantize(w)
    back = nvfp4.dequantize(codes, scale, gscale)
    step = nvfp4.effective_scales(scale, gscale).repeat_interleave(nvfp4.GROUP, dim=1)  # [N, K]
    # half the gap between the chosen grid value and its wider neighbour (6: the gap below, 2, covers saturation)
    gaps = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0])
    bound = step * gaps[(codes & 7).long()] / 2
    err = (w - back).abs()
    assert bool((err <= bound * (1 + 1e-6)).all()), float((err - bound).max())
    assert float(err.max()) > 0  # not vacuous


def test_the_global_scale_is_448_times_6_over_amax_and_a_given_one_is_used():
    w = torch.randn(8, 32)
    w[2, 5] = -3.0
    _, scale, gscale = nvfp4.quantize(w)
    assert gscale.dtype == torch.float32 and gscale.shape == (1,)
    assert torch.allclose(gscale, torch.tensor([448 * 6 / 3.0]))
    assert float(scale.float().max()) == 448.0  # the group holding the amax uses e4m3's whole range
    shared = nvfp4.global_scale(6.0)  # a fused sibling with a larger amax
    codes, scale, gs = nvfp4.quantize(w, shared)
    assert torch.equal(gs, shared) and float(scale.float().max()) == 224.0
    assert torch.allclose(nvfp4.dequantize(codes, scale, gs), w, atol=0.5)


def test_an_all_zero_weight_stays_zero():
    codes, scale, gscale = nvfp4.quantize(torch.zeros(4, 32))
    assert gscale.item() == 1.0 and int(codes.max()) == 0
    assert torch.equal(nvfp4.dequantize(codes, scale, gscale), torch.zeros(4, 32))


@pytest.mark.parametrize("w,message", [(torch.zeros(4, 24), r"down_proj is \[4, 24\]: NVFP4 needs"),
                                       (torch.full((2, 16), float("nan")), r"down_proj holds NaN")])
def test_a_weight_nvfp4_cannot_hold_is_refused_naming_it(w, message):
    with pytest.raises(ValueError, match=message):
        Nvfp4Format.PACKED.pack(w, "layers.0.mlp.down_proj")


@pytest.mark.parametrize("shape", SHAPES)
def test_format_round_trip(shape):
    fmt = NVFP4_SCHEMES["NVFP4A16"]
    w = torch.randn(shape, dtype=torch.bfloat16)
    stored = fmt.pack(w)
    assert {k: (tuple(v.shape), v.dtype) for k, v in stored.items()} == fmt.tensor_shapes(shape[1], shape[0])
    back = fmt.unpack(stored)
    assert torch.equal(back, nvfp4.dequantize(*nvfp4.quantize(w)))
    again = fmt.pack(back)  # the dequantized weight is on the grid of its own scales: packed to the same bytes
    assert torch.equal(fmt.unpack(again), back)


# --- W4A4 (the calibrated NVFP4 preset): activations per 16 inputs under a calibrated global scale ----------------
def reference_activations(x: torch.Tensor, gscale: float) -> torch.Tensor:
    """Group by group with Python loops, in the order of operations of vLLM's ``ref_nvfp4_quant`` and its
    dequantize: scale = gscale * (amax * (1/6)) rounded to e4m3; x * (1 / (scale * (1 / gscale))) saturated at 6 and
    rounded to the nearest grid value (ties to even, ``nearest_even``); times scale / gscale."""
    gs = torch.tensor(gscale, dtype=torch.float32)
    rows = x.float().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        for g in range(0, rows.shape[1], 16):
            v = rows[r, g:g + 16]
            scale = (gs * (v.abs().max() * (1.0 / 6.0))).clamp(-448, 448).to(torch.float8_e4m3fn).float()
            step = 1.0 / (scale * (1.0 / gs)) if scale != 0 else torch.tensor(0.0)
            codes = nearest_even((v * step).clamp(-6, 6))
            out[r, g:g + 16] = nvfp4.e2m1_values(codes) * (scale / gs)
    return out.reshape(x.shape)


def test_the_nvfp4_preset_is_the_packed_layout_with_a_calibrated_input_global_scale():
    from qvlquant.quant.formats import CALIBRATED_SCHEMES

    fmt = CALIBRATED_SCHEMES["NVFP4"]
    assert fmt is Nvfp4Format.W4A4 and fmt.static_activations and not Nvfp4Format.PACKED.static_activations
    assert fmt.tensor_shapes(64, 8) == Nvfp4Format.PACKED.tensor_shapes(64, 8)  # the weights: NVFP4A16's layout
    assert fmt.input_tensors() == {"input_global_scale": ((1,), torch.float32)} and Nvfp4Format.PACKED.input_tensors() == {}
    assert fmt.input_pack(12.0)["input_global_scale"].tolist() == [pytest.approx(448 * 6 / 12.0)]
    assert fmt.input_pack(0.0)["input_global_scale"].tolist() == [1.0]  # generate_gparam's fallback


@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 32), (1, 32)])
def test_activations_quantize_per_16_inputs_as_vllms_reference_does(shape):
    torch.manual_seed(7)
    x = torch.randn(shape) * torch.rand(*shape[:-1], 1) * 8
    x.view(-1, shape[-1])[0, :16] = 0  # an all-zero group: scale 0, codes 0
    gscale = float(nvfp4.global_scale(float(x.abs().max())))
    got = nvfp4.fake_quantize_activations(x, torch.tensor([gscale]))
    assert got.dtype == x.dtype and got.shape == x.shape
    assert torch.equal(got, reference_activations(x, gscale))
    assert torch.equal(got.view(-1, shape[-1])[0, :16], torch.zeros(16))
    # within half a grid step of each group's scale, the group maximum on the grid's top
    groups, back = x.reshape(-1, 16), got.reshape(-1, 16)
    step = groups.abs().amax(-1, keepdim=True) / 6
    assert bool(((back - groups).abs() <= step * 1.0625 + 1e-6).all())
    sqnr = 10 * torch.log10(x.pow(2).sum() / (got - x).pow(2).sum())
    assert sqnr > 15, float(sqnr)  # measured 20.5 - 21.7 dB on these Gaussian groups


def test_activations_refuse_a_width_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="NVFP4 activations need a multiple of 16 inputs, got 24"):
        nvfp4.fake_quantize_activations(torch.randn(2, 24), torch.tensor([1.0]))
