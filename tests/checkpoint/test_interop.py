"""Real clients: transformers' own GPTQ / AWQ / compressed-tensors / FP8 integrations load qvlquant's exports with
``from_pretrained`` alone, keep the vision tower in full precision, and answer as ``qvlquant.load`` does; or, for
the MoE exports it does not load, fail as docs/INTEROP.md says. Needs the ``interop`` extra (CI installs it): each
test skips when the backend of its format is missing."""

import re
import types

import pytest
import torch

import qvlquant
from qvlquant.calib.easyvqa import load_split
from qvlquant.cli import main
from qvlquant.eval.easyvqa import prompt_batch

BACKENDS = {  # export format -> the packages transformers loads it through (none: its own fine-grained FP8)
    "gptq": ("optimum", "gptqmodel"), "awq": ("gptqmodel",), "compressed-tensors": ("compressed_tensors",),
    "FP8_BLOCK": (), "FP8_DYNAMIC": ("compressed_tensors",), "FP8": ("compressed_tensors",),
    "W8A8": ("compressed_tensors",), "NVFP4A16": ("compressed_tensors",), "NVFP4": ("compressed_tensors",),
}


def needs(fmt: str) -> None:
    for package in BACKENDS[fmt]:
        pytest.importorskip(package, reason=f"the interop extra ({package}, for {fmt}) is not installed")

# gptq-static-act-order: act-order with static groups, written as desc_act false (its g_idx is trivial): the
# act-order export vLLM 0.33 loads must answer as ours does in transformers too
METHODS = {"gptq": ["--method", "gptq"], "awq": ["--method", "awq"],
           "gptq-static-act-order": ["--method", "gptq", "--desc-act", "--static-groups"]}


@pytest.fixture(scope="module", params=list(METHODS))
def exported(request, tmp_path_factory):
    needs(request.param.split("-")[0])
    out = tmp_path_factory.mktemp("interop") / request.param
    args = ["quantize", *METHODS[request.param], "--bits", "4", "--num-samples", "8", "--output", str(out)]
    assert main(args) == 0
    return request.param.split("-")[0], out


@pytest.mark.slow
def test_transformers_from_pretrained_loads_the_export(exported):
    from transformers import Qwen2VLForConditionalGeneration

    _, folder = exported
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

    needs("compressed-tensors" if name.startswith("ct") else name.split("-")[0])
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

    needs("gptq")
    out = tmp_path / "gptq-widths"
    assert main(["quantize", "--method", "gptq", "--override", r"layers\.0\.:bits=8", "--num-samples", "8",
                 "--output", str(out)]) == 0
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        Qwen2VLForConditionalGeneration.from_pretrained(out, device_map="cpu", dtype=torch.float32)



# --- Qwen3.5 (dense, MoE) and Qwen3-VL-MoE: transformers 5.25 (optimum 2.3, gptqmodel 7.7, compressed-tensors 0.20) --
def _family_export(root, model_type: str, fmt: str):
    """The tiny random checkpoint of ``model_type`` (made once per ``root``) exported in ``fmt``: GPTQ and
    compressed-tensors W4 g64 rounded straight from the checkpoint, AWQ W4 g64 on 2 demo samples, a scheme as
    ``quantize --scheme`` writes it (FP8 and NVFP4 calibrated on 2 demo samples)."""
    from tiny_models import qwen3_5_checkpoint, qwen3_vl_moe_checkpoint

    base = root / f"{model_type}-base"
    if not base.exists():
        if model_type == "qwen3_vl_moe":
            qwen3_vl_moe_checkpoint(base, layers=4)  # as published: fused experts transposed; layer 1 dense
        else:
            qwen3_5_checkpoint(base, moe=model_type == "qwen3_5_moe")
    out = root / f"{model_type}-{fmt}"
    calib = {"calib": "demo", "num_samples": 2}
    if fmt in ("gptq", "compressed-tensors"):
        qvlquant.quantize(model=str(base), output=str(out), bits=4, group_size=64,
                          export_format="compressed-tensors" if fmt == "compressed-tensors" else "auto")
    elif fmt == "awq":
        qvlquant.quantize(model=str(base), output=str(out), method="awq", bits=4, group_size=64, sym=False, **calib)
    else:
        qvlquant.quantize(model=str(base), output=str(out), scheme=fmt, **(calib if fmt in ("FP8", "NVFP4") else {}))
    return out


@pytest.fixture(scope="module")
def family_export(tmp_path_factory):
    """(model_type, fmt) -> the export folder, made on first use."""
    root, made = tmp_path_factory.mktemp("interop-families"), {}

    def get(model_type: str, fmt: str):
        if (model_type, fmt) not in made:
            made[model_type, fmt] = _family_export(root, model_type, fmt)
        return made[model_type, fmt]
    return get


