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


@pytest.fixture(scope="module")
def moe_exports(tmp_path_factory):
    """A tiny Qwen3.5-MoE checkpoint and its W4 g64 exports (RTN, straight from the checkpoint)."""
    from tiny_models import qwen3_5_checkpoint

    root = tmp_path_factory.mktemp("interop-moe")
    qwen3_5_checkpoint(root / "base", moe=True)
    out = {}
    for fmt in ("gptq", "compressed-tensors"):
        out[fmt] = root / fmt
        qvlquant.quantize(model=str(root / "base"), output=str(out[fmt]), bits=4, group_size=64,
                          export_format="compressed-tensors" if fmt == "compressed-tensors" else "auto")
    return root / "base", out


def _expert_gate(model, layer: int, expert: int) -> torch.Tensor:
    """Expert ``expert``'s gate_proj weight [I, H] in transformers' fused experts of decoder layer ``layer``."""
    fused = model.model.language_model.layers[layer].mlp.experts.gate_up_proj[expert]
    return fused[: fused.shape[0] // 2].float()


@pytest.mark.slow
def test_transformers_loads_a_compressed_tensors_moe_export_with_its_gates_as_they_were(moe_exports):
    """compressed-tensors' config group targets every Linear; the export's ``ignore`` keeps each layer's
    shared-expert gate (and router) out of it, so transformers 5.24 loads them as the plain weights they are (without
    it, it built them as packed linears whose tensors the checkpoint lacks, left random). The experts are
    decompressed into transformers' fused experts: each expert's weight is the one qvlquant.load dequantizes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    base, exports = moe_exports
    hf = AutoModelForImageTextToText.from_pretrained(exports["compressed-tensors"], device_map="cpu",
                                                     dtype=torch.float32)
    tensors = load_file(str(base / "model.safetensors"))
    for i in range(4):
        gate = hf.model.language_model.layers[i].mlp.shared_expert_gate
        key = f"model.language_model.layers.{i}.mlp.shared_expert_gate.weight"
        assert type(gate) is torch.nn.Linear and torch.equal(gate.weight, tensors[key].float()), i
    ours, _ = qvlquant.load(exports["compressed-tensors"], dtype=torch.float32)
    for e in (0, 5):
        expected = ours.get_submodule(f"model.language_model.layers.2.mlp.experts.{e}.gate_proj")
        torch.testing.assert_close(_expert_gate(hf, 2, e), expected.quantized_weight().dequantize().float(),
                                   rtol=1e-2, atol=1e-3)  # float16 scales against transformers' decompression


@pytest.mark.slow
def test_transformers_leaves_a_gptq_moe_exports_experts_unloaded(moe_exports):
    """What docs/INTEROP.md says of transformers 5.24 (optimum 2.3, gptqmodel 7.7): the GPTQ export's per-expert
    tensors are not read into its fused experts (its load report lists them UNEXPECTED and the fused
    ``gate_up_proj`` / ``down_proj`` MISSING, so they stay at their random initialisation), while the other decoder
    linears load as gptqmodel's. When this fails, transformers loads them: update INTEROP.md and this test."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    base, exports = moe_exports
    hf = AutoModelForImageTextToText.from_pretrained(exports["gptq"], device_map="cpu", dtype=torch.float32)
    shared = hf.model.language_model.layers[0].mlp.shared_expert.down_proj
    assert "gptqmodel" in type(shared).__module__
    w = load_file(str(base / "model.safetensors"))["model.language_model.layers.0.mlp.experts.3.gate_proj.weight"]
    got = _expert_gate(hf, 0, 3)
    assert (got - w.float()).norm() / w.float().norm() > 0.5  # not the expert's weight (W4 g64 would be ~0.1)
