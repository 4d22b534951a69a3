"""Streaming: the checkpoint is read one decoder layer at a time, what is resident does not grow with the number
of layers, and the export equals the one made from a model held in memory, byte for byte."""

import copy

import pytest
import torch
from tiny_models import TEXT, tiny_batch, tiny_model

import qvlquant
from qvlquant.calib.dataset import CalibConfig
from qvlquant.checkpoint.export import export
from qvlquant.config import CalibSource, JobConfig
from qvlquant.engine.loop import LoopPlan, quantize_model
from qvlquant.engine.resume import DiskStore
from qvlquant.engine.skeleton import build_skeleton, load_config
from qvlquant.engine.streaming import StreamedLayers
from qvlquant.families import QWEN2_VL, family_for
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.spec import QuantConfig
from qvlquant.storage.shards import ShardReader

CASES = [("rtn", {}), ("gptq", {"desc_act": True}), ("awq", {})]


@pytest.mark.slow
@pytest.mark.parametrize("method,options", CASES)
def test_streamed_and_in_memory_exports_are_byte_identical(demo, demo_batches, tmp_path, method, options):
    model, processor = demo
    qcfg = QuantConfig(method, **options)
    q = copy.deepcopy(model)
    plan = LoopPlan(family=QWEN2_VL, qcfg=qcfg, pack_format=PackFormat.for_job(method))
    export(q, processor, quantize_model(q, demo_batches, plan), tmp_path / "memory", {})
    job = JobConfig(output=str(tmp_path / "streamed"), quant=qcfg, calib=CalibSource(num_samples=4, seed=3),
                    processing=CalibConfig(batch_size=2))  # the demo_batches fixture's samples and batching
    qvlquant.quantize(job)
    streamed = (tmp_path / "streamed" / "model.safetensors").read_bytes()
    assert streamed == (tmp_path / "memory" / "model.safetensors").read_bytes()
    assert not (tmp_path / ".streamed.partial").exists()


def resident_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)


def tiny_checkpoint(folder, layers: int, monkeypatch):
    """A bf16 safetensors checkpoint of a tiny Qwen2-VL with ``layers`` decoder layers."""
    monkeypatch.setitem(TEXT, "num_hidden_layers", layers)
    model = tiny_model("qwen2_vl")
    model.to(torch.bfloat16).save_pretrained(folder)
    return model


@pytest.mark.parametrize("layers", [2, 5])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_resident_parameters_are_one_layer_whatever_the_depth(tmp_path, monkeypatch, layers, method):
    """Counted at every step of the loop: exactly one decoder layer's parameters are materialised, for 2 layers as
    for 5; the capture parts are released before the loop, and nothing stays resident at the end."""
    model = tiny_checkpoint(tmp_path / "base", layers, monkeypatch)
    batches = [tiny_batch(model.float(), seed=s) for s in range(2)]
    family = family_for("qwen2_vl")
    skeleton = build_skeleton(load_config(tmp_path / "base", family), family, torch.float32)
    assert resident_bytes(skeleton) == 0
    source = StreamedLayers(skeleton, family, ShardReader(tmp_path / "base"), torch.device("cpu"), torch.float32)
    seen = []
    load, release = source.load, source.release
    monkeypatch.setattr(source, "load", lambda i: (layer := load(i), seen.append(resident_bytes(skeleton)))[0])
    monkeypatch.setattr(source, "release", lambda i: (release(i), seen.append(resident_bytes(skeleton)))[0])
    source.prepare_capture()
    capture = resident_bytes(skeleton)
    one_layer = sum(p.numel() * 4 for p in model.model.language_model.layers[0].parameters())
    plan = LoopPlan(family=family, qcfg=QuantConfig(method), pack_format=PackFormat.for_job(method))
    result = quantize_model(skeleton, batches, plan, source, DiskStore(tmp_path / "partial", "test"))
    assert result.complete and len(result.weights) == 7 * layers
    assert seen[0::2] == [one_layer] * layers and seen[1::2] == [0] * layers
    assert 0 < capture <= resident_bytes(model) - layers * one_layer  # the capture parts hold no decoder layer
    assert resident_bytes(skeleton) == 0