def _weight_only(model, where: str) -> int:
    """Run qvlquant's quantized linears whose path contains ``where`` on 16-bit activations (their dequantized
    weight, no activation quantization), as transformers runs what it dequantized at load. -> how many."""
    count = 0
    for name, module in model.named_modules():
        if hasattr(module, "weight_dequantized") and where in name:
            module.forward = types.MethodType(lambda self, x: torch.nn.functional.linear(
                x, self.weight_dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)), module)
            count += 1
    return count


LOADS = {  # (model_type, fmt) -> (the dtype; the linears transformers runs on 16-bit activations, which qvlquant is
    # made to run so too; the bound on the logits, of size about 1)
    ("qwen3_5", "gptq"): (torch.float32, None, 2e-3),  # measured 3.2e-4
    ("qwen3_5", "awq"): (torch.float32, None, 2e-3),  # measured 3.5e-4
    ("qwen3_5", "compressed-tensors"): (torch.float32, None, 1e-4),  # measured 0 (decompressed to the same weights)
    ("qwen3_5_moe", "compressed-tensors"): (torch.float32, None, 2e-3),  # measured 2.9e-4
    ("qwen3_5", "FP8_BLOCK"): (torch.float32, "", 1e-4),  # no FP8 kernel on a CPU: dequantized at load; measured 0
    ("qwen3_5_moe", "FP8_BLOCK"): (torch.float32, "", 1e-4),  # measured 0
    ("qwen3_5", "FP8_DYNAMIC"): (torch.float32, None, 1e-4),  # measured 0
    ("qwen3_5", "FP8"): (torch.float32, None, 1e-4),  # static input scales, applied as qvlquant does; measured 0
    # the experts are dequantized into transformers' fused experts (their input scales unread: UNEXPECTED); 0
    ("qwen3_5_moe", "FP8"): (torch.float32, "mlp.experts.", 1e-4),
    # compressed-tensors' dynamic int8 scale is max|x| / 127.5 (quantization/utils/helpers.py), vLLM's and
    # qvlquant's max|x| / 127; measured 0.020
    ("qwen3_5", "W8A8"): (torch.float32, None, 0.05),
    # NVFP4 in float32: compressed-tensors' forward multiplies float32 inputs by bfloat16 weights and fails; 0
    ("qwen3_5", "NVFP4A16"): (torch.bfloat16, None, 1e-4),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type,fmt", list(LOADS))
def test_transformers_loads_the_new_families_exports_as_qvlquant_does(family_export, model_type, fmt):
    """Every tensor of the export loaded (no MISSING, no UNEXPECTED but unused static input scales), the vision
    tower plain, and the logits of a multimodal batch those of ``qvlquant.load``."""
    from tiny_models import tiny_batch
    from transformers import AutoModelForImageTextToText

    needs(fmt)
    dtype, weight_only, bound = LOADS[model_type, fmt]
    folder = family_export(model_type, fmt)
    hf, info = AutoModelForImageTextToText.from_pretrained(folder, device_map="cpu", dtype=dtype,
                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], sorted(info["missing_keys"])[:3]
    assert all(k.endswith(".input_scale") for k in info["unexpected_keys"]), sorted(info["unexpected_keys"])[:3]
    assert all(type(m) is torch.nn.Linear for m in hf.model.visual.modules() if isinstance(m, torch.nn.Linear))
    ours, _ = qvlquant.load(folder, dtype=dtype)
    if weight_only is not None:
        assert _weight_only(ours, weight_only) > 0
    batch = tiny_batch(ours)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        a, b = hf(**batch).logits[mask].float(), ours(**batch).logits[mask].float()
    assert (a - b).abs().max() <= bound


def _expert_gate(model, layer: int, expert: int) -> torch.Tensor:
    """Expert ``expert``'s gate_proj weight [I, H] in transformers' fused experts of decoder layer ``layer``."""
    fused = model.model.language_model.layers[layer].mlp.experts.gate_up_proj[expert]
    return fused[: fused.shape[0] // 2].float()


@pytest.mark.slow
def test_transformers_loads_a_compressed_tensors_moe_export_with_its_gates_as_they_were(family_export):
    """compressed-tensors' config group targets every Linear; the export's ``ignore`` keeps each layer's
    shared-expert gate (and router) out of it, so transformers loads them as the plain weights they are (without
    it, it built them as packed linears whose tensors the checkpoint lacks, left random). The experts are
    decompressed into transformers' fused experts: each expert's weight is the one qvlquant.load dequantizes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    needs("compressed-tensors")
    folder = family_export("qwen3_5_moe", "compressed-tensors")
    hf = AutoModelForImageTextToText.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    tensors = load_file(str(folder.parent / "qwen3_5_moe-base" / "model.safetensors"))
    for i in range(4):
        gate = hf.model.language_model.layers[i].mlp.shared_expert_gate
        key = f"model.language_model.layers.{i}.mlp.shared_expert_gate.weight"
        assert type(gate) is torch.nn.Linear and torch.equal(gate.weight, tensors[key].float()), i
    ours, _ = qvlquant.load(folder, dtype=torch.float32)
    for e in (0, 5):
        expected = ours.get_submodule(f"model.language_model.layers.2.mlp.experts.{e}.gate_proj")
        torch.testing.assert_close(_expert_gate(hf, 2, e), expected.quantized_weight().dequantize().float(),
                                   rtol=1e-2, atol=1e-3)  # float16 scales against transformers' decompression


def _export_keys(folder) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys.update(f.keys())
    return keys


# the exports whose per-expert tensors transformers does not read: GPTQ / AWQ build only nn.Linear modules and
# Qwen3.5-MoE's per-expert converters take `.weight` names only; Qwen3-VL-MoE has no per-expert converter at all
UNLOADED = [("qwen3_5_moe", "gptq"), ("qwen3_5_moe", "awq"),
            *[("qwen3_vl_moe", f) for f in ("gptq", "awq", "compressed-tensors", "FP8_BLOCK", "FP8_DYNAMIC", "W8A8",
                                            "NVFP4A16")]]


@pytest.mark.slow
@pytest.mark.parametrize("model_type,fmt", UNLOADED)
def test_transformers_leaves_these_moe_exports_experts_random(family_export, model_type, fmt):
    """What docs/INTEROP.md says of transformers 5.25: ``from_pretrained`` succeeds, but its load report lists every
    per-expert tensor of the export UNEXPECTED and each MoE layer's fused ``experts.gate_up_proj`` / ``down_proj``
    MISSING (left at their random initialisation). When this fails, transformers loads them: update INTEROP.md."""
    from transformers import AutoModelForImageTextToText

    needs(fmt)
    folder = family_export(model_type, fmt)
    hf, info = AutoModelForImageTextToText.from_pretrained(folder, device_map="cpu", dtype=torch.float32,
                                                           output_loading_info=True)
    if fmt in ("gptq", "awq"):  # the other decoder linears load quantized
        o_proj = [m for n, m in hf.named_modules() if n.endswith("self_attn.o_proj")]
        assert o_proj and all("gptqmodel" in type(m).__module__ for m in o_proj)
    experts = {k for k in _export_keys(folder) if re.search(r"\.mlp\.experts\.\d+\.", k)}
    layers = {k.partition(".mlp.experts.")[0] for k in experts}
    weights = {k for k in experts if k.endswith((".weight", ".qweight", ".weight_packed"))}
    # every expert's weight unread (FP8_BLOCK's `weight_scale_inv` is taken by the FP8 converter, then dropped)
    assert weights and weights <= set(info["unexpected_keys"]) <= experts
    assert set(info["missing_keys"]) == {f"{x}.mlp.experts.{p}" for x in layers for p in ("gate_up_proj", "down_proj")}


@pytest.mark.slow
def test_transformers_cannot_load_a_w8a8_qwen3_5_moe_export(family_export):
    """transformers' compressed-tensors expert decompression (``CompressedTensorsDequantize.convert``) handles FP8
    (weight, scale) pairs and packed ``weight_packed`` experts; int8 W8A8 experts (``weight`` int8 + ``weight_scale``)
    fall through to the packed path, which collects nothing, and the merge into the fused experts fails."""
    from transformers import AutoModelForImageTextToText

    needs("W8A8")
    with pytest.raises(RuntimeError, match="issues during automatic conversion of the weights"):
        AutoModelForImageTextToText.from_pretrained(family_export("qwen3_5_moe", "W8A8"), device_map="cpu")


@pytest.mark.slow
def test_transformers_misreads_nvfp4_moe_experts_by_their_global_scale(family_export):
    """transformers' NVFP4 expert decompression builds its module without ``weight_global_scale``: every expert's
    weight comes out the global scale times too large, silently (no report entry). The dense linears load."""
    from transformers import AutoModelForImageTextToText

    needs("NVFP4A16")
    folder = family_export("qwen3_5_moe", "NVFP4A16")
    hf = AutoModelForImageTextToText.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16)
    ours, _ = qvlquant.load(folder, dtype=torch.float32)
    expert = ours.get_submodule("model.language_model.layers.2.mlp.experts.5.gate_proj")
    ratio = _expert_gate(hf, 2, 5).norm() / expert.weight_dequantized().float().norm()
    torch.testing.assert_close(ratio, expert.weight_global_scale.float().reshape(()), rtol=1e-2, atol=0)
