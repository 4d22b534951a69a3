"""Real clients: transformers' own GPTQ / AWQ integration (gptqmodel, + optimum for GPTQ) loads qvlquant's exports
with ``from_pretrained`` alone, keeps the vision tower in full precision, and answers as ``qvlquant.load`` does.
Needs the ``interop`` extra (CI installs it)."""

import pytest
import torch

pytest.importorskip("gptqmodel", reason="the interop extra (gptqmodel, optimum) is not installed")

import qvlquant  # noqa: E402
from qvlquant.calib.easyvqa import load_split  # noqa: E402
from qvlquant.cli import main  # noqa: E402
from qvlquant.eval.easyvqa import prompt_batch  # noqa: E402

# gptq-static-act-order: act-order with static groups, written as desc_act false (its g_idx is trivial): the
# act-order export vLLM 0.33 loads must answer as ours does in transformers too
METHODS = {"gptq": ["--method", "gptq"], "awq": ["--method", "awq"],
           "gptq-static-act-order": ["--method", "gptq", "--desc-act", "--static-groups"]}


@pytest.fixture(scope="module", params=list(METHODS))
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("interop") / request.param
    args = ["quantize", *METHODS[request.param], "--bits", "4", "--num-samples", "8", "--output", str(out)]
    assert main(args) == 0
    return request.param.split("-")[0], out


@pytest.mark.slow
def test_transformers_from_pretrained_loads_the_export(exported):
    from transformers import Qwen2VLForConditionalGeneration

    method, folder = exported
    hf = Qwen2VLForConditionalGeneration.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    q_proj = hf.model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj) is not torch.nn.Linear and "gptqmodel" in type(q_proj).__module__
    # the vision tower must still be plain, loaded nn.Linear (INTEROP.md: a bare "visual" lets it be replaced)
    visual = [m for n, m in hf.model.visual.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(visual) == 10 and all(type(m) is torch.nn.Linear for m in visual)
    ours, processor = qvlquant.load(folder, dtype=torch.float32)
    torch.testing.assert_close(hf.model.visual.blocks[0].attn.qkv.weight, ours.model.visual.blocks[0].attn.qkv.weight)

    items = load_split("test")[:128]
    batch = prompt_batch(processor, items, {})
    with torch.no_grad():
        a = hf(**batch).logits[:, -1].float()
        b = ours(**batch).logits[:, -1].float()
    assert (a.argmax(-1) == b.argmax(-1)).all()  # the same answers
    assert (a - b).abs().max() < 0.02  # measured here: 0.0034 (AWQ), 0.0025 (GPTQ) on 256 questions


MIXED = {  # per-module rules transformers 5.24 loads: skips in every format, widths through compressed-tensors
    "ct-widths": ["--method", "gptq", "--format", "compressed-tensors", "--override", r"layers\.0\.:bits=8",
                  "--ignore", r"layers\.3\.mlp"],
    "gptq-skips": ["--method", "gptq", "--ignore", r"layers\.3\.mlp", "--ignore", r"layers\.0\.self_attn"],
    "awq-skips": ["--method", "awq", "--ignore", r"layers\.3\.mlp"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MIXED))
def test_transformers_loads_mixed_exports_as_qvlquant_does(tmp_path, name):
    from transformers import Qwen2VLForConditionalGeneration

    out = tmp_path / name
    assert main(["quantize", *MIXED[name], "--num-samples", "8", "--output", str(out)]) == 0
    hf = Qwen2VLForConditionalGeneration.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    assert type(hf.model.language_model.layers[3].mlp.down_proj) is torch.nn.Linear  # skipped: plain weights
    ours, processor = qvlquant.load(out, dtype=torch.float32)
    batch = prompt_batch(processor, load_split("test")[:64], {})
    with torch.no_grad():
        a, b = hf(**batch).logits[:, -1].float(), ours(**batch).logits[:, -1].float()
    assert (a.argmax(-1) == b.argmax(-1)).all()
    assert (a - b).abs().max() < 0.02  # measured here: 0.0 (compressed-tensors, decompressed), 0.0011 (GPTQ, AWQ)


@pytest.mark.slow
def test_transformers_cannot_load_per_module_widths_in_the_gptq_format(tmp_path):
    """transformers 5.24's GPTQConfig has no ``dynamic``: every linear is built at the base width and the 8-bit
    tensors do not fit (docs/MIXED_PRECISION.md says so and points to compressed-tensors)."""
    from transformers import Qwen2VLForConditionalGeneration

    out = tmp_path / "gptq-widths"
    assert main(["quantize", "--method", "gptq", "--override", r"layers\.0\.:bits=8", "--num-samples", "8",
                 "--output", str(out)]) == 0
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        Qwen2VLForConditionalGeneration.from_pretrained(out, device_map="cpu", dtype=torch.float32)
