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
    ({**ct(), "config_groups": {"a": {}, "b": {}}}, "quantization_config.config_groups.a.weights is missing"),
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



# --- mixed precision: per-module rules ------------------------------------------------------------------------------
SKIP = r"-:.*\.layers\.(?:0|27)\.mlp\.(?:down_proj)$"
EIGHT = r"+:.*\.layers\.(?:3|5)\.self_attn\.(?:q_proj|k_proj|v_proj|qkv_proj)$"
DYNAMIC = {SKIP: {}, EIGHT: {"bits": 8, "group_size": 128, "sym": True, "desc_act": False}}
RUNTIME = "model.language_model.layers.{}.{}"  # transformers' names of the decoder linears
W4, W8 = QuantSpec(4, 128, True), QuantSpec(8, 128, True)


def test_gptq_dynamic_gives_each_linear_its_setting():
    quant = read_quantization_config({**GPTQ, "dynamic": DYNAMIC}, WHERE)
    assert quant.overrides[0].spec is None and quant.overrides[1].spec == W8 and quant.mixed
    assert quant.spec_for(RUNTIME.format(0, "mlp.down_proj")) is None
    assert quant.spec_for(RUNTIME.format(27, "mlp.down_proj")) is None
    assert quant.spec_for(RUNTIME.format(3, "self_attn.k_proj")) == W8
    assert quant.spec_for(RUNTIME.format(5, "self_attn.q_proj")) == W8
    for name in (RUNTIME.format(3, "self_attn.o_proj"), RUNTIME.format(4, "self_attn.q_proj"),
                 RUNTIME.format(30, "self_attn.q_proj"), RUNTIME.format(0, "mlp.up_proj")):
        assert quant.spec_for(name) == W4, name
    # the patterns match the checkpoint's keys and vLLM's fused names as well
    assert quant.spec_for("model.layers.3.self_attn.v_proj") == W8
    assert quant.spec_for("language_model.model.layers.5.self_attn.qkv_proj") == W8
    assert quant.spec_for("language_model.model.layers.27.mlp.down_proj") is None


def test_gptq_dynamic_first_match_wins_and_absent_keys_are_the_base():
    rules = {r"+:.*\.layers\.3\..*": {"group_size": 64}, r".*\.layers\.[0-9]\..*": {"bits": 8}, r"-:.*": {}}
    quant = read_quantization_config({**GPTQ, "sym": False, "dynamic": rules}, WHERE)
    assert quant.spec_for(RUNTIME.format(3, "mlp.up_proj")) == QuantSpec(4, 64, False)  # not the later 8-bit rule
    assert quant.spec_for(RUNTIME.format(4, "mlp.up_proj")) == QuantSpec(8, 128, False)  # no prefix: an override
    assert quant.spec_for(RUNTIME.format(12, "mlp.up_proj")) is None
    assert quant.spec_for("lm_head") is None  # "-:.*" matches every name


def test_gptq_unlisted_and_not_converted_linears_are_unquantized():
    """modules_in_block_to_quantize leaves out a skipped linear (vLLM: a substring of its name), and
    modules_to_not_convert is read as transformers reads it; either leaves the linear unquantized."""
    in_block = [["layers.0.self_attn.q_proj"], ["layers.0.mlp.up_proj", "layers.0.mlp.gate_proj"]]
    quant = read_quantization_config({**GPTQ, "modules_in_block_to_quantize": in_block,
                                      "modules_to_not_convert": ["model.visual", "lm_head"]}, WHERE)
    assert quant.spec_for(RUNTIME.format(0, "self_attn.q_proj")) == W4
    assert quant.spec_for(RUNTIME.format(0, "self_attn.k_proj")) is None
    assert quant.spec_for(RUNTIME.format(10, "self_attn.q_proj")) is None  # "layers.0." is no substring of it
    assert quant.spec_for("model.visual.blocks.0.attn.qkv") is None and quant.spec_for("lm_head") is None
    assert not quant.mixed  # no dynamic: the summary stays the plain one
    assert quant.summary() == {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}


