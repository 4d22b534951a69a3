"""The job's settings: per-method defaults and every check live in qvlquant.config, before any work starts."""

import math
import re

import pytest

from qvlquant.config import JobConfig
from qvlquant.quant.formats import PackFormat
from qvlquant.quant.spec import GPTQ_DAMP_PERCENT, QuantConfig, QuantSpec


def test_per_method_defaults():
    assert QuantConfig("awq").spec == QuantSpec(4, 128, sym=False)  # the AWQ GEMM format stores zero points
    assert QuantConfig("gptq").spec == QuantSpec(4, 128, sym=True)
    assert QuantConfig("gptq").damp_percent == GPTQ_DAMP_PERCENT and QuantConfig("rtn").damp_percent is None
    job = JobConfig.from_flat(output="out/q", method="awq")  # what qvlquant.quantize(output=..., method="awq") builds
    assert job.quant.spec.sym is False and job.pack_format.value == "awq_gemm"
    assert JobConfig.from_flat(output="o", method="awq", bits=4).quant.spec.sym is False  # bits alone keeps asym
    gptq = QuantConfig("gptq")  # the measured defaults: damping 0.01, act-order with static groups
    assert (gptq.damp_percent, gptq.desc_act, gptq.static_groups) == (0.01, True, True)
    assert QuantConfig("gptq", desc_act=True).static_groups is False  # an explicit --desc-act keeps dynamic groups
    assert QuantConfig("gptq", desc_act=False).static_groups is False
    assert QuantConfig("awq").awq_rounding == "rtn" and QuantConfig("awq", QuantSpec(3, 128, False)).awq_rounding == "gptq"
    assert QuantConfig("rtn").desc_act is False and QuantConfig("awq").static_groups is False
    assert QuantConfig("gptq").mse == 0.0 and QuantConfig("gptq", QuantSpec(3, 128, True)).mse == 2.4  # below 4 bits
    assert QuantConfig("awq", QuantSpec(3, 128, False)).mse == 0.0
    awq_gptq = JobConfig.from_flat(output="o", method="awq", awq_rounding="gptq", mse=2.4, vision_weight=0.5).quant
    assert awq_gptq.damp_percent == GPTQ_DAMP_PERCENT and awq_gptq.mse == 2.4  # GPTQ's rounding settings apply


@pytest.mark.parametrize("export_format", ["auto", "compressed-tensors"])
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_job_pack_format_is_the_one_rule(method, export_format):
    job = JobConfig.from_flat(output="o", method=method, export_format=export_format)
    assert job.pack_format is PackFormat.for_job(method, export_format)
    assert (job.pack_format is PackFormat.COMPRESSED) == (export_format == "compressed-tensors")


@pytest.mark.parametrize("damp", [0, -1, math.nan, math.inf, "0.1", True])
def test_damping_is_checked_at_the_boundary(damp):
    with pytest.raises(ValueError, match="damp_percent must be a finite number above 0"):
        QuantConfig("gptq", damp_percent=damp)


