import collections
import copy
import time

import pytest
import torch

from qvlquant.engine.loop import (
    LoopPlan,
    capture_inputs,
    check_group_size,
    quantize_model,
)
from qvlquant.families import QWEN2_VL
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.layer import LayerContext, Phase, QuantizationError, next_input
from qvlquant.quant.spec import QuantConfig, QuantSpec


def test_replaying_captured_inputs_reproduces_hf_forward(demo, demo_batches):
    model, _ = demo
    image_batch = next(b for b in demo_batches if "pixel_values" in b)
    inputs = capture_inputs(model, QWEN2_VL, [image_batch])
    x = inputs[0]
    for i, layer in enumerate(model.model.language_model.layers):
        x = next_input(i, layer, x)
    replayed = model.model.language_model.norm(x.hidden)
    with torch.no_grad():
        reference = model.model(**image_batch, use_cache=False).last_hidden_state
    mask = image_batch["attention_mask"].bool()
    torch.testing.assert_close(replayed[mask], reference[mask], rtol=1e-5, atol=1e-5)


def test_capture_keeps_mrope_positions_per_row(demo, demo_batches):
    """Rows of a padded batch see exactly what they see alone (M-RoPE position embeddings included)."""

    model, processor = demo
    batch = next(b for b in demo_batches if b["input_ids"].shape[0] == 2 and "pixel_values" in b)
    together = capture_inputs(model, QWEN2_VL, [batch])[0]
    n0 = int(batch["image_grid_thw"][0].prod())
    first = {k: batch[k][:1] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    first["input_ids"] = first["input_ids"][:, : int(batch["attention_mask"][0].sum())]
    for k in ("attention_mask", "mm_token_type_ids"):
        first[k] = first[k][:, : first["input_ids"].shape[1]]
    first.update(pixel_values=batch["pixel_values"][:n0], image_grid_thw=batch["image_grid_thw"][:1])
    alone = capture_inputs(model, QWEN2_VL, [first])[0]
    s = first["input_ids"].shape[1]
    torch.testing.assert_close(together.hidden[0, :s], alone.hidden[0], rtol=1e-5, atol=1e-5)
    cos_t, cos_a = together.kwargs["position_embeddings"][0], alone.kwargs["position_embeddings"][0]
    torch.testing.assert_close(cos_t[..., 0, :s, :] if cos_t.dim() == 4 else cos_t[0, :s], cos_a[..., 0, :, :] if cos_a.dim() == 4 else cos_a[0])


def test_rtn_pipeline_quantizes_only_decoder_linears(demo, demo_batches):
    model, _ = demo
    q = copy.deepcopy(model)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    plan = LoopPlan(family=QWEN2_VL, qcfg=QuantConfig("rtn", QuantSpec(4, 128, True)), pack_format=PackFormat.GPTQ)
    result = quantize_model(q, demo_batches, plan)
    assert len(result.weights) == 4 * 7
    changed = {k for k, v in q.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{name}.weight" for name in result.weights}
    assert not any("visual" in k or "embed" in k or "lm_head" in k for k in changed)


def test_phases_are_the_ones_the_method_names_never_its_text(demo, demo_batches, monkeypatch):
    """The clock follows the Phase a method reports; its progress text (here starting with another phase's word)
    is only shown."""
    from qvlquant.quant import apply

    rtn = apply.LAYER_METHODS["rtn"]

    def searching_rtn(layer, inputs, ctx):
        ctx.step(Phase.SCALE, "hessian of nothing: the text is not the phase")
        rtn(layer, inputs, ctx)

    monkeypatch.setitem(apply.LAYER_METHODS, "rtn", searching_rtn)
    model, _ = demo
    plan = LoopPlan(family=QWEN2_VL, qcfg=QuantConfig("rtn", QuantSpec(8, 128, True)), pack_format=PackFormat.GPTQ)
    phases = quantize_model(copy.deepcopy(model), demo_batches[:1], plan).phases.rounded()
    assert set(phases) == {"capture", "load", "scale", "quantize", "pack", "replay", "save"}
    assert all(type(k) is str for k in phases)  # plain names in the report's JSON


SLEEP = 0.02  # seconds each patched call of a method's per-linear work sleeps


@pytest.mark.parametrize("method, slept", [
    ("gptq", {"collect_hessians": Phase.HESSIAN, "gptq_quantize": Phase.SOLVE}),
    ("awq", {"capture_linear_inputs": Phase.INPUTS, "search_scale": Phase.SCALE, "_clip_gram": Phase.CLIP,
             "clip_from_gram": Phase.CLIP, "rtn_quantize": Phase.QUANTIZE}),
    ("rtn", {"rtn_quantize": Phase.QUANTIZE}),
])
def test_each_linear_is_timed_in_the_phase_that_spends_it(demo, demo_batches, monkeypatch, method, slept):
    """Every call of a method's work (GPTQ's solve of each of q, k and v from one Hessian, AWQ's input capture,
    searches and clipping Gram matrices, rounding) and every linear's packing runs while the clock is in its own
    phase, not in the phase the linear before it was packed in: patched to sleep a known time, each phase holds at
    least calls x sleep, and ``quantize`` takes none of it unless rounding is what slept."""
    from qvlquant.engine import loop
    from qvlquant.quant import apply

    clocks = []  # the run's Phases, to read which phase is current during each call
    init = loop.Phases.__init__
    monkeypatch.setattr(loop.Phases, "__init__", lambda self: (init(self), clocks.append(self))[0])
    during = collections.defaultdict(list)  # the phase a call should be timed in -> the phase current in each call

    def sleeping(fn, phase):
        def run(*args, **kwargs):
            during[phase].append(clocks[-1].current)
            time.sleep(SLEEP)
            return fn(*args, **kwargs)

        return run

    for name, phase in slept.items():
        monkeypatch.setattr(apply, name, sleeping(getattr(apply, name), phase))
    monkeypatch.setattr(LoopPlan, "pack", sleeping(LoopPlan.pack, Phase.PACK))
    model, _ = demo
    plan = LoopPlan(family=QWEN2_VL, qcfg=QuantConfig(method, QuantSpec(4, 128, method != "awq")),
                    pack_format=PackFormat.GPTQ)
    seconds = quantize_model(copy.deepcopy(model), demo_batches[:1], plan).phases.seconds
    assert set(during) == set(slept.values()) | {Phase.PACK}
    assert len(during[Phase.PACK]) == 4 * 7  # the demo's 4 layers of 7 linears, each packed once
    for phase, current in during.items():
        assert current == [phase] * len(current), (phase, collections.Counter(current))
        assert seconds[phase] >= len(current) * SLEEP, (phase, seconds)
    if Phase.QUANTIZE not in slept.values():
        assert seconds.get(Phase.QUANTIZE, 0.0) < SLEEP, seconds


def test_group_size_checked_before_calibration(demo):
    model, _ = demo
    with pytest.raises(ValueError, match=r"group_size 96 does not divide .*q_proj \(in_features 256\)"):
        check_group_size(model, QWEN2_VL, QuantSpec(4, 96, True))


def test_nan_activations_stop_naming_the_layer(demo, demo_batches):
    model, _ = demo
    q = copy.deepcopy(model)
    q.model.language_model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match=r"layers\.2"):
        plan = LoopPlan(family=QWEN2_VL, qcfg=QuantConfig("rtn", QuantSpec(8, 128, True)), pack_format=PackFormat.GPTQ)
        quantize_model(q, demo_batches[:1], plan)


def test_linear_without_calibration_tokens_raises_naming_it(demo, demo_batches):
    import dataclasses

    from qvlquant.quant.apply import gptq_layer

    model, _ = demo
    layer = copy.deepcopy(model.model.language_model.layers[0])
    inputs = capture_inputs(model, QWEN2_VL, demo_batches[:1])
    empty = [dataclasses.replace(x, token_mask=torch.zeros_like(x.token_mask)) for x in inputs]
    with pytest.raises(QuantizationError, match=r"layers\.0\.self_attn\.q_proj: received no calibration tokens"):
        ctx = LayerContext(family=QWEN2_VL, qcfg=QuantConfig("gptq", QuantSpec(4, 128, True)),
                           prefix="model.language_model.layers.0", storage_dtype=torch.bfloat16,
                           finish=lambda *a: None)
        gptq_layer(layer, empty, ctx)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_beat_rtn_on_layer_error(demo, demo_batches, method):
    """On held-out activations of the demo, W3 GPTQ/AWQ output errors are below RTN's (GPTQ by at least 2x)."""
    from qvlquant.calib.dataset import CalibConfig, build_batches
    from qvlquant.calib.sources import load_samples
    from qvlquant.eval.compare import layer_errors

    model, processor = demo
    samples, names, _ = load_samples("demo", 6, seed=11)
    heldout = build_batches(processor, samples, CalibConfig(), names)
    sym = method == "gptq"
    errors = {}
    for m in ("rtn", method):
        q = copy.deepcopy(model)
        plan = LoopPlan(family=QWEN2_VL, qcfg=QuantConfig(m, QuantSpec(3, 128, sym)),
                        pack_format=PackFormat.GPTQ)  # any width; the records are read back, not exported
        result = quantize_model(q, demo_batches, plan)
        errs = layer_errors(model, result.weights, heldout)
        errors[m] = sum(errs.values()) / len(errs)
    factor = 0.5 if method == "gptq" else 0.95
    assert errors[method] < factor * errors["rtn"]


def test_each_layer_is_calibrated_on_the_quantized_outputs_of_the_one_before(demo, demo_batches, monkeypatch):
    """What layer N + 1's method receives is layer N's output with layer N's weights already quantized (so each
    layer's quantization sees and can correct the error of those before it), not the full-precision output.
    Measured at W3 RTN on the demo: the full-precision outputs are 5-14% away (relative norm over real tokens)."""
    import dataclasses

    from qvlquant.quant import apply

    model, _ = demo
    q = copy.deepcopy(model)
    received = []  # per layer: the inputs its method was handed
    rtn = apply.LAYER_METHODS["rtn"]

    def recording(layer, inputs, ctx):
        received.append([dataclasses.replace(x, hidden=x.hidden.clone()) for x in inputs])
        rtn(layer, inputs, ctx)

    monkeypatch.setitem(apply.LAYER_METHODS, "rtn", recording)
    quantize_model(q, demo_batches, LoopPlan(family=QWEN2_VL, qcfg=QuantConfig("rtn", QuantSpec(3, 128, True)),
                                             pack_format=PackFormat.GPTQ))
    full, quantized = model.model.language_model.layers, q.model.language_model.layers
    assert len(received) == len(full) == 4
    for i in range(len(full) - 1):
        for x, seen in zip(received[i], received[i + 1]):
            mask = x.token_mask
            assert torch.equal(seen.hidden[mask], next_input(i, quantized[i], x).hidden[mask])
            fp = next_input(i, full[i], x).hidden[mask]
            gap = ((seen.hidden[mask] - fp).norm() / fp.norm()).item()
            assert gap > 0.01, f"layer {i + 1}'s inputs are within {gap:.4f} of the full-precision outputs"


def test_hybrid_layers_replay_with_the_mask_of_their_own_type():
    """Qwen3.5: DeltaNet layers receive the 2-D padding mask, full-attention layers the causal mask. Each layer,
    replayed from what the capture kept for its type, gives the hidden states of the HF forward (padded batch)."""
    from tiny_models import tiny_batch, tiny_model

    from qvlquant.families import family_for

    model = tiny_model("qwen3_5")
    batch = tiny_batch(model)
    family = family_for("qwen3_5").bind(model.config)
    x = capture_inputs(model, family, [batch])[0]
    assert set(x.kwargs_of) == {"linear_attention", "full_attention"}
    assert x.kwargs_of["linear_attention"]["attention_mask"].dim() == 2  # padding mask of the recurrent layers
    with torch.no_grad():
        reference = model.model(**batch, use_cache=False, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    for i, layer in enumerate(model.model.language_model.layers):
        x = next_input(i, layer, x.of_type(family.layer_type(i)))
        expected = model.model.language_model.norm(x.hidden) if i == len(reference) - 2 else x.hidden
        torch.testing.assert_close(expected[mask], reference[i + 1][mask], rtol=1e-5, atol=1e-5)


def test_phases_name_the_phase_in_which_resident_memory_rose():
    """``Phases.highs_gib``: the high-water mark read at each switch is given to the phase that just ended, and only
    when it rose during that phase (a fake reader: 1, 1, 3, 3, 5 GiB)."""
    from qvlquant.engine.loop import Phases

    marks = iter(g * 2**30 for g in (1, 1, 3, 3, 5))
    phases = Phases(high_water=lambda: next(marks))
    for phase in (Phase.LOAD, Phase.HESSIAN, Phase.SOLVE, Phase.HESSIAN, None):
        phases.switch(phase)
    assert phases.highs_gib() == {"hessian": 5.0}  # load raised nothing (1 -> 1), hessian 1 -> 3, solve 3 -> 3, 3 -> 5


def test_phases_see_a_real_allocation_in_its_phase():
    """Linux's VmHWM, read by default: inside ``solve`` a tensor touched to 256 MiB above the process's earlier
    high-water mark raises the mark there, by about that much, and nowhere else."""
    from qvlquant.engine.loop import Phases
    from qvlquant.parallel.devices import rss_high_water_bytes

    start = rss_high_water_bytes()
    if start is None:
        pytest.skip("no /proc/self/status VmHWM here")
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    phases = Phases()
    phases.switch(Phase.LOAD)
    phases.switch(Phase.SOLVE)
    current = torch.ones((start - rss + 2**28) // 4, dtype=torch.float32)  # every page written
    phases.switch(None)
    del current
    highs = phases.highs_gib()
    assert set(highs) == {"solve"} and highs["solve"] * 2**30 >= start + 2**28 - 2**24, (highs, start)


def test_a_saved_layer_record_is_not_held_while_the_next_layer_is_quantized(demo, demo_batches, monkeypatch):
    """Streaming keeps one layer: once a store has saved layer i's record (a disk store keeps none of it), nothing of
    the loop still holds it when layer i + 1 is quantized. At Qwen3.5-35B-A3B size a record is 0.39 GiB of packed
    experts."""
    import gc
    import weakref

    from qvlquant.engine import loop

    saved = []  # weak references to the records the store was given

    class ForgetfulStore:
        def resume_point(self):
            return 0, None

        def save(self, i, record, hidden):
            saved.append(weakref.ref(record))

    alive_at_start = []
    real = loop.quantize_layer

    def quantize_layer(*args, **kwargs):
        gc.collect()
        alive_at_start.append([ref() is not None for ref in saved])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "quantize_layer", quantize_layer)
    model, _ = demo
    plan = LoopPlan(family=QWEN2_VL, qcfg=QuantConfig("rtn", QuantSpec(4, 128, True)), pack_format=PackFormat.GPTQ)
    quantize_model(copy.deepcopy(model), demo_batches[:1], plan, store=ForgetfulStore())
    assert len(alive_at_start) == 4 and alive_at_start[1:] == [[False], [False, False], [False, False, False]], \
        alive_at_start
