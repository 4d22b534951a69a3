"""qvlquant.checkpoint.qconfig: the one reader of ``quantization_config``. What the writer (checkpoint.export) writes
reads back as the QuantConfig it came from; a field left out takes its library's default; a malformed or unsupported
config is a ValueError naming the file and the field, never a KeyError."""

import pytest

from qvlquant.checkpoint.export import quantization_config
from qvlquant.checkpoint.qconfig import CheckpointQuant, read_quantization_config
from qvlquant.families import QWEN2_VL, family_for
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.spec import QuantConfig, QuantSpec

WHERE = "out/q/config.json"
SPECS = {  # what each layout can hold (the AWQ GEMM layout: 4-bit with zero points)
    PackFormat.GPTQ: [QuantSpec(4, 128, True), QuantSpec(8, -1, True), QuantSpec(3, 64, False), QuantSpec(2, 32, True)],
    PackFormat.AWQ_GEMM: [QuantSpec(4, 128, False), QuantSpec(4, 64, False), QuantSpec(4, -1, False)],
    PackFormat.COMPRESSED: [QuantSpec(4, 128, True), QuantSpec(8, -1, True), QuantSpec(3, 64, False),
                            QuantSpec(2, 32, False)],
}
CASES = [(fmt, spec) for fmt, specs in SPECS.items() for spec in specs]
METHOD = {PackFormat.GPTQ: "gptq", PackFormat.AWQ_GEMM: "awq", PackFormat.COMPRESSED: "compressed-tensors"}


@pytest.mark.parametrize("fmt,spec", CASES, ids=[f"{f.value}-{s.bits}-{s.group_size}-{s.sym}" for f, s in CASES])
def test_what_the_writer_writes_reads_back(fmt, spec):
    method = "awq" if fmt is PackFormat.AWQ_GEMM else "rtn"
    written = quantization_config(QuantConfig(method, spec), fmt, QWEN2_VL, 2)
    quant = read_quantization_config(written, WHERE)
    assert (quant.method, quant.pack_format, quant.spec, quant.act_order) == (METHOD[fmt], fmt, spec, False)
    assert quant.summary() == {"quant_method": METHOD[fmt], "bits": spec.bits, "group_size": spec.group_size,
                               "sym": spec.sym}
    if fmt is PackFormat.COMPRESSED:  # the names each client matches, as written
        assert quant.ignore == tuple(QWEN2_VL.compressed_ignore()) and quant.not_converted == ()
    else:
        assert quant.not_converted == tuple(QWEN2_VL.not_converted_names()) and quant.ignore == ()
    if fmt is PackFormat.GPTQ:
        assert quant.in_block[:2] == ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj")
        assert len(quant.in_block) == 2 * sum(len(g) for g in QWEN2_VL.linear_groups)


@pytest.mark.parametrize("desc_act,static_groups,act_order", [(True, False, True), (True, True, False),
                                                              (False, False, False)])
def test_act_order_reads_back_as_the_layout_needs_it(desc_act, static_groups, act_order):
    """GPTQ act-order with static groups is written as plain groups (no g_idx permutation at load time)."""
    qcfg = QuantConfig("gptq", QuantSpec(4, 128, True), desc_act=desc_act, static_groups=static_groups)
    written = quantization_config(qcfg, PackFormat.GPTQ, QWEN2_VL, 2)
    assert read_quantization_config(written, WHERE).act_order is act_order
    if not act_order:  # the compressed-tensors layout holds only contiguous groups ("weight" act-order at most)
        written = quantization_config(qcfg, PackFormat.COMPRESSED, family_for("qwen3_vl"), 2)
        assert read_quantization_config(written, WHERE).act_order is False


def test_full_precision_is_none():
    assert read_quantization_config(None, WHERE) is None and read_quantization_config({}, WHERE) is None


@pytest.mark.parametrize("qc,spec", [
    ({"quant_method": "gptq", "bits": 8}, QuantSpec(8, 128, True)),  # transformers' GPTQConfig defaults
    ({"quant_method": "awq"}, QuantSpec(4, 128, False)),  # transformers' AwqConfig defaults
    ({"quant_method": "awq", "w_bit": 4, "q_group_size": 64}, QuantSpec(4, 64, False)),  # AutoAWQ's spellings
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": False}, QuantSpec(4, 32, True)),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"strategy": "channel"}}}}, QuantSpec(8, -1, True)),  # QuantizationArgs'
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "group_size": -1}}}}, QuantSpec(4, -1, True)),  # inferred
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"format": "pack-quantized",
      "weights": {"num_bits": 4, "group_size": 64, "symmetric": False}}}}, QuantSpec(4, 64, False)),
])
def test_a_field_left_out_takes_its_library_default(qc, spec):
    quant = read_quantization_config(qc, WHERE)
    assert quant.spec == spec and quant.act_order is False
    layouts = {"gptq": "gptq", "awq": "gemm", "compressed-tensors": "pack-quantized"}
    assert quant.checkpoint_format == layouts[qc["quant_method"]]