@pytest.mark.parametrize("settings,message", [
    (dict(method="rtn", damp_percent=0.01), "^drop --damp-percent: --method rtn rounds each weight to nearest"),
    (dict(method="awq", desc_act=True), "^drop --desc-act: --method awq rounds .*; --desc-act is GPTQ's act-order"),
    (dict(method="awq", mse=2.4), "^drop --mse: --method awq .*--method awq --awq-rounding gptq$"),
    (dict(method="awq", awq_rounding="gptq", static_groups=True), "^drop --static-groups: --method awq "
                                                                  "--awq-rounding gptq: GPTQ rounds the AWQ-scaled"),
    (dict(method="rtn", vision_weight=0.5), "^drop --vision-weight: --method rtn"),
    (dict(method="gptq", awq_rounding="gptq"), "^drop --awq-rounding: --method gptq .*is AWQ's: --method awq$"),
    (dict(method="awq", awq_rounding="nearest"), "awq_rounding must be one of rtn, gptq"),
    (dict(method="gptq", mse=-1.0), "mse must be a finite number >= 0"),
    (dict(method="gptq", vision_weight=0.0), "vision_weight must be a finite number above 0"),
    (dict(method="gptq", damp_percent=2.0), "above its limit damp_max"),
    (dict(method="awq", bits=3), "AWQ exports the AWQ GEMM format: 4-bit"),
    (dict(method="gptq", desc_act=True, export_format="compressed-tensors"), "contiguous groups only"),
    (dict(method="bogus"), "unknown method 'bogus'"),
    (dict(method="gptq", rare_experts="drop"), "rare_experts must be one of rtn, all_tokens"),
    (dict(method="rtn", rare_experts="all_tokens"), "^drop --rare-experts: --method rtn .*: --method gptq or awq$"),
    (dict(device="gpu"), "device must be auto, cpu, cuda or cuda:N"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(offload="disk"), "offload must be one of"),
    (dict(max_layers=0), "max_layers must be a whole number of at least 1"),
    (dict(num_samples=-3), "num_samples must be a whole number of at least 1"),
    (dict(pad_intermediate_to=0), "pad_intermediate_to must be"),
    (dict(group_size=0), "group_size must be positive or -1"),
    (dict(threads=0), "threads must be"),
    (dict(colour="red"), r"unknown setting\(s\) \['colour'\]"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        JobConfig.from_flat(output="out/q", **settings)


def test_report_and_fingerprint_settings():
    job = JobConfig.from_flat(output="out/q", method="gptq", bits=3, resume=False, max_layers=2, threads=1,
                              overwrite=True)
    d = job.to_dict()
    assert d["version"] == 1 and d["quant"]["spec"] == {"bits": 3, "group_size": 128, "sym": True}
    fp = job.result_settings()
    assert "output" not in fp and "resume" not in fp and "max_layers" not in fp
    assert "overwrite" not in fp["export"] and "threads" not in fp["device"]
    other = JobConfig.from_flat(output="elsewhere", method="gptq", bits=3)
    assert other.result_settings() == fp  # where it goes does not change what it computes
    assert JobConfig.from_flat(output="o", method="gptq", bits=4).result_settings() != fp


def test_gptq_and_awq_on_a_real_model_ask_for_calibration_data():
    """No --calib: the demo's chats for the embedded models and RTN; GPTQ / AWQ on another model is an error naming
    what to pass, never a silent calibration on the toy shapes."""
    assert JobConfig(output="o").calib.source == "demo"
    assert JobConfig.from_flat(output="o", model="testbed", method="gptq").calib.source == "demo"
    assert JobConfig.from_flat(output="o", model="Qwen/Qwen2-VL-7B-Instruct", method="rtn").calib.source == "demo"
    for method in ("gptq", "awq"):
        with pytest.raises(ValueError, match=r"needs calibration data.*--calib FILE.jsonl.*hf:DATASET"):
            JobConfig.from_flat(output="o", model="Qwen/Qwen2-VL-7B-Instruct", method=method)
    chosen = JobConfig.from_flat(output="o", model="/models/q7", method="awq", calib="easyvqa")
    assert chosen.calib.source == "easyvqa"


@pytest.mark.parametrize("settings,message", [
    (dict(damp_percent=1e-320), r"damp_percent must be at least 1e-06 \(a smaller damping only costs"),
    (dict(damp_percent=9e-7), r"damp_percent must be at least 1e-06"),
    (dict(damp_max=1e300), r"damp_max must be at most 10"),
    (dict(mse=11.0), r"mse must be 0 \(off\) or between 1 and 10"),
    (dict(mse=0.5), r"mse must be 0 \(off\) or between 1 and 10"),
    (dict(vision_weight=1e9), r"vision_weight must be between 0\.0001 and 10000"),
    (dict(vision_weight=1e-9), r"vision_weight must be between 0\.0001 and 10000"),
    (dict(block_size=10**9), r"block_size must be at most 65536"),
    (dict(method="awq", awq_grid=10**9), r"awq_grid must be at most 1000"),
    (dict(method="awq", awq_max_tokens=10**12), r"awq_max_tokens must be at most 262144"),
    (dict(pad_intermediate_to=10**9), r"pad_intermediate_to must be at most 65536"),
])
def test_numeric_settings_have_floors_and_ceilings(settings, message):
    """A damping of 1e-320 took GPTQ 510 s (a thousand doublings before the Cholesky holds), against 20 s; the
    other numbers bound time or memory in the same way. Each is refused up front, naming its limit."""
    settings.setdefault("method", "gptq")
    with pytest.raises(ValueError, match=message):
        JobConfig.from_flat(output="out/q", **settings)


@pytest.mark.parametrize("settings", [dict(method="gptq", damp_percent=1e-6), dict(method="gptq", damp_max=10.0),
                                      dict(method="gptq", mse=1.0), dict(method="gptq", mse=10.0),
                                      dict(method="gptq", vision_weight=1e4), dict(method="gptq", block_size=65536),
                                      dict(method="awq", awq_grid=1000), dict(method="awq", awq_max_tokens=2**18),
                                      dict(pad_intermediate_to=65536)])
def test_numeric_settings_at_their_limits_are_accepted(settings):
    job = JobConfig.from_flat(output="out/q", **settings)
    for key, value in settings.items():  # kept as given, not clamped
        if key != "method":
            assert getattr(job.quant, key, getattr(job, key, None)) == value, key


def test_which_schemes_take_calibration_data_and_which_refuse_it():
    """One table (quant.formats.SCHEMES) owns the names: the data-free presets refuse --calib, the calibrated ones
    (FP8, NVFP4: their activation scales) take it, and default to the demo's chats on the embedded models only."""
    from qvlquant.quant.formats import CALIBRATED_SCHEMES, DATAFREE_SCHEMES, SCHEMES, Fp8Format, Nvfp4Format

    assert set(CALIBRATED_SCHEMES) == {"FP8", "NVFP4"} and not set(CALIBRATED_SCHEMES) & set(DATAFREE_SCHEMES)
    assert list(SCHEMES) == [*DATAFREE_SCHEMES, *CALIBRATED_SCHEMES]
    fp8 = JobConfig.from_flat(output="o", scheme="FP8")
    assert fp8.calib.source == "demo" and fp8.calibrated_format is Fp8Format.TENSOR and fp8.datafree_format is None
    nvfp4 = JobConfig.from_flat(output="o", scheme="NVFP4", calib="easyvqa", num_samples=8)
    assert nvfp4.calib.source == "easyvqa" and nvfp4.calibrated_format is Nvfp4Format.W4A4
    assert JobConfig.from_flat(output="o", scheme="FP8_DYNAMIC").calib.source is None  # reads none
    for scheme in DATAFREE_SCHEMES:
        with pytest.raises(ValueError, match=rf"^--calib does not apply to --scheme {scheme} \(.*; data-free: .*\): "
                                             r"drop it; only FP8 and NVFP4 take calibration data \(the calibrated "
                                             r"schemes\)"):
            JobConfig.from_flat(output="o", scheme=scheme, calib="easyvqa")


@pytest.mark.parametrize("settings,flag", [
    ({"method": "gptq"}, r"--method"),
    ({"rules": ["mlp:skip"]}, r"--override / --ignore"),
    ({"export_format": "compressed-tensors"}, r"--format"),
    ({"max_layers": 2}, r"--max-layers"),
])
@pytest.mark.parametrize("scheme", ["FP8", "NVFP4"])
def test_a_calibrated_scheme_refuses_the_integer_methods_settings(scheme, settings, flag):
    with pytest.raises(ValueError, match=rf"^{flag} does not apply to --scheme {scheme} \(.*; weights from the "
                                         r"checkpoint, activation scales from --calib, in its own format\): drop it"):
        JobConfig.from_flat(output="o", scheme=scheme, **settings)


def test_a_calibrated_scheme_on_a_real_model_asks_for_calibration_data():
    with pytest.raises(ValueError, match=r"scheme NVFP4 \(its activation scales\) on /models/qwen2-vl needs "
                                         r"calibration data .*--calib FILE\.jsonl"):
        JobConfig.from_flat(output="o", scheme="NVFP4", model="/models/qwen2-vl")
    assert JobConfig.from_flat(output="o", scheme="FP8", model="/models/qwen2-vl", calib="x.jsonl").calib.source == "x.jsonl"
    with pytest.raises(ValueError, match=r"scheme must be one of FP8_BLOCK, .*, NVFP4A16, FP8, NVFP4, got 'FP4'"):
        JobConfig.from_flat(output="o", scheme="FP4")


@pytest.mark.parametrize("given,parsed", [(None, None), ("auto", "auto"), (" Off ", "off"), ("0.8", 0.8), (0, 0.0),
                                          (1, 1.0), (0.35, 0.35)])
def test_smoothing_strength_reads_a_number_from_0_to_1_auto_or_off(given, parsed):
    from qvlquant.config import parse_strength

    assert parse_strength(given) == parsed


@pytest.mark.parametrize("bad", ["1.5", -0.1, "nan", "strong", True, "inf"])
def test_a_bad_smoothing_strength_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match=r"smoothing_strength must be a number from 0 to 1 .*'auto' .* or 'off', "
                                         rf"got {re.escape(repr(bad))}"):
        JobConfig.from_flat(output="o", scheme="W8A8", method="gptq", smoothing_strength=bad)


def test_calibrated_w8a8_is_gptq_or_a_smoothing_strength_with_its_defaults():
    from qvlquant.config import DEFAULT_SMOOTHING

    plain = JobConfig.from_flat(output="o", scheme="W8A8")
    assert not plain.w8a8_calibrated and plain.datafree_format is not None and plain.calib.source is None
    assert "smoothing_strength" not in plain.result_settings()  # fingerprints as before the setting existed
    gptq = JobConfig.from_flat(output="o", scheme="W8A8", method="gptq")
    assert gptq.w8a8_calibrated and gptq.datafree_format is None and gptq.calib.source == "demo"
    assert gptq.smoothing_strength == DEFAULT_SMOOTHING == 0.8  # llm-compressor's SmoothQuantModifier default
    assert gptq.loop_quant.spec == QuantSpec(8, -1, True) and gptq.loop_quant.method == "gptq"
    rtn = JobConfig.from_flat(output="o", scheme="W8A8", smoothing_strength="auto")
    assert rtn.w8a8_calibrated and rtn.loop_quant.method == "rtn" and rtn.smoothing == "auto"
    off = JobConfig.from_flat(output="o", scheme="W8A8", method="gptq", smoothing_strength="off")
    assert off.w8a8_calibrated and off.smoothing is None


def test_nvfp4_smooths_by_default_and_takes_a_strength_or_off():
    """--scheme NVFP4 (W4A4) smooths its activations' outliers into the weights by default (its own default, not
    W8A8's); a number or off is taken, auto (a search scored by int8 error) is refused."""
    from qvlquant.config import DEFAULT_NVFP4_SMOOTHING

    plain = JobConfig.from_flat(output="o", scheme="NVFP4")
    assert plain.smoothing_strength == plain.smoothing == DEFAULT_NVFP4_SMOOTHING == 0.8
    assert plain.result_settings()["smoothing_strength"] == 0.8  # a setting of the result
    assert JobConfig.from_flat(output="o", scheme="NVFP4", smoothing_strength="0.5").smoothing == 0.5
    off = JobConfig.from_flat(output="o", scheme="NVFP4", smoothing_strength="off")
    assert off.smoothing_strength == "off" and off.smoothing is None
    assert off.result_settings() != plain.result_settings()
    with pytest.raises(ValueError, match=r"^smoothing_strength auto searches for the least int8 \(W8A8\) output "
                                         r"error; for --scheme NVFP4 give a number from 0 to 1 \(default 0.8\) or off$"):
        JobConfig.from_flat(output="o", scheme="NVFP4", smoothing_strength="auto")
    for scheme in ("FP8_BLOCK", "FP8_DYNAMIC", "FP8", "NVFP4A16"):  # they neither smooth nor get a strength
        assert JobConfig.from_flat(output="o", scheme=scheme).smoothing_strength is None


@pytest.mark.parametrize("settings,message", [
    ({"smoothing_strength": 0.5}, r"smoothing_strength: SmoothQuant is for --scheme W8A8 .*; leave it out"),
    ({"scheme": "NVFP4A16", "smoothing_strength": 0.5}, r"SmoothQuant is for --scheme W8A8 \(with --method gptq or "
                                                         r"rtn\) and --scheme NVFP4 \(W4A4\); not for scheme NVFP4A16"),
    ({"scheme": "FP8_DYNAMIC", "smoothing_strength": "off"}, r"SmoothQuant is for .*; not for scheme FP8_DYNAMIC"),
    ({"scheme": "NVFP4", "smoothing_strength": 0.5, "awq_max_tokens": 512}, r"^awq_max_tokens does not apply to "
                                                                            r"--scheme NVFP4"),
    ({"scheme": "FP8", "smoothing_strength": 0.5}, r"SmoothQuant is for --scheme W8A8 .*; not for scheme FP8"),
    ({"scheme": "W8A8", "method": "awq"}, r"scheme W8A8 rounds its \(smoothed\) weights with --method gptq or rtn, "
                                          "got awq"),
    ({"scheme": "W8A8", "method": "gptq", "bits": 8, "group_size": -1}, r"^--bits, --group-size do not apply to "
                                                                        r"--scheme W8A8 .*fixed int8 grid, 8 bits "
                                                                        r"per output channel.*: drop them"),
    ({"scheme": "W8A8", "method": "gptq", "export_format": "compressed-tensors"}, r"^--format does not apply"),
    ({"scheme": "W8A8", "method": "gptq", "rules": ["mlp:skip"]}, r"^--override / --ignore does not apply"),
    ({"scheme": "W8A8", "calib": "demo"}, r"^--calib does not apply.*W8A8 calibrates with --method gptq or "
                                          r"--smoothing-strength"),
    ({"scheme": "W8A8", "smoothing_strength": 0.5, "desc_act": False}, r"^--no-desc-act does not apply to --scheme "
                                                                       r"W8A8 .*then rtn.*GPTQ's options take "
                                                                       r"--method gptq"),
])
def test_calibrated_w8a8_refuses_what_does_not_apply_naming_it(settings, message):
    with pytest.raises(ValueError, match=message):
        JobConfig.from_flat(output="o", **settings)


def test_w8a8_refuses_bits_4_naming_the_flag_and_what_to_do():
    """Issue 26: --scheme W8A8 --bits 4 was accepted and the 4 ignored (4 is --bits' default, so the config could not
    tell it from no --bits); now the setting given is refused whatever its value, with or without --method gptq."""
    for settings in ({}, {"method": "gptq"}):
        with pytest.raises(ValueError) as e:
            JobConfig.from_flat(output="o", scheme="W8A8", bits=4, **settings)
        assert str(e.value).startswith("--bits does not apply to --scheme W8A8 (INT8 per-channel")
        assert "drop it; for 4-bit integer weights leave out --scheme and use --method gptq --bits 4" in str(e.value)


# a value of each setting no scheme takes, equal to its default where it has one (what the config used to miss)
# -> the flag the error names
AT_DEFAULT = [({"bits": 4}, "--bits"), ({"group_size": 128}, "--group-size"), ({"sym": True}, "--sym"),
              ({"sym": False}, "--asym"), ({"mse": 0.0}, "--mse"), ({"awq_rounding": "rtn"}, "--awq-rounding"),
              ({"awq_grid": 20}, "awq_grid"), ({"export_format": "auto"}, "--format"),
              ({"candidate_bits": "3,4,8,16"}, "--candidate-bits"), ({"sensitivity": "output"}, "--sensitivity"),
              ({"target_bits": 4.5}, "--target-bits"), ({"pad_intermediate_to": 1024}, "--pad-intermediate-to"),
              ({"rules": ["mlp:skip"]}, "--override / --ignore")]
SCHEME_JOBS = [{"scheme": "FP8_BLOCK"}, {"scheme": "FP8_DYNAMIC"}, {"scheme": "W8A8"}, {"scheme": "NVFP4A16"},
               {"scheme": "FP8"}, {"scheme": "NVFP4"}, {"scheme": "W8A8", "method": "gptq"},
               {"scheme": "W8A8", "smoothing_strength": "auto"}]


@pytest.mark.parametrize("settings,flag", AT_DEFAULT, ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("job", SCHEME_JOBS, ids=lambda job: "-".join(map(str, job.values())))
def test_every_scheme_refuses_a_setting_it_ignores_even_at_its_default(job, settings, flag):
    with pytest.raises(ValueError, match=rf"^{re.escape(flag)} does not apply to --scheme {job['scheme']} \(.*\): "
                                         "drop it"):
        JobConfig.from_flat(output="o", **job, **settings)


@pytest.mark.parametrize("settings,flag", [({"calib": "demo"}, "--calib"), ({"num_samples": 64}, "--num-samples"),
                                           ({"seed": 0}, "--seed"), ({"split": "train"}, "--split"),
                                           ({"batch_size": 1}, "--batch-size"), ({"max_length": 2048}, "--max-length"),
                                           ({"image_column": "image"}, "--image-column"),
                                           ({"allow_urls": False}, "--allow-urls")])
@pytest.mark.parametrize("scheme", ["FP8_BLOCK", "FP8_DYNAMIC", "W8A8", "NVFP4A16"])
def test_a_data_free_scheme_refuses_every_calibration_setting_and_a_calibrated_one_takes_them(scheme, settings, flag):
    with pytest.raises(ValueError, match=rf"^{flag} does not apply to --scheme {scheme} .*: drop it; only FP8 and "
                                         r"NVFP4 take calibration data"):
        JobConfig.from_flat(output="o", scheme=scheme, **settings)
    dataset = {"calib": "hf:org/data"} if flag in ("--split", "--image-column") else {}  # read from hf: only
    for calibrated in ({"scheme": "FP8"}, {"scheme": "NVFP4"}, {"scheme": "W8A8", "method": "gptq"}):
        JobConfig.from_flat(output="o", **calibrated, **settings, **dataset)


@pytest.mark.parametrize("scheme", ["FP8_BLOCK", "FP8_DYNAMIC", "NVFP4A16", "FP8", "NVFP4"])
def test_a_scheme_refuses_any_method_even_rtn(scheme):
    with pytest.raises(ValueError, match=rf"^--method does not apply to --scheme {scheme} .*: drop it; for integer "
                                         r"weights of your own bits, group size and symmetry leave out --scheme"):
        JobConfig.from_flat(output="o", scheme=scheme, method="rtn")


def test_what_each_scheme_takes_is_accepted():
    """Every job's settings (model, where it writes and computes) with any scheme; --method rtn with W8A8 (what its
    data-free export does); GPTQ's options, the calibration settings and --max-layers with calibrated W8A8."""
    every = {"model": "demo", "trust_remote_code": False, "resume": False, "overwrite": True, "device": "cpu",
             "threads": 1}
    for scheme in ("FP8_BLOCK", "FP8_DYNAMIC", "W8A8", "NVFP4A16", "FP8", "NVFP4"):
        assert JobConfig.from_flat(output="o", scheme=scheme, **every).scheme == scheme
    compute = {"device": "cuda", "dtype": "float32", "offload": "cpu"}  # where the layers run: calibrated only
    for job in ({"scheme": "FP8"}, {"scheme": "NVFP4"}, {"scheme": "W8A8", "method": "gptq"}):
        assert JobConfig.from_flat(output="o", **job, **compute).device.dtype == "float32"
    plain = JobConfig.from_flat(output="o", scheme="W8A8", method="rtn")
    assert plain.datafree_format is not None and not plain.w8a8_calibrated
    gptq = JobConfig.from_flat(output="o", scheme="W8A8", method="gptq", damp_percent=0.1, desc_act=False,
                               static_groups=False, true_sequential=False, vision_weight=2.0, min_expert_tokens=4,
                               rare_experts="all_tokens", smoothing_strength="auto", awq_max_tokens=512,
                               max_layers=2, num_samples=8)
    assert gptq.loop_quant.spec == QuantSpec(8, -1, True) and gptq.loop_quant.desc_act is False
    with pytest.raises(ValueError, match=r"^awq_max_tokens does not apply to --scheme W8A8 .*: drop it; "
                                         r"awq_max_tokens is the token budget of --smoothing-strength auto's search$"):
        JobConfig.from_flat(output="o", scheme="W8A8", method="gptq", smoothing_strength=0.5, awq_max_tokens=512)


def test_a_config_built_field_by_field_gets_the_same_check():
    """qvlquant.quantize(JobConfig(...)): no flat names were recorded, so what differs from its default is what was
    given; qvlquant.quantize(**flat) goes through from_flat and the flat names."""
    from qvlquant.config import CalibSource, ExportConfig

    with pytest.raises(ValueError, match=r"^--bits, --group-size do not apply to --scheme W8A8 .*then gptq"):
        JobConfig(output="o", scheme="W8A8", quant=QuantConfig("gptq", QuantSpec(3, 64, True)))
    with pytest.raises(ValueError, match=r"^--num-samples does not apply to --scheme FP8_BLOCK"):
        JobConfig(output="o", scheme="FP8_BLOCK", calib=CalibSource(num_samples=8))
    with pytest.raises(ValueError, match=r"^--format does not apply to --scheme NVFP4"):
        JobConfig(output="o", scheme="NVFP4", export=ExportConfig(format="compressed-tensors"))
    assert JobConfig(output="o", scheme="W8A8", quant=QuantConfig("gptq")).w8a8_calibrated


@pytest.mark.parametrize("settings", [{"scheme": "FP8_BLOCK"}, {"scheme": "W8A8", "method": "gptq"},
                                      {"scheme": "NVFP4", "num_samples": 8}, {"method": "gptq", "bits": 3}])
def test_what_was_given_is_in_neither_the_report_nor_the_fingerprint(settings):
    """The record of the settings given only checks them: a job built from flags reports and fingerprints exactly
    as the same job built field by field (so a valid job's report, and a partial run's resume, are unchanged)."""
    flat = JobConfig.from_flat(output="o", **settings)
    assert flat.given == frozenset({"output", *settings}) and "given" not in flat.to_dict()
    by_field = JobConfig(output="o", quant=flat.quant, calib=flat.calib, scheme=flat.scheme,
                         smoothing_strength=flat.smoothing_strength)
    assert by_field.given is None and by_field == flat
    assert by_field.to_dict() == flat.to_dict() and by_field.result_settings() == flat.result_settings()


# each setting only some integer methods read, at its default (or either way for a switch) -> the flag the error names
METHOD_ONLY_AT_DEFAULT = {
    "damp_percent": ({"damp_percent": GPTQ_DAMP_PERCENT}, "--damp-percent"),
    "damp_max": ({"damp_max": 1.0}, "damp_max"),
    "block_size": ({"block_size": 128}, "block_size"), "mse": ({"mse": 0.0}, "--mse"),
    "vision_weight": ({"vision_weight": 1.0}, "--vision-weight"), "no_desc_act": ({"desc_act": False}, "--no-desc-act"),
    "desc_act": ({"desc_act": True}, "--desc-act"), "static_groups": ({"static_groups": True}, "--static-groups"),
    "no_static_groups": ({"static_groups": False}, "--no-static-groups"),
    "true_sequential": ({"true_sequential": False}, "--no-true-sequential"),
    "min_expert_tokens": ({"min_expert_tokens": 1}, "--min-expert-tokens"),
    "rare_experts": ({"rare_experts": "rtn"}, "--rare-experts"), "awq_grid": ({"awq_grid": 20}, "awq_grid"),
    "awq_clip": ({"awq_clip": True}, "awq_clip"), "awq_max_tokens": ({"awq_max_tokens": 4096}, "awq_max_tokens"),
    "awq_rounding": ({"awq_rounding": "rtn"}, "--awq-rounding")}
GPTQ_ROUNDING = ["damp_percent", "damp_max", "block_size", "mse", "vision_weight"]
GPTQ_ORDER = ["no_desc_act", "desc_act", "static_groups", "no_static_groups", "true_sequential"]
EXPERTS = ["min_expert_tokens", "rare_experts"]
AWQ = ["awq_grid", "awq_clip", "awq_max_tokens", "awq_rounding"]
# each kind of integer-method job -> (its settings, what the error says it does, the settings it does not read)
METHOD_JOBS = {
    "rtn": ({"method": "rtn"}, "--method rtn rounds each weight to nearest",
            GPTQ_ROUNDING + GPTQ_ORDER + EXPERTS + AWQ),
    "gptq": ({"method": "gptq"}, "--method gptq rounds with GPTQ", AWQ),
    "awq": ({"method": "awq"}, "--method awq rounds its scaled weights with its own clipping search",
            GPTQ_ROUNDING + GPTQ_ORDER),
    "awq-gptq": ({"method": "awq", "awq_rounding": "gptq"}, "--method awq --awq-rounding gptq: GPTQ rounds",
                 GPTQ_ORDER + ["awq_clip"]),
    "awq-w3": ({"method": "awq", "bits": 3, "export_format": "compressed-tensors"},  # GPTQ rounds below 4 bits
               "--method awq --awq-rounding gptq: GPTQ rounds", GPTQ_ORDER + ["awq_clip"]),
}
METHOD_REFUSALS = [(kind, name) for kind, (_, _, refused) in METHOD_JOBS.items() for name in refused]


@pytest.mark.parametrize("kind,name", METHOD_REFUSALS, ids=[f"{k}-{n}" for k, n in METHOD_REFUSALS])
def test_every_method_refuses_a_setting_it_does_not_read_even_at_its_default(kind, name):
    """--method rtn --no-desc-act (or --mse 0, or any GPTQ option), --method gptq --awq-rounding rtn, ...: equal to the
    default, such a flag used to pass unnoticed; now the flag given is refused, naming it, the method and where the
    flag does apply. The Python API (from_flat) and a config built field by field, where a value tells, alike."""
    job, does, _ = METHOD_JOBS[kind]
    settings, flag = METHOD_ONLY_AT_DEFAULT[name]
    with pytest.raises(ValueError, match=rf"^drop {re.escape(flag)}: {re.escape(does)}.*; {re.escape(flag)} is "):
        JobConfig.from_flat(output="o", **job, **settings)


@pytest.mark.parametrize("kind", METHOD_JOBS)
def test_what_each_method_reads_is_accepted_and_changes_nothing_at_its_default(kind):
    """Every setting the method reads, given at its default, builds the very job given none: the same report
    (to_dict) and fingerprint (result_settings) as before the check."""
    job, _, refused = METHOD_JOBS[kind]
    taken = [n for n in METHOD_ONLY_AT_DEFAULT if n not in refused and n not in ("no_desc_act", "no_static_groups")]
    settings = {k: v for n in taken for k, v in METHOD_ONLY_AT_DEFAULT[n][0].items()}
    if kind == "gptq":
        settings["true_sequential"] = True  # --no-true-sequential's setting off is not the default
    if kind.startswith("awq-"):
        settings["awq_rounding"] = "gptq"  # the rounding these jobs take (given, or by the width)
    given = JobConfig.from_flat(output="o", **{**job, **settings})
    plain = JobConfig.from_flat(output="o", **job)
    assert given == plain and given.to_dict() == plain.to_dict()
    assert given.result_settings() == plain.result_settings()


@pytest.mark.parametrize("settings,flag", [({"candidate_bits": "3,4,8,16"}, "--candidate-bits"),
                                           ({"candidate_bits": "4,8"}, "--candidate-bits"),
                                           ({"sensitivity": "output"}, "--sensitivity"),
                                           ({"sensitivity": "layer"}, "--sensitivity")])
@pytest.mark.parametrize("job", [{"method": "rtn"}, {"method": "gptq"},
                                 {"method": "awq", "export_format": "compressed-tensors"}], ids=lambda j: j["method"])
def test_the_search_settings_without_target_bits_are_refused(job, settings, flag):
    with pytest.raises(ValueError, match=rf"^drop {flag}: without --target-bits nothing is searched; {flag} is the "
                                         r"search's: add --target-bits B"):
        JobConfig.from_flat(output="o", **job, **settings)
    searched = JobConfig.from_flat(output="o", **job, **settings, target_bits=4.5)
    assert searched.search.active


def test_the_method_check_of_a_config_built_field_by_field():
    """No flat names recorded: a value other than the default is what was given (AWQ's settings with GPTQ, which
    QuantConfig itself lets through; the search's candidates without a target)."""
    from qvlquant.config import SearchConfig

    with pytest.raises(ValueError, match=r"^drop awq_grid: --method gptq rounds with GPTQ"):
        JobConfig(output="o", quant=QuantConfig("gptq", awq_grid=10))
    with pytest.raises(ValueError, match=r"^drop awq_clip: --method awq --awq-rounding gptq"):
        JobConfig(output="o", quant=QuantConfig("awq", awq_rounding="gptq", awq_clip=False))
    with pytest.raises(ValueError, match=r"^drop --candidate-bits: without --target-bits"):
        JobConfig(output="o", search=SearchConfig(candidate_bits=(4, 8)))
    assert JobConfig(output="o", quant=QuantConfig("awq", awq_clip=False)).quant.awq_clip is False


@pytest.mark.parametrize("settings,flag", [({"device": "cuda"}, "--device"), ({"device": "auto"}, "--device"),
                                           ({"dtype": "bfloat16"}, "--dtype"), ({"dtype": "float32"}, "--dtype"),
                                           ({"offload": "auto"}, "--offload"), ({"offload": "cpu"}, "--offload")])
@pytest.mark.parametrize("scheme", ["FP8_BLOCK", "FP8_DYNAMIC", "W8A8", "NVFP4A16"])
def test_a_data_free_scheme_refuses_where_the_layers_would_run(scheme, settings, flag):
    """A data-free scheme runs no layer: each weight is quantized on the CPU as the export streams it from the
    checkpoint, whatever --device, --dtype or --offload said (api._quantize_datafree). --device cpu says what it
    does."""
    with pytest.raises(ValueError, match=rf"^{flag} does not apply to --scheme {scheme} .*data-free.*: drop it; a "
                                         r"data-free scheme runs no layer: it quantizes each weight on the CPU"):
        JobConfig.from_flat(output="o", scheme=scheme, **settings)
    assert JobConfig.from_flat(output="o", scheme=scheme, device="cpu").device.device == "cpu"


@pytest.mark.parametrize("given,named", [({"split": "validation"}, "--split"),
                                         ({"text_column": "body", "split": "x"}, "--split, --text-column")])
@pytest.mark.parametrize("source", [None, "demo", "samples.jsonl"])
def test_dataset_split_and_columns_are_refused_for_a_source_that_is_no_hf_dataset(given, named, source):
    """--split / --*-column are read from hf: datasets only; with the demo chats (the default), a file or a folder
    they did nothing. Refused by name, with what to do."""
    flat = {"method": "gptq", "output": "out", **({} if source is None else {"calib": source}), **given}
    with pytest.raises(ValueError) as e:
        JobConfig.from_flat(**flat)
    shown = "demo" if source is None else source
    assert str(e.value) == (f"{named} appl{'y' if ',' in named else 'ies'} to hf: datasets only (--calib "
                            f"hf:PATH_OR_ID); --calib '{shown}' is not one: drop {'them' if ',' in named else 'it'}")


def test_dataset_split_and_columns_are_taken_with_an_hf_dataset():
    job = JobConfig.from_flat(**{"method": "gptq", "output": "out", "calib": "hf:org/data", "split": "validation",
                               "question_column": "prompt"})
    assert job.calib.split == "validation" and dict(job.calib.columns)["question"] == "prompt"
