"""engine/calibration.py: the streamed pass that records each decoder linear's largest input for the calibrated
schemes (FP8 static input scales, NVFP4 input global scales)."""

import pytest
import torch

from qvlquant.checkpoint.datafree import quantized_linears
from qvlquant.engine.calibration import input_ranges, observe_layer
from qvlquant.engine.loop import InMemoryLayers
from qvlquant.families import QWEN2_VL
from qvlquant.quant.layer import LayerInput, QuantizationError


def reference_amax(model, batches, names) -> dict[str, float]:
    """The HF model's own forward, a hook on every decoder linear: its input's largest |x| over the tokens the
    attention mask calls real."""
    amax, mask = {}, {}

    def hook_for(name):
        def hook(module, args, output):
            rows = args[0][mask["m"]]
            amax[name] = max(amax.get(name, 0.0), float(rows.abs().max()))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                mask["m"] = batch["attention_mask"].bool()
                model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return amax


@pytest.fixture(scope="module")
def ranges(demo, demo_batches):
    model, _ = demo
    return input_ranges(model, demo_batches, QWEN2_VL, quantized_linears(model, QWEN2_VL))


def test_each_linear_gets_the_largest_input_the_full_forward_gives_it_on_real_tokens(demo, demo_batches, ranges):
    model, _ = demo
    names = quantized_linears(model, QWEN2_VL)
    assert len(names) == 28 and list(ranges.amax) == names
    expected = reference_amax(model, demo_batches, names)
    for name in names:  # the layer-by-layer replay is the HF forward (test_model_families), up to float rounding
        assert ranges.amax[name] == pytest.approx(expected[name], rel=1e-5), name
    assert ranges.tokens == int(sum(b["attention_mask"].sum() for b in demo_batches))


def test_the_linears_that_read_one_input_get_one_range(ranges):
    """q/k/v read the input layernorm's output and gate/up the post-attention one: vLLM fuses them into one layer
    with one activation scale, and their ranges are one number each."""
    for i in range(4):
        head = f"model.language_model.layers.{i}."
        for group in QWEN2_VL.linear_groups:
            assert len({ranges.amax[head + n] for n in group}) == 1, (i, group)
        assert ranges.amax[head + "mlp.down_proj"] != ranges.amax[head + "mlp.up_proj"]


class RecordingLayers(InMemoryLayers):
    def __init__(self, model, family):
        super().__init__(model, family)
        self.events = []

    def after_capture(self):
        self.events.append("capture done")

    def load(self, i):
        self.events.append(("load", i))
        return super().load(i)

    def release(self, i):
        self.events.append(("release", i))


def test_the_pass_holds_one_layer_at_a_time_and_leaves_the_model_as_it_was(demo, demo_batches):
    model, _ = demo
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = RecordingLayers(model, QWEN2_VL)
    input_ranges(model, demo_batches, QWEN2_VL, quantized_linears(model, QWEN2_VL)[:3], source)
    assert source.events == ["capture done"] + [e for i in range(4) for e in (("load", i), ("release", i))]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_vision_tower_is_never_observed(demo, demo_batches):
    with pytest.raises(ValueError, match=r"model\.visual\.blocks\.0\.mlp\.fc1 is not a linear of qwen2_vl's decoder "
                                         r"layers \(model\.language_model\.layers\.N\.\*\)"):
        input_ranges(demo[0], demo_batches, QWEN2_VL, ["model.visual.blocks.0.mlp.fc1"])


class ToyLayer(torch.nn.Module):
    """x + down(relu(up(x))): named linears and a forward over hidden states, as a decoder layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, hidden, use_cache=False):
        return hidden + self.down(torch.relu(self.up(hidden)))


def test_padding_is_left_out_and_the_next_inputs_are_the_layers_outputs():
    layer = ToyLayer()
    hidden = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    hidden[1, 2:] = 1e3  # padding far beyond every real token
    amax = {}
    out = observe_layer(0, layer, [LayerInput(hidden, {}, mask)], ["up", "down"], amax)
    assert amax["up"] == float(hidden[mask].abs().max()) < 10
    with torch.no_grad():
        assert amax["down"] == float(torch.relu(layer.up(hidden))[mask].abs().max())
    assert torch.equal(out[0].hidden, layer(hidden).detach())


def test_a_linear_without_real_tokens_or_with_non_finite_inputs_is_an_error_naming_it():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.language_model = torch.nn.Module()
            self.model.language_model.layers = torch.nn.ModuleList([ToyLayer()])

        def forward(self, hidden, attention_mask, use_cache=False):
            return self.model.language_model.layers[0](hidden)

    family = QWEN2_VL
    name = "model.language_model.layers.0.up"
    empty = {"hidden": torch.randn(1, 3, 16), "attention_mask": torch.zeros(1, 3, dtype=torch.long)}
    with pytest.raises(QuantizationError, match=rf"{name}: received no calibration tokens, so it has no activation "
                                                 r"scale; add samples"):
        input_ranges(Model(), [empty], family, [name])
    bad = {"hidden": torch.full((1, 3, 16), float("nan")), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(QuantizationError, match=rf"{name}: its calibration inputs hold NaN or infinite values"):
        input_ranges(Model(), [bad], family, [name])