def test_resume_checkpoints_hold_packed_tensors_not_float_copies(tmp_path, monkeypatch):
    model = tiny_checkpoint(tmp_path / "base", 2, monkeypatch)
    family = family_for("qwen2_vl")
    skeleton = build_skeleton(load_config(tmp_path / "base", family), family, torch.float32)
    source = StreamedLayers(skeleton, family, ShardReader(tmp_path / "base"), torch.device("cpu"), torch.float32)
    source.prepare_capture()
    store = DiskStore(tmp_path / "partial", "test")
    plan = LoopPlan(family=family, qcfg=QuantConfig("gptq"), pack_format=PackFormat.GPTQ)
    quantize_model(skeleton, [tiny_batch(model.float())], plan, source, store)
    keys = ShardReader(tmp_path / "partial", ["layer_0000.safetensors"]).keys()
    linears = [f"t.model.layers.0.{n}" for n in family.linears]
    assert all(f"{n}.qweight" in keys and f"{n}.weight" not in keys for n in linears)
    layer_file = (tmp_path / "partial" / "layer_0000.safetensors").stat().st_size
    assert layer_file < sum(p.numel() for p in model.model.language_model.layers[0].parameters())  # < 1 byte a weight


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no CUDA device exists")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    from qvlquant.cli import main

    assert main(["quantize", "--device", "cuda", "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is visible" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_cuda_quantization_matches_the_cpu_within_tolerance(tmp_path, method):
    """The layer, its statistics and the math on the GPU (float32 here, to compare): the exported weights agree
    with the CPU's up to floating-point tolerance."""
    weights = {}
    for device in ("cpu", "cuda"):
        job = JobConfig.from_flat(output=str(tmp_path / device), method=method, num_samples=4, device=device,
                                  dtype="float32")
        qvlquant.quantize(job)
        model, _ = qvlquant.load(tmp_path / device)
        weights[device] = {n: m.quantized_weight().dequantize() for n, m in model.named_modules()
                           if hasattr(m, "quantized_weight")}
    assert weights["cpu"].keys() == weights["cuda"].keys() and len(weights["cpu"]) == 28
    for name, w in weights["cpu"].items():
        rel = (w - weights["cuda"][name]).norm() / w.norm()
        assert rel < 2e-2, f"{name}: {rel:.3g}"


@pytest.fixture(scope="module")
def qwen3_5_base(tmp_path_factory):
    from tiny_models import qwen3_5_checkpoint

    folder = tmp_path_factory.mktemp("qwen3_5") / "base"
    qwen3_5_checkpoint(folder)
    return folder


def _tensors(folder):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in list(f.keys())}  # safe_open is no mapping


@pytest.mark.slow
@pytest.mark.parametrize("method,fmt", [("rtn", "compressed-tensors"), ("gptq", "auto"), ("awq", "auto")])
def test_qwen3_5_streamed_export_is_the_in_memory_quantized_model(qwen3_5_base, tmp_path, method, fmt):
    """Qwen3.5 (DeltaNet and full-attention layers) through ``qvlquant.quantize`` from its folder: the export holds
    the tensors the in-memory loop makes from the same batches, reloads with ``qvlquant.load`` to its logits, and
    carries the MTP head, the DeltaNet's conv1d / A_log / dt_bias / gated norm and the vision tower unchanged."""
    from tiny_models import MTP_KEYS

    from qvlquant.calib.dataset import build_batches
    from qvlquant.calib.sources import load_samples
    from qvlquant.config import ExportConfig
    from qvlquant.engine.streaming import load_base

    model, processor, family, storage = load_base(qwen3_5_base)
    samples, names, _ = load_samples("demo", 4, seed=3)
    batches = build_batches(processor, samples, CalibConfig(batch_size=2), names)
    job = JobConfig(model=str(qwen3_5_base), output=str(tmp_path / "streamed"), quant=QuantConfig(method),
                    calib=CalibSource(source="demo", num_samples=4, seed=3), processing=CalibConfig(batch_size=2),
                    export=ExportConfig(format=fmt))
    plan = LoopPlan(family=family, qcfg=job.quant, pack_format=job.pack_format, storage_dtype=storage)
    export(model, processor, quantize_model(model, batches, plan), tmp_path / "memory", {})
    qvlquant.quantize(job)
    streamed, memory = (_tensors(tmp_path / n) for n in ("streamed", "memory"))
    base = _tensors(qwen3_5_base)
    assert set(streamed) == set(memory) | set(MTP_KEYS)
    assert all(torch.equal(streamed[k], memory[k]) for k in memory)
    kept = [k for k in base if k in MTP_KEYS or "visual." in k
            or any(p in k for p in ("conv1d", "A_log", "dt_bias", "linear_attn.norm", "q_norm", "k_norm"))]
    assert len(kept) > len(MTP_KEYS) + 12
    for k in kept:  # bit for bit, in the checkpoint's dtype (the MTP norm is float32 there)
        assert streamed[k].dtype == base[k].dtype and torch.equal(streamed[k].view(torch.uint8), base[k].view(torch.uint8)), k
    reloaded, _ = qvlquant.load(tmp_path / "streamed")
    linears = {n for n, m in reloaded.named_modules() if type(m).__name__ == "QuantLinear"}
    assert len(linears) == 31 and any(".linear_attn.in_proj_qkv" in n for n in linears)
    with torch.no_grad():
        for batch in batches[:2]:
            torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)
