"""INT8 W8A8 exports run with their serving kernels' numerics: int8 weights per channel and dynamic int8
activations per token, the integer product scaled by both."""

import pytest
import torch

import qvlquant
from qvlquant.quant import int8
from qvlquant.runtime.w8a8 import W8A8Linear



def kl_and_gap(reference: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference || logits) over the real tokens, mean |logit gap| / mean |reference logit|)."""
    p, q = torch.log_softmax(reference[mask], -1), torch.log_softmax(logits[mask], -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    gap = (reference - logits)[mask].abs().mean() / reference[mask].abs().mean()
    return float(kl), float(gap)


@pytest.fixture(scope="module")
def w8a8_model(tmp_path_factory):
    from qvlquant.api import quantize

    out = tmp_path_factory.mktemp("w8a8run") / "W8A8"
    quantize(output=str(out), scheme="W8A8")
    return qvlquant.load(out)[0]


def test_loaded_model_is_close_to_bf16_and_not_equal(demo, demo_batches, w8a8_model):
    base, _ = demo
    assert sum(isinstance(m, W8A8Linear) for m in w8a8_model.modules()) == 28
    assert not any(isinstance(m, W8A8Linear) for n, m in w8a8_model.named_modules() if n.startswith("model.visual"))
    for batch in demo_batches:
        with torch.no_grad():
            ref, got = base(**batch, use_cache=False).logits, w8a8_model(**batch, use_cache=False).logits
        kl, gap = kl_and_gap(ref, got, batch["attention_mask"].bool())
        # measured on the demo: mean KL 1.9e-4 - 2.6e-4, relative logit gap 0.71 % - 0.75 %
        assert kl < 5e-3 and gap < 0.02, (kl, gap)
        assert gap > 1e-3  # INT8 really rounded something


def test_activations_are_quantized_as_the_kernels_do(demo_batches, w8a8_model, monkeypatch):
    """Without the activation rounding (W8A16: the input passed through unrounded) the logits move: the runtime is
    W8A8, not weight-only."""
    batch = next(b for b in demo_batches if "pixel_values" in b)
    with torch.no_grad():
        w8a8 = w8a8_model(**batch, use_cache=False).logits
        monkeypatch.setattr(int8, "quantize_activations", lambda x: (x.float(), torch.ones_like(x[..., :1]).float()))
        w8a16 = w8a8_model(**batch, use_cache=False).logits
    assert (w8a8 - w8a16).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_is_the_integer_matmul_times_the_scales(dtype):
    """The module's output against the int8 x int8 product summed in int64 (what vLLM's cutlass kernel sums in
    int32), times each token's and each channel's scale, plus the bias: equal within float rounding."""
    torch.manual_seed(0)
    w, b = torch.randn(192, 320), torch.randn(192)
    x = (torch.randn(2, 7, 320) * torch.rand(2, 7, 1) * 5).to(dtype)  # tokens of different magnitude
    linear = W8A8Linear.from_weight(w, b.to(dtype))
    assert linear.weight.dtype == torch.int8 and linear.weight_scale.shape == (192, 1)
    qx, sx = int8.quantize_activations(x)
    acc = qx.long() @ linear.weight.long().t()  # [2, 7, 192]
    expected = sx.double() * (acc.double() * linear.weight_scale.double().view(-1)) + b.to(dtype).double()
    tol = {torch.float32: dict(rtol=1e-6, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=1e-2)}[dtype]
    with torch.no_grad():
        got = linear(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, **tol)
    exact = torch.nn.functional.linear(x.float(), w, b)
    rel = float((got.float() - exact).norm() / exact.norm())
    assert 1e-4 < rel < 0.02, rel  # two int8 roundings
    torch.testing.assert_close(linear.weight_dequantized(), int8.dequantize_channels(*int8.quantize_channels(w)))