def test_awq_modules_to_not_convert_is_matched_as_transformers_does():
    """Each entry anchored at the start of the runtime name up to a module boundary, or a suffix of it: the answers
    of transformers' own ``should_convert_module`` for every pair below (the checkpoint's key form
    model.layers.5... is a suffix of Qwen2-VL's runtime model.language_model.layers.5...)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    entries = ["model.language_model.layers.0.mlp.down_proj", "layers.3.mlp.down_proj", "model.layers.5.mlp.down_proj",
               "model.visual", r"re:.*\.layers\.9\..*", "visual"]
    names = [RUNTIME.format(i, "mlp.down_proj") for i in (0, 3, 5, 9, 13, 30)] + [
        "model.visual.blocks.0.mlp.fc1", "model.visualx.fc", "lm_head", RUNTIME.format(3, "mlp.up_proj")]
    skipped = set()
    for entry in entries:
        quant = read_quantization_config({"quant_method": "awq", "modules_to_not_convert": [entry]}, WHERE)
        for name in names:
            assert (quant.spec_for(name) is None) is (not should_convert_module(name, [entry])), (entry, name)
            skipped |= {(entry, name)} if quant.spec_for(name) is None else set()
    assert ("model.layers.5.mlp.down_proj", RUNTIME.format(5, "mlp.down_proj")) in skipped
    assert ("layers.3.mlp.down_proj", RUNTIME.format(3, "mlp.down_proj")) in skipped
    assert not any(n == RUNTIME.format(13, "mlp.down_proj") or n == RUNTIME.format(30, "mlp.down_proj")
                   for _, n in skipped)  # no entry reaches layers 13 or 30 (layers.3. is no prefix of layers.30.)
    assert ("model.visual", "model.visual.blocks.0.mlp.fc1") in skipped
    assert len(skipped) == 4  # a "re:" entry is no regex to transformers, a bare "visual" no prefix of model.visual


def groups(*extra, ignore=()):
    """compressed-tensors with the default group (W4 g128 symmetric, targets Linear) and ``extra`` groups given
    as (targets, weights)."""
    qc = ct(group={"targets": ["Linear"]}, ignore=["lm_head", "re:.*visual.*", *ignore])
    for i, (targets, weights) in enumerate(extra, 1):
        qc["config_groups"][f"group_{i}"] = {"targets": targets, "weights": weights, "format": "pack-quantized"}
    return qc


QKV35 = r"re:.*\.layers\.(?:3|5)\.self_attn\.(?:q_proj|k_proj|v_proj)$"
W8_ARGS = {"num_bits": 8, "group_size": 128, "symmetric": True, "strategy": "group", "type": "int"}


@pytest.mark.parametrize("first", [False, True], ids=["after-Linear", "before-Linear"])
def test_compressed_tensors_name_targets_win_over_linear_and_ignore_over_both(first):
    qc = groups((["re:.*\\.layers\\.3\\.mlp\\.up_proj$", QKV35], W8_ARGS),
                ([RUNTIME.format(7, "mlp.gate_proj")], {"num_bits": 2, "group_size": 64, "symmetric": False}),
                ignore=[r"re:.*\.layers\.(?:0|27)\.mlp\.(?:down_proj)$"])
    if first:  # the class target's group last: precedence does not depend on the order of the groups
        qc["config_groups"] = dict(reversed(list(qc["config_groups"].items())))
    quant = read_quantization_config(qc, WHERE)
    assert quant.spec == W4 and quant.mixed and len(quant.overrides) == 3
    assert quant.spec_for(RUNTIME.format(3, "self_attn.q_proj")) == W8
    assert quant.spec_for(RUNTIME.format(5, "self_attn.v_proj")) == W8 and quant.spec_for(RUNTIME.format(3, "mlp.up_proj")) == W8
    assert quant.spec_for(RUNTIME.format(7, "mlp.gate_proj")) == QuantSpec(2, 64, False)  # an exact name
    assert quant.spec_for(RUNTIME.format(17, "mlp.gate_proj")) == W4
    assert quant.spec_for(RUNTIME.format(4, "self_attn.q_proj")) == W4
    assert quant.spec_for(RUNTIME.format(27, "mlp.down_proj")) is None
    assert quant.spec_for("model.visual.blocks.0.attn.qkv") is None and quant.spec_for("lm_head") is None
    assert sorted(quant.summary()["mixed"].split(", ")) == ["1 rule(s) W2 g64 asym", "2 rule(s) W8 g128 sym"]


def test_targets_of_different_settings_on_one_linear_are_refused_naming_both():
    """vLLM takes the first in config order, compressed-tensors exact names first and regexes alphabetically: the
    reader does not guess."""
    quant = read_quantization_config(groups((["re:.*\\.layers\\.3\\..*"], W8_ARGS),
                                            (["re:.*_proj$"], {"num_bits": 2, "group_size": 64})), WHERE)
    with pytest.raises(ValueError, match=r"^out/q/config\.json: quantization_config\.config_groups: "
                                         r"model\.language_model\.layers\.3\.mlp\.up_proj is matched by targets"):
        quant.spec_for(RUNTIME.format(3, "mlp.up_proj"))
    assert quant.spec_for(RUNTIME.format(4, "mlp.up_proj")) == QuantSpec(2, 64, True)


@pytest.mark.parametrize("qc,message", [
    ({**GPTQ, "dynamic": [SKIP]}, "quantization_config.dynamic must be a JSON object"),
    ({**GPTQ, "dynamic": {EIGHT: 8}}, f"quantization_config.dynamic[{EIGHT!r}] must be a JSON object of settings"),
    ({**GPTQ, "dynamic": {EIGHT: {"bits": "8"}}}, f"dynamic[{EIGHT!r}].bits must be a whole number, got '8'"),
    ({**GPTQ, "dynamic": {EIGHT: {"bits": 5}}}, f"dynamic[{EIGHT!r}]: bits must be 2, 3, 4 or 8, got 5"),
    ({**GPTQ, "dynamic": {EIGHT: {"desc_act": "no"}}}, f"dynamic[{EIGHT!r}].desc_act must be true or false"),
    ({**GPTQ, "dynamic": {"-:layers.(": {}}}, "quantization_config.dynamic['-:layers.(']: not a regular expression"),
    (groups((["re:x"], {"num_bits": 8, "type": "float"})), "config_groups.group_1.weights.type 'float' is not supported"),
    (groups((["re:x"], {"num_bits": 8, "strategy": "tensor"})), "group_1.weights.strategy 'tensor' is not supported"),
    ({**groups((["re:x"], W8_ARGS)), "config_groups": {**groups((["re:x"], W8_ARGS))["config_groups"],
                                                        "group_1": {"targets": ["re:x"], "weights": W8_ARGS,
                                                                    "format": "float-quantized"}}},
     "config_groups holds 2 groups with float-quantized among them"),
    (groups((["Linear"], W8_ARGS)), "config_groups.group_1.targets: 'Linear' is targeted by group_0 already"),
    (groups((["re:(x"], W8_ARGS)), "config_groups.group_1.targets: '(x' is not a regular expression"),
    (groups((["re:x"], W8_ARGS), ignore=["re:[a"]), "quantization_config.ignore: '[a' is not a regular expression"),
    (groups(([7], W8_ARGS)), "config_groups.group_1.targets must be a list of module names"),
    ({**ct(group={"targets": ["re:x"]})}, "config_groups: no group targets 'Linear'"),
])
def test_a_malformed_or_unreadable_per_module_rule_is_a_value_error_naming_the_field(qc, message):
    with pytest.raises(ValueError, match="^" + WHERE.replace(".", r"\.") + ": ") as error:
        read_quantization_config(qc, WHERE)
    assert message in str(error.value)