def ct(weights=None, group=None, **config):
    group = {"weights": {"num_bits": 4, "group_size": 128, **(weights or {})}, **(group or {})}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": group},
            **config}


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "gptq", "group_size": 128}, "quantization_config.bits is missing"),
    ({**GPTQ, "bits": "4"}, "quantization_config.bits must be a whole number, got '4'"),
    ({**GPTQ, "bits": True}, "quantization_config.bits must be a whole number, got True"),
    ({**GPTQ, "bits": 4.0}, "quantization_config.bits must be a whole number, got 4.0"),
    ({**GPTQ, "bits": 5}, "quantization_config: bits must be 2, 3, 4 or 8, got 5"),
    ({**GPTQ, "group_size": 0}, "quantization_config: group_size must be positive or -1"),
    ({**GPTQ, "sym": "yes"}, "quantization_config.sym must be true or false, got 'yes'"),
    ({**GPTQ, "desc_act": 1}, "quantization_config.desc_act must be true or false, got 1"),
    ({**GPTQ, "checkpoint_format": "gptq_v2"}, "checkpoint_format 'gptq_v2' is not supported"),
    ({**GPTQ, "modules_to_not_convert": "visual"}, "modules_to_not_convert must be a list of module names"),
    ({"quant_method": "awq", "version": "gemv"}, "quantization_config.version 'gemv' is not supported"),
    ({"quant_method": "awq", "bits": 8}, "bits is 8: the AWQ GEMM layout holds 4-bit codes only"),
    ({"quant_method": "fp8"}, "quantization_config.activation_scheme is missing"),
    ({"quant_method": "bitnet"}, "quantization_config.quant_method 'bitnet' is not supported"),
    ({"bits": 4}, "quantization_config.quant_method None is not supported"),
    ({"quant_method": ["gptq"]}, "quantization_config.quant_method ['gptq'] is not supported"),
    (["gptq"], "quantization_config must be a JSON object"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "config_groups holds 0 groups"),
    ({**ct(), "config_groups": {"a": {}, "b": {}}}, "config_groups holds 2 groups; qvlquant reads one"),
    (ct(format="float-quantized"), "input_activations is missing; qvlquant reads FP8 with dynamic per-token"),
    (ct(format="naive-quantized"), "quantization_config.format 'naive-quantized' is not supported"),
    ({**ct(), "format": None}, "quantization_config.format 'dense' is not supported"),
    (ct(group={"weights": None}), "quantization_config.config_groups.group_0.weights is missing"),
    (ct({"type": "float"}), "config_groups.group_0.weights.type 'float' is not supported"),
    (ct({"num_bits": "4"}), "config_groups.group_0.weights.num_bits must be a whole number"),
    (ct({"group_size": None}), "weights.strategy 'tensor' is not supported"),
    (ct({"group_size": None, "strategy": "group"}), "weights.group_size is missing; strategy 'group' needs it"),
    (ct({"actorder": 3}), "weights.actorder must be null, a string or true/false, got 3"),
    (ct(ignore="lm_head"), "quantization_config.ignore must be a list of module names"),
])
def test_a_malformed_or_unsupported_config_is_a_value_error_naming_the_file_and_field(qc, message):
    with pytest.raises(ValueError, match="^" + WHERE.replace(".", r"\.") + ": ") as error:
        read_quantization_config(qc, WHERE)
    assert message in str(error.value)


def test_compressed_tensors_group_act_order_is_read_as_act_order():
    """Older llm-compressor checkpoints: actorder "group" (or true) stores a g_idx; "weight" does not."""
    assert read_quantization_config(ct({"actorder": "group"}), WHERE).act_order is True
    assert read_quantization_config(ct({"actorder": True}), WHERE).act_order is True
    assert read_quantization_config(ct({"actorder": "weight"}), WHERE).act_order is False


def test_the_result_is_frozen():
    quant = read_quantization_config(GPTQ, WHERE)
    assert isinstance(quant, CheckpointQuant)
    with pytest.raises(AttributeError):
        quant.method = "awq"
