"""benchmarks/bench_schemes.py's bookkeeping, without quantizing: which rows run in which order, what each setting
is compared within, and that the W8A8 benchmark it grew from keeps its variants and its JSON's name."""

import importlib.util
import pathlib
import sys

import pytest

from qvlquant.config import JobConfig

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))  # bench_schemes imports bench_methods beside it
spec = importlib.util.spec_from_file_location("bench_schemes", BENCH / "bench_schemes.py")
bench_schemes = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench_schemes
spec.loader.exec_module(bench_schemes)


def test_w8a8_alone_is_the_original_benchmark():
    chosen, peers = bench_schemes.choose("W8A8", None, llmc=True)
    assert chosen == ["datafree-rtn", "smoothquant-off+gptq", "smoothquant-0.8+gptq", "smoothquant-auto+gptq"]
    assert peers == ["llmc smoothquant-0.8+gptq", "llmc gptq"]
    assert bench_schemes.default_json("testbed", {"W8A8"}).name == "w8a8_testbed.json"
    assert bench_schemes.default_json("testbed", {"W8A8", "FP8"}).name == "schemes_testbed.json"


def test_rows_run_setting_by_setting_data_free_first_then_each_seed():
    chosen, peers = bench_schemes.choose("FP8,NVFP4A16", None, llmc=True)
    assert bench_schemes.jobs(chosen, peers, [0, 1]) == [
        ("fp8-static", "qvlquant", 0), ("llmc fp8-static", "llmc", 0),
        ("fp8-static", "qvlquant", 1), ("llmc fp8-static", "llmc", 1),
        ("nvfp4a16", "qvlquant", None), ("llmc nvfp4a16", "llmc", None),
    ]
    chosen, peers = bench_schemes.choose(None, "nvfp4,gptq-w4a16", llmc=True)  # the peers of the variants' settings
    assert peers == ["llmc nvfp4"]
    assert bench_schemes.choose("FP8", None, llmc=False)[1] == []


@pytest.mark.parametrize("schemes, variants, error", [("FP4", None, "--schemes FP4"), (None, "nvfp4,fp9", "fp9")])
def test_unknown_names_are_refused(schemes, variants, error):
    with pytest.raises(SystemExit, match=error):
        bench_schemes.choose(schemes, variants, llmc=False)


@pytest.mark.parametrize("variant", list(bench_schemes.VARIANTS))
def test_each_variant_is_a_valid_job_of_its_setting(variant, tmp_path):
    setting, settings, calibrated = bench_schemes.VARIANTS[variant]
    calib = {"num_samples": 8, "seed": 1} if calibrated else {}
    job = JobConfig.from_flat(output=str(tmp_path), model="testbed", threads=1, **settings, **calib)
    assert (job.datafree_format is None) == calibrated
    assert bench_schemes.compared_within(variant) == setting


def test_each_setting_is_compared_within_itself_with_llm_compressors_rows():
    assert {bench_schemes.compared_within(v) for v in bench_schemes.LLMC_VARIANTS} <= set(bench_schemes.SETTINGS)
    assert bench_schemes.compared_within("llmc nvfp4") == bench_schemes.compared_within("nvfp4") == "NVFP4"
    assert bench_schemes.compared_within("bf16") == "bf16"
