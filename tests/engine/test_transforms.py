import copy

import pytest
import torch

from qvlquant.engine.transforms import pad_intermediate
from qvlquant.families import QWEN2_VL


def test_padding_the_mlp_keeps_outputs_and_leaves_vision_alone(demo, demo_batches):
    model, _ = demo
    padded = copy.deepcopy(model)
    assert pad_intermediate(padded, QWEN2_VL, 384) == 768
    layer = padded.model.language_model.layers[2]
    assert layer.mlp.gate_proj.weight.shape == (768, 256) and layer.mlp.down_proj.weight.shape == (256, 768)
    assert padded.config.text_config.intermediate_size == 768
    for a, b in zip(padded.model.visual.state_dict().values(), model.model.visual.state_dict().values()):
        assert torch.equal(a, b)
    batch = next(b for b in demo_batches if "pixel_values" in b)
    with torch.no_grad():
        torch.testing.assert_close(padded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
    assert pad_intermediate(padded, QWEN2_VL, 256) == 768  # already a multiple: unchanged


def test_72b_numbers():
    class Cfg:
        intermediate_size = 29568

    class M(torch.nn.Module):
        config = Cfg()

        def get_submodule(self, name):
            return []

    assert pad_intermediate(M(), QWEN2_VL, 1024) == 29696


def test_padding_that_would_more_than_double_the_mlp_is_refused_naming_both_sizes():
    from types import SimpleNamespace

    from qvlquant.engine.transforms import pad_config

    config = SimpleNamespace(text_config=SimpleNamespace(intermediate_size=512))
    with pytest.raises(ValueError, match=r"--pad-intermediate-to 1025 would pad the MLP's intermediate size 512 to "
                                         r"1025, more than double"):
        pad_config(config, 1025)
    assert config.text_config.intermediate_size == 512  # unchanged
    assert pad_config(config, 1024) == 1024  # exactly double is allowed (Qwen2-VL-72B: 29568 -> 29696 with 1024)
