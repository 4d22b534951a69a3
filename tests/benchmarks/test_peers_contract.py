"""The peer benchmark's contract, checked in qvlquant's venv without the peers' venvs (benchmarks/peers/).

export_batches.py must hand the peers exactly the batches qvlquant calibrates on; run_gptqmodel.py's GPTQ reader
must invert the GPTQ v1 layout qvlquant writes (the same AutoGPTQ layout GPTQModel saves); both runners map the
transformers-5 names back to the input folder's keys, or refuse naming the key.
"""

import importlib.util
import json
import pathlib
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor

from qvlquant.assets.paths import MODEL_DIR
from qvlquant.calib.dataset import CalibConfig, build_batches
from qvlquant.calib.sources import load_samples
from qvlquant.quant.formats import PackFormat, QuantizedWeight
from qvlquant.quant.rtn import default_g_idx
from qvlquant.quant.spec import QuantSpec

PEERS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "peers"


def _module(name: str):
    """A script of benchmarks/peers/ as a module (the folder is not a package; the peers' own libraries are
    imported inside functions only, so this works without their venvs)."""
    return _module_at(PEERS / f"{name}.py")


def _module_at(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"peers_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


export_batches = _module("export_batches")
run_gptqmodel = _module("run_gptqmodel")
run_llmcompressor = _module("run_llmcompressor")


def test_exported_batches_are_qvlquants_batches(tmp_path):
    export_batches.main(["--model", "demo", "--num-samples", "6", "--seed", "3", "--output", str(tmp_path)])
    samples, names, _ = load_samples("demo", 6, seed=3)
    expected = build_batches(AutoProcessor.from_pretrained(MODEL_DIR), samples, CalibConfig(), names)
    got = export_batches.read_batches(tmp_path)
    assert len(got) == len(expected) == 6
    for i, (g, e) in enumerate(zip(got, expected)):
        assert sorted(g) == sorted(e), f"batch {i}"
        assert "mm_token_type_ids" in g  # GPTQModel needs it for image samples
        for key in e:
            assert g[key].dtype == e[key].dtype and torch.equal(g[key], e[key]), f"batch {i} {key}"
    assert any("pixel_values" in b for b in got) and any("pixel_values" not in b for b in got)  # both kinds drawn
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["count"] == 6 and index["seed"] == 3 and index["model"] == str(MODEL_DIR.resolve())
    assert index["num_tokens"] == sum(int(b["attention_mask"].sum()) for b in expected)
    assert index["num_images"] == sum(len(b["image_grid_thw"]) for b in expected if "image_grid_thw" in b)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(index["files"] + ["index.json"])  # no pickle


def _random_weight(bits: int, group: int, act_order: bool, n: int = 32, k: int = 64) -> QuantizedWeight:
    spec = QuantSpec(bits, group, sym=False)
    g = torch.Generator().manual_seed(bits * 100 + group)
    groups = spec.groups(k)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    zero = torch.randint(0, 2**bits, (n, groups), generator=g).float()
    zero[:, 0] = 0  # v1 stores zero - 1: zero 0 wraps to 2**bits - 1 and must come back as 0
    scale = (torch.rand(n, groups, generator=g) + 0.01).half().float()  # fp16-exact: the layout stores fp16
    g_idx = default_g_idx(k, spec)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return QuantizedWeight(q, scale, zero, g_idx.to(torch.int32), spec)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,act_order", [(32, False), (32, True), (-1, False)])
def test_gptq_reader_inverts_the_v1_layout(bits, group, act_order):
    w = _random_weight(bits, group, act_order)
    packed = PackFormat.GPTQ.pack(w)
    got = run_gptqmodel.dequantize_gptq(packed, bits, v1=True)
    assert got.dtype == torch.float32
    assert torch.equal(got, w.dequantize())


def test_gptq_reader_v2_keeps_zeros_as_stored():
    w = _random_weight(4, 32, False)
    packed = PackFormat.GPTQ.pack(w)
    v1 = run_gptqmodel.dequantize_gptq(packed, 4, v1=True)
    v2 = run_gptqmodel.dequantize_gptq(packed, 4, v1=False)  # zeros read one lower (mod 16): every weight shifts
    assert not torch.equal(v1, v2)
    nonwrapped = (w.zero != 0)[:, w.g_idx.long()]  # [N, K]
    assert torch.allclose((v1 - v2)[nonwrapped], -w.scale[:, w.g_idx.long()][nonwrapped])


@pytest.mark.parametrize("runner", [run_gptqmodel, run_llmcompressor])
def test_runners_map_transformers5_names_back(runner):
    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k): v for k, v in base.items()}
    dense, names = runner.to_input_layout(renamed, MODEL_DIR)
    assert list(dense) == list(base)
    assert all(dense[k].dtype == torch.float32 and torch.equal(dense[k], base[k].float()) for k in base)
    assert names["model.language_model.layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.up_proj.weight"
    del renamed["model.visual.merger.ln_q.weight"]
    with pytest.raises(SystemExit, match="visual.merger.ln_q.weight: 0 matches"):
        runner.to_input_layout(renamed, MODEL_DIR)


def test_gptq_reader_reads_each_linear_at_the_width_its_tensors_hold():
    """Under GPTQModel's ``dynamic`` one checkpoint mixes widths: each linear is read at its own, from the shapes."""
    from qvlquant.quant.rules import packed_bits

    weights = {"a": _random_weight(4, 32, False), "b": _random_weight(8, 32, True), "c": _random_weight(3, -1, False)}
    packed = {f"{name}.{key}": t for name, w in weights.items() for key, t in PackFormat.GPTQ.pack(w).items()}
    state, widths = run_gptqmodel.dequantize_state(packed, v1=True)
    assert sorted(widths) == ["a", "b", "c"] and not any(k.endswith(".qweight") for k in state)
    for name, w in weights.items():
        n, k = w.q.shape
        assert torch.equal(state[f"{name}.weight"], w.dequantize()), name
        assert widths[name] == {"bits": w.spec.bits, "groups": w.spec.groups(k), "in_features": k, "out_features": n,
                                "packed_bits": packed_bits(PackFormat.GPTQ, w.spec, k, n)}  # qvlquant's size count


def test_gptq_reader_refuses_shapes_of_no_width_naming_the_linear():
    t = PackFormat.GPTQ.pack(_random_weight(4, 32, False, n=64))
    with pytest.raises(SystemExit, match=r"layers\.0\.q: qzeros \[2, 3\] against scales \[2, 64\] is no"):
        run_gptqmodel.dequantize_state({"layers.0.q.qzeros": t["qzeros"][:, :3], **{
            f"layers.0.q.{k}": v for k, v in t.items() if k != "qzeros"}}, v1=True)
    with pytest.raises(SystemExit, match=r"layers\.0\.q: qweight \[6, 64\], g_idx \[64\] does not hold 4-bit"):
        run_gptqmodel.dequantize_state({"layers.0.q.qweight": t["qweight"][:6], **{
            f"layers.0.q.{k}": v for k, v in t.items() if k != "qweight"}}, v1=True)


def test_dynamic_is_checked_before_gptqmodel_runs():
    ok = {"+:.*\\.layers\\.(?:0|3)\\.": {"bits": 8}, "-:.*visual.*": {}, ".*mlp": {"group_size": 64}}
    assert run_gptqmodel.Settings(4, 128, True, dynamic=ok).dynamic == ok
    for bad, message in [({"+:(": {"bits": 8}}, "not a regular expression"), ({"+:a": 8}, "must be an object"),
                         ({"-:a": {"bits": 8}}, "give it {}"), ({"+:a": {"bits": 9}}, "2..8-bit"),
                         ({"+:a": {"bits": True}}, "2..8-bit"), ({}, "a JSON object")]:
        with pytest.raises(ValueError, match=message):
            run_gptqmodel.Settings(4, 128, True, dynamic=bad)
    with pytest.raises(SystemExit):  # argparse: not JSON
        run_gptqmodel.main(["--model", "m", "--batches", "b", "--output", "o", "--dynamic", "{bits: 8}"])


layout = _module("layout")


def test_weight_errors_compares_each_linear_with_the_input_weight_it_came_from(tmp_path):
    """The real-size peer benchmark's sanity check: each dequantized linear, named as in the peer's model, against
    the input folder's weight (shards included), as a relative error; non-finite and unmatched linears are named."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 8), "model.layers.0.mlp.down_proj.weight":
            torch.randn(8, 16), "visual.blocks.0.qkv.weight": torch.randn(24, 8)}
    save_file({k: v for k, v in base.items() if "up_proj" in k}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: v for k, v in base.items() if "up_proj" not in k}, str(tmp_path / "model-00002-of-00002.safetensors"))
    up, down = "model.language_model.layers.0.mlp.up_proj", "model.language_model.layers.0.mlp.down_proj"
    noise = {up: 0.1, down: 0.3}  # the error each dequantized weight is given, relative to its input weight
    got = {}
    for name, rel in noise.items():
        w = base[name.replace("language_model.", "") + ".weight"]
        d = torch.randn_like(w)
        got[name] = w + d * (rel * w.norm() / d.norm())
    r = layout.weight_errors([up, down], got.__getitem__, tmp_path)
    assert r["linears"] == 2 and r["worst"] == down and not r["nonfinite"] and not r["unmatched"]
    assert r["max"] == pytest.approx(0.3, rel=1e-4) and r["median"] == pytest.approx(0.3, rel=1e-4)  # of 2: upper
    got[up] = got[up].clone()
    got[up][0, 0] = float("nan")
    r = layout.weight_errors([up, down, "model.language_model.layers.0.mlp.gate_proj"], got.__getitem__, tmp_path)
    assert r["nonfinite"] == [up] and r["unmatched"] == ["model.language_model.layers.0.mlp.gate_proj"]
    with pytest.raises(SystemExit, match="down_proj: dequantized shape \\[16, 8\\]"):
        layout.weight_errors([down], lambda name: torch.zeros(16, 8), tmp_path)
    assert layout.input_files(tmp_path)["visual.blocks.0.qkv.weight"].name == "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("method, batches, keep, error", [
    ("NVFP4", False, True, "--batches is needed"),  # a calibrated preset observes its activation scales
    ("FP8", True, False, "give --keep DIR"),  # its output is the compressed checkpoint
    ("FP8_DYNAMIC", True, True, "taken by no data-free preset"),
])
def test_llmcompressor_presets_take_batches_only_where_they_calibrate(tmp_path, capsys, method, batches, keep, error):
    argv = ["--model", str(MODEL_DIR), "--method", method, "--output", str(tmp_path / "out")]
    argv += ["--batches", str(tmp_path)] if batches else []
    argv += ["--keep", str(tmp_path / "kept")] if keep else []
    with pytest.raises(SystemExit):
        run_llmcompressor.main(argv)
    assert error in capsys.readouterr().err
    assert run_llmcompressor.Settings(method, 4, 128, True).method == method


def test_moe_peer_experts_land_in_the_fused_experts_of_the_loaded_model(tmp_path):
    """Both peers save Qwen3.5-MoE's experts one linear each (``mlp.experts.N.gate_proj.weight``), as the bed's
    checkpoint stores them: the runners keep those keys, and the folder bench_peers.py loads puts each expert's
    tensors into that expert of the loaded model (qvlquant.load's ExpertLinears, one linear per expert, where
    transformers 5 would hold slices of a fused ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I])."""
    from safetensors.torch import save_file

    from qvlquant.assets.paths import QWEN3_5_MOE_DIR

    bench_peers = _module_at(PEERS.parent / "bench_peers.py")
    with safe_open(str(QWEN3_5_MOE_DIR / "model.safetensors"), "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    prefix = "model.language_model.layers.2.mlp.experts.5."
    state = dict(base)
    state[prefix + "gate_proj.weight"] = base[prefix + "gate_proj.weight"] * 2  # exact in bf16
    state[prefix + "down_proj.weight"] = -base[prefix + "down_proj.weight"]
    dense, renamed = run_llmcompressor.to_input_layout(state, QWEN3_5_MOE_DIR)
    assert list(dense) == list(base) and renamed[prefix + "up_proj.weight"] == prefix + "up_proj.weight"
    out = tmp_path / "peer"
    out.mkdir()
    save_file(dense, str(out / "model.safetensors"))
    model = bench_peers.dense_model(QWEN3_5_MOE_DIR, out)
    experts = model.model.language_model.layers[2].mlp.experts
    inter = base[prefix + "gate_proj.weight"].shape[0]
    got = {n: p.detach().float() for n, p in experts.named_parameters()}
    if "gate_up_proj" in got:  # transformers' fused experts, should a load keep them
        gate, up, down = got["gate_up_proj"][5, :inter], got["gate_up_proj"][5, inter:], got["down_proj"][5]
        assert torch.equal(got["gate_up_proj"][4, :inter], base[prefix.replace(".5.", ".4.") + "gate_proj.weight"].float())
    else:  # qvlquant's ExpertLinears
        gate, up, down = (got[f"5.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    assert torch.equal(gate, base[prefix + "gate_proj.weight"].float() * 2)
    assert torch.equal(up, base[prefix + "up_proj.weight"].float())
    assert torch.equal(down, -base[prefix + "down_proj.weight"].float())
    with pytest.raises(KeyError, match="does not hold exactly the keys"):
        del dense[prefix + "up_proj.weight"]
        save_file(dense, str(out / "model.safetensors"))
        bench_peers.dense_model(QWEN3_5_MOE_DIR, out)


def test_gptqmodel_runner_calls_hybrid_layers_without_position_ids():
    """GPTQModel 7.7 keeps a decoder layer's position_ids only when not None, and Qwen3.5 passes them for some
    batches only: the runner drops them for every call of such a layer, and leaves other modules alone."""
    import types

    layer_cls = type("Qwen3_5MoeDecoderLayer", (torch.nn.Module,), {"forward": lambda self, x, position_ids=None: position_ids})
    other_cls = type("Qwen2VLDecoderLayer", (torch.nn.Module,), {"forward": lambda self, x, position_ids=None: position_ids})
    layer, other = layer_cls(), other_cls()
    model = types.SimpleNamespace(model=torch.nn.ModuleList([layer, other]))
    assert run_gptqmodel._no_layer_position_ids(model) == 1
    pos = torch.arange(3)
    assert layer(torch.zeros(3), position_ids=pos) is None and other(torch.zeros(3), position_ids=pos) is pos


def test_gptqmodel_calibration_log_names_its_rtn_fallbacks():
    log = [{"process": "gptq", "layer": 0, "module": "mlp.experts.1.up_proj", "loss": "0.00015", "samples": "160"},
           {"process": "gptq", "layer": 3, "module": "mlp.experts.0.up_proj", "loss": "fallback(rtn): 0.0021",
            "samples": "16"},
           {"process": "other"}]
    got = run_gptqmodel.calibration_log(log)
    assert got == {"linears": 2, "min_samples": 16, "fallback": ["3.mlp.experts.0.up_proj (16)"]}
