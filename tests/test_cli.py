"""The command line end to end on the embedded demo model."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from qvlquant.cli import main
from qvlquant.config import JobConfig
from qvlquant.quant.spec import GPTQ_DAMP_PERCENT, QuantConfig, QuantSpec


@pytest.fixture(scope="module")
def w8_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo-w8"
    assert main(["quantize", "--method", "rtn", "--bits", "8", "--num-samples", "16", "--output", str(out)]) == 0
    return out


@pytest.mark.slow
def test_quantize_writes_a_checkpoint(w8_dir):
    names = {p.name for p in w8_dir.iterdir()}
    assert {"config.json", "model.safetensors", "quantize_report.json", "qvlquant_manifest.json", "tokenizer.json"} <= names
    report = json.loads((w8_dir / "quantize_report.json").read_text())
    assert report["base_model"] == "demo" and report["bits"] == 8 and len(report["layers"]) == 28
    assert report["data_free"] is True and report["calibration"] is None  # RTN rounds straight from the checkpoint


@pytest.mark.slow
def test_eval_prints_base_and_quantized_side_by_side(w8_dir, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(w8_dir), "--limit", "300", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "BF16 (full precision)" in out and "GPTQ-format W8g128" in out
    data = json.loads(report.read_text())
    assert data["task"] == "easyvqa" and data["n"] == 300 and data["baseline"]["n"] == 300
    assert data["baseline"]["accuracy"] > 55.0  # the demo has learned: majority answer scores ~37%
    assert abs(data["delta_accuracy"]) <= 0.5  # W8 RTN keeps the accuracy
    assert abs(data["perplexity"] / data["baseline"]["perplexity"] - 1) < 0.01
    lines = report.with_suffix(".predictions.jsonl").read_text().splitlines()
    assert len(lines) == 300 and {"question", "answer", "prediction", "correct"} <= set(json.loads(lines[0]))
    assert main(["check", str(report)]) == 0  # the CI gate passes W8


@pytest.mark.slow
def test_w2_per_channel_rtn_visibly_hurts_perplexity(tmp_path):
    """The test bed must be able to tell a bad quantizer: 2-bit per-channel RTN degrades held-out perplexity."""
    out = tmp_path / "w2"
    assert main(["quantize", "--bits", "2", "--group-size", "-1", "--num-samples", "4", "--output", str(out)]) == 0
    report = tmp_path / "e.json"
    assert main(["eval", "--model", str(out), "--limit", "64", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["perplexity"] > 1.1 * data["baseline"]["perplexity"]  # measured here: 34.16 -> 39.46
    assert main(["check", str(report)]) == 1  # and the CI gate catches it


@pytest.mark.parametrize(
    "argv,message",
    [
        (["quantize", "--model", "/nonexistent/model", "--output", "{out}"], "no such folder"),
        (["quantize", "--group-size", "96", "--num-samples", "2", "--output", "{out}"], "group_size 96 does not divide"),
        (["quantize", "--calib", "missing.json", "--output", "{out}"], "not 'demo', 'easyvqa', hf:..."),
        (["quantize", "--override", "x:bits=9", "--output", "{out}"], "rule 'x:bits=9': bits must be 2, 3, 4 or 8"),
        (["quantize", "--override", "x:size=9", "--output", "{out}"], "unknown setting 'size'"),
        (["quantize", "--ignore", "visual", "--output", "{out}"], "rule 'visual:skip' matches no quantizable linear"),
        (["quantize", "--override", "q_proj:bits=8", "--output", "{out}"], "vLLM runs these linears as one fused"),
        (["quantize", "--method", "awq", "--override", "mlp:bits=8", "--output", "{out}"], "a rule may only skip"),
        (["eval", "--model", "/nonexistent/model"], "no such folder"),
        (["eval", "--limit", "0", "--base", "none"], "--limit must be at least 1"),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_written(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([a.format(out=out) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("method,quant_method", [("gptq", "gptq"), ("awq", "awq")])
def test_gptq_and_awq_from_the_command_line(method, quant_method, tmp_path):
    out = tmp_path / method
    assert main(["quantize", "--method", method, "--bits", "4", "--num-samples", "8", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == quant_method and config["bits"] == 4
    layers = json.loads((out / "quantize_report.json").read_text())["layers"]
    assert len(layers) == 28
    if method == "gptq":  # the damping each layer used, and the tokens it saw, are recorded
        assert all(v["damp_percent"] == GPTQ_DAMP_PERCENT and v["tokens"] > 100 for v in layers.values())
        assert config["desc_act"] is False and config["meta"]["act_order"] is True  # static act-order, the default
    else:
        assert layers["model.language_model.layers.0.self_attn.q_proj"]["scaled_by"] == "input_layernorm"
    report = tmp_path / "e.json"
    assert main(["eval", "--model", str(out), "--limit", "200", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert abs(data["delta_accuracy"]) <= 2.0 and data["perplexity"] < 1.02 * data["baseline"]["perplexity"]
    assert main(["check", str(report), "--max-drop", "easyvqa=2.0"]) == 0  # qvlquant's own gate: W4 vs BF16


def test_awq_refuses_what_its_format_cannot_hold(tmp_path, capsys):
    assert main(["quantize", "--method", "awq", "--bits", "8", "--output", str(tmp_path / "o")]) == 2
    assert "4-bit with zero point" in capsys.readouterr().err
    assert main(["quantize", "--method", "rtn", "--desc-act", "--output", str(tmp_path / "o")]) == 2
    assert "drop --desc-act: --method rtn rounds each weight to nearest" in capsys.readouterr().err


# each flag a method does not read, at its default (or a switch), and the flag the error names
@pytest.mark.parametrize("method,extra,named", [
    ("rtn", ["--desc-act"], "--desc-act"), ("rtn", ["--no-desc-act"], "--no-desc-act"),
    ("rtn", ["--static-groups"], "--static-groups"), ("rtn", ["--no-static-groups"], "--no-static-groups"),
    ("rtn", ["--no-true-sequential"], "--no-true-sequential"), ("rtn", ["--mse", "0"], "--mse"),
    ("rtn", ["--damp-percent", "0.01"], "--damp-percent"), ("rtn", ["--vision-weight", "1"], "--vision-weight"),
    ("rtn", ["--min-expert-tokens", "1"], "--min-expert-tokens"), ("rtn", ["--rare-experts", "rtn"], "--rare-experts"),
    ("rtn", ["--awq-rounding", "rtn"], "--awq-rounding"), ("gptq", ["--awq-rounding", "rtn"], "--awq-rounding"),
    ("awq", ["--no-desc-act"], "--no-desc-act"), ("awq", ["--mse", "0"], "--mse"),
    ("awq", ["--damp-percent", "0.01"], "--damp-percent"), ("awq", ["--no-true-sequential"], "--no-true-sequential"),
    ("awq", ["--awq-rounding", "gptq", "--static-groups"], "--static-groups"),
    ("rtn", ["--candidate-bits", "3,4,8,16"], "--candidate-bits"),
    ("gptq", ["--sensitivity", "output"], "--sensitivity"),
])
def test_a_flag_the_method_does_not_read_is_refused_even_at_its_default(method, extra, named, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", "--method", method, *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qvlquant quantize: error: drop {named}: ") and f"; {named} is " in err
    assert (f"--method {method}" in err or "without --target-bits" in err) and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_flag_a_recipes_method_does_not_read_is_refused(tmp_path, capsys):
    """The GPTQ recipe's act-order, static groups and damping with --method rtn: the recipe's settings are given."""
    out = tmp_path / "out"
    recipe = pathlib.Path(__file__).resolve().parent.parent / "recipes" / "demo-gptq-int4.yaml"
    assert main(["quantize", "--recipe", str(recipe), "--method", "rtn", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qvlquant quantize: error: drop --damp-percent, --no-desc-act, --no-static-groups, "
                          "--no-true-sequential: --method rtn")
    assert len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_tensor_parallel_padding_from_the_command_line(tmp_path):
    import qvlquant

    out = tmp_path / "padded"
    argv = ["quantize", "--method", "gptq", "--pad-intermediate-to", "384", "--num-samples", "4", "--output", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["text_config"]["intermediate_size"] == 768
    model, _ = qvlquant.load(out)
    assert model.model.language_model.layers[0].mlp.down_proj.in_features == 768


def test_eval_command_is_a_shell_over_the_library(monkeypatch, tmp_path, capsys):
    """qvlquant eval prints the library's table (baseline first) and the published figures of the base, and writes
    the library's summary and predictions; evaluate itself is stubbed here (the slow tests run it for real)."""
    from qvlquant import evaluation as run

    def fake(model_path, config):
        quant = None if model_path == "Qwen/Qwen2-VL-2B-Instruct" else {"quant_method": "awq", "bits": 4, "group_size": 128}
        summary = {"task": config.task, "model": str(model_path), "accuracy": 70.0 if quant else 72.5, "n": config.limit,
                   "quantization": quant}
        return run.EvalResult(summary, [{"index": "1", "prediction": "A", "score": 1.0}])

    monkeypatch.setattr(run, "evaluate", fake)
    data = tmp_path / "mmbench.tsv"  # never read: evaluate is stubbed
    report = tmp_path / "e.json"
    argv = ["eval", "--model", "out/awq", "--base", "Qwen/Qwen2-VL-2B-Instruct", "--task", "mmbench", "--data", str(data),
            "--limit", "5", "--report", str(report)]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[2:] == [
        "Qwen/Qwen2-VL-2B-Instruct                BF16 (full precision)             72.50      5            -",
        "out/awq                                  AWQ W4g128                        70.00      5            -",
        "published (Qwen2-VL-2B-Instruct, MMBench_DEV_EN, VLMEvalKit): BF16 72.07, GPTQ-Int8 71.99, GPTQ-Int4 70.87, AWQ 71.64",
    ]
    data = json.loads(report.read_text())
    assert list(data) == ["task", "model", "accuracy", "n", "quantization", "baseline", "delta_accuracy"]
    assert data["delta_accuracy"] == -2.5 and data["baseline"]["model"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert report.with_suffix(".predictions.jsonl").read_text() == '{"index": "1", "prediction": "A", "score": 1.0}\n'


def test_eval_task_choices_are_the_library_tasks():
    import argparse

    from qvlquant.cli import add_eval
    from qvlquant.eval.metrics import EVAL_TASKS

    sub = argparse.ArgumentParser().add_subparsers()
    add_eval(sub)
    task = next(a for a in sub.choices["eval"]._actions if a.dest == "task")  # argparse's private list, only here
    assert tuple(task.choices) == EVAL_TASKS


def test_version(capsys):
    from qvlquant.version import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"qvlquant {__version__}"


def subcommand_help(name, capsys) -> str:
    assert main([name, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with single spaces


@pytest.mark.parametrize("name,shown", [
    ("eval", ["--task {easyvqa,docvqa,textvqa,chartqa,mmbench,mmmu,mathvista}", "(default: easyvqa)",
              "(default: 64)", "questions per generate call", "skip the held-out perplexity", "(default: demo)",
              "Task accuracy (the embedded easy-vqa, or a VLMEvalKit TSV / hf: benchmark)"]),
    ("bench", ["--shape {qwen2-vl-2b,qwen2-vl-7b,demo}", "(default: demo)",
               "from: bf16, gptq-int8, gptq-int4, awq, bnb-nf4, bnb-int8", "(default: bf16,gptq-int4,awq,gptq-int8)"]),
    ("push", ["create the repo private", "owner/name on the hub"]),
    ("check", ["accuracy points TASK may lose (default 1.0)", "CI gate: exit 1"]),
    ("inspect", ["whether it verifies"]),
    ("quantize", ["--method {rtn,gptq,awq}", "default rtn"]),  # the lead's flags: None defaults stay unprinted
])
def test_help_shows_defaults_choices_and_a_description(name, shown, capsys):
    text = subcommand_help(name, capsys)
    for part in shown:
        assert part in text, part
    assert "(default: None)" not in text and "(default: False)" not in text


def option_helps(text: str) -> dict[str, str]:
    """An --help output -> {option: its help text on one line}, from the options section."""
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    return {e.split()[0]: " ".join(e.split()) for e in entries if e.strip()}


def per_width(shown: str) -> dict[int, str]:
    """'2.4 at 2/3 bits, 0 at 4/8 bits' -> {2: '2.4', 3: '2.4', 4: '0', 8: '0'}; one value: the same at every width."""
    pairs = re.findall(r"(\S+) at ([\d/]+) bits", shown)
    return {int(b): v for v, bits in pairs for b in bits.split("/")} if pairs else dict.fromkeys((2, 3, 4, 8), shown)


def shown_default(helps: dict[str, str], flag: str, pattern: str) -> dict[int, str]:
    found = re.search(pattern, helps[flag])
    assert found, f"{flag}: no default in {helps[flag]!r}"
    return per_width(found.group(1))


def test_quantize_help_shows_the_defaults_quantconfig_resolves(capsys):
    """The defaults quantize --help shows at 3 and 4 bits are what QuantConfig resolves (GPTQ's mse and
    act-order, AWQ's rounding differ below 4 bits), the plain ones what JobConfig.from_flat applies, and no
    switch claims a default of its own (``--no-desc-act`` once read "default: True")."""
    assert main(["quantize", "--help"]) == 0
    out = capsys.readouterr().out
    helps = option_helps(out)
    mse = shown_default(helps, "--mse", r"default for gptq: ([^;]+);")
    rounding = shown_default(helps, "--awq-rounding", r"default: (.+)$")
    act = shown_default(helps, "--desc-act", r"\(default: (\w+),")
    static = shown_default(helps, "--desc-act", r"with static groups (\w+)\)")
    on = {True: "on", False: "off"}
    for bits in (3, 4):
        gptq, awq = QuantConfig("gptq", QuantSpec(bits)), QuantConfig("awq", QuantSpec(bits, sym=False))
        assert float(mse[bits]) == gptq.mse, bits
        assert rounding[bits] == awq.awq_rounding, bits
        assert (act[bits], static[bits]) == (on[gptq.desc_act], on[gptq.static_groups]), bits
    job, gptq = JobConfig.from_flat(output="-"), JobConfig.from_flat(output="-", method="gptq").quant
    plain = {"--method": job.quant.method, "--bits": job.quant.spec.bits, "--group-size": job.quant.spec.group_size,
             "--damp-percent": gptq.damp_percent, "--vision-weight": gptq.vision_weight, "--model": job.model,
             "--num-samples": job.calib.num_samples, "--split": job.calib.split,
             "--seed": job.calib.seed, "--batch-size": job.processing.batch_size,
             "--max-length": job.processing.max_length, "--min-pixels": job.processing.min_pixels,
             "--max-pixels": job.processing.max_pixels, "--device": job.device.device,
             "--offload": job.device.offload, "--format": job.export.format}
    for flag, value in plain.items():
        expected = f"{value:g}" if isinstance(value, float) else str(value)
        assert shown_default(helps, flag, r"default ([^\s);]+)")[4] == expected, flag
    sym = {m: JobConfig.from_flat(output="-", method=m).quant.spec.sym for m in ("rtn", "gptq", "awq")}
    assert shown_default(helps, "--sym", r"default for ([\w/]+)")[4].split("/") == [m for m in sym if sym[m]]
    assert shown_default(helps, "--asym", r"default for ([\w/]+)")[4].split("/") == [m for m in sym if not sym[m]]
    assert "(default: True)" not in out and "(default: False)" not in out and "(default: None)" not in out
    calib = " ".join(helps["--calib"].split())
    assert "the demo's chats for the embedded models and for rtn; required for gptq and awq" in calib


def test_every_option_of_the_non_quantize_subcommands_has_help():
    from qvlquant.cli import (
        Parser,
        add_bench,
        add_check,
        add_eval,
        add_inspect,
        add_push,
    )

    sub = Parser().add_subparsers()
    for add in (add_eval, add_check, add_push, add_bench, add_inspect):
        add(sub)
    missing = [(name, a.dest) for name, p in sub.choices.items() for a in p._actions if not a.help]  # argparse's list
    assert missing == []


def test_bad_choice_and_bad_variant_exit_2_with_the_choices(capsys):
    assert main(["bench", "--variants", "bf16,int3"]) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'int3'; choose from bf16, gptq-int8, gptq-int4, awq, bnb-nf4, bnb-int8" in err
    assert main(["bench", "--shape", "llama"]) == 2
    assert "invalid choice: 'llama'" in capsys.readouterr().err


def test_a_hub_id_without_network_says_what_to_do(capsys):
    """HF_HUB_OFFLINE=1 (conftest) and nothing cached: the error says offline and how to get past it."""
    assert main(["eval", "--model", "nobody-here/no-such-model", "--base", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not fetch it from the hub" in err and "offline? set HF_HUB_OFFLINE=1" in err
    assert "pass a local folder" in err and len(err.splitlines()) == 1


def test_only_the_torchao_enum_notice_is_silenced():
    import logging

    import qvlquant.cli  # noqa: F401  installs the filter

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("torch.utils._pytree")
    handler = Keep()
    log.addHandler(handler)
    try:
        log.warning("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
                    "Calling register_constant() on Enum subclasses is deprecated", "<enum 'KernelPreference'>")
        log.warning("something else torch's pytree says")
    finally:
        log.removeHandler(handler)
    assert records == ["something else torch's pytree says"]


@pytest.mark.parametrize("flags,batches,nproc", [(["--num-samples", "2"], 2, 4),
                                                 (["--num-samples", "4", "--batch-size", "2"], 2, 3)])
def test_more_processes_than_calibration_batches_is_refused_before_any_starts(flags, batches, nproc, tmp_path,
                                                                              capsys, monkeypatch):
    """RELIABILITY.md 47: --nproc 4 with 2 batches started four processes before refusing."""
    monkeypatch.setattr("qvlquant.parallel.launch.subprocess.Popen", lambda *a, **k: pytest.fail("a process started"))
    assert main(["quantize", "--nproc", str(nproc), *flags, "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{batches} calibration batches for {nproc} processes: every process needs at least one" in err
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def rtn_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stranded") / "export"
    assert main(["quantize", "--method", "rtn", "--num-samples", "2", "--output", str(out)]) == 0
    return out


@pytest.mark.parametrize("argv", [["inspect", "{q}"], ["push", "{q}", "--repo", "me/q", "--dry-run"],
                                  ["eval", "--model", "{q}", "--base", "none", "--limit", "1", "--no-perplexity"]],
                         ids=["inspect", "push", "eval"])
def test_an_export_stranded_between_the_renames_of_publish_is_restored_before_it_is_read(argv, rtn_dir, tmp_path,
                                                                                         capsys):
    """RELIABILITY.md 47: a kill between the two renames leaves the previous export in .NAME.old-PID; only a later
    quantize put it back."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stranded, q = tmp_path / f".q.old-{child.pid}", tmp_path / "q"
    shutil.copytree(rtn_dir, stranded)
    assert main([a.format(q=q) for a in argv]) == 0
    assert f"restored {q} from {stranded}" in capsys.readouterr().err
    assert not stranded.exists()
    assert (q / "model.safetensors").read_bytes() == (rtn_dir / "model.safetensors").read_bytes()


def test_the_command_lets_openmp_threads_sleep_unless_told_otherwise():
    """OMP_WAIT_POLICY is read when torch loads: the CLI sets PASSIVE before that, and keeps a user's own value."""
    import os
    import subprocess
    import sys

    code = "import os, qvlquant.cli, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"


def test_default_threads_leave_the_cpus_the_load_takes(monkeypatch):
    """At load ~4 on 2 cores one thread, on a quiet machine the whole quota, split between --nproc processes."""
    from qvlquant.parallel import devices

    monkeypatch.setattr(devices, "cpu_quota", lambda: 2)
    for load, processes, expected in ((0.0, 1, 2), (0.5, 1, 2), (1.0, 1, 1), (4.0, 1, 1), (0.2, 2, 1)):
        monkeypatch.setattr(devices.os, "getloadavg", lambda load=load: (load, load, load))
        assert devices.default_threads(processes) == expected, (load, processes)


def failing(error: BaseException):
    def run(args):
        raise error

    return run


INTERNAL = ("qvlquant check: internal error: ZeroDivisionError: division by zero (please report it at the qvlquant "
            "issue tracker, with --debug output)")


def test_an_unexpected_error_is_one_line_saying_where_to_report_it(monkeypatch, capsys):
    """A fault no check foresaw (here a ZeroDivisionError) is exit 3 and one line naming the error and where to
    report it: never a traceback; 2 stays bad input and 1 a regression."""
    from qvlquant import cli

    monkeypatch.setattr(cli, "run_check", failing(ZeroDivisionError("division by zero")))
    assert main(["check", "r.json"]) == 3
    captured = capsys.readouterr()
    assert captured.err.strip() == INTERNAL and "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("how", ["--debug first", "--debug after the command", "QVLQUANT_DEBUG=1"])
def test_debug_shows_the_traceback(monkeypatch, how):
    from qvlquant import cli

    monkeypatch.setattr(cli, "run_check", failing(ZeroDivisionError("division by zero")))
    argv = {"--debug first": ["--debug", "check", "r.json"], "--debug after the command": ["check", "r.json", "--debug"],
            "QVLQUANT_DEBUG=1": ["check", "r.json"]}[how]
    if how == "QVLQUANT_DEBUG=1":
        monkeypatch.setenv("QVLQUANT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(argv)


def test_bad_input_under_debug_raises_too(monkeypatch):
    from qvlquant import cli

    monkeypatch.setattr(cli, "run_check", failing(ValueError("r.json: not an eval report")))
    assert main(["check", "r.json"]) == 2
    with pytest.raises(ValueError, match="not an eval report"):
        main(["--debug", "check", "r.json"])


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    from qvlquant import cli

    monkeypatch.setattr(cli, "run_check", failing(KeyboardInterrupt()))
    assert main(["check", "r.json"]) == 130
    assert capsys.readouterr().err.strip() == "qvlquant check: interrupted"
    with pytest.raises(KeyboardInterrupt):
        main(["--debug", "check", "r.json"])


def test_the_exit_status_of_an_internal_error_reaches_the_shell(tmp_path):
    """Through a real interpreter: the status the shell sees is 3 and stderr holds no traceback."""
    import subprocess
    import sys

    code = ("import sys, qvlquant.cli as c\n"
            "def boom(args): raise KeyError('x')\n"
            "c.run_check = boom\n"
            "sys.exit(c.main(['check', 'r.json']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip() == ("qvlquant check: internal error: KeyError: 'x' (please report it at the qvlquant "
                                   "issue tracker, with --debug output)")


@pytest.mark.slow
@pytest.mark.parametrize("scheme,label", [("FP8_BLOCK", "FP8 block"), ("FP8_DYNAMIC", "compressed-tensors FP8 channel")])
def test_fp8_schemes_quantize_without_data_and_pass_the_check(scheme, label, tmp_path, capsys):
    """Data-free FP8 from the command line, then eval and qvlquant's own gate with its default tolerances: W8A8
    FP8 on the demo is within the noise of BF16 (measured: easyvqa 83.0 vs 82.5 %, perplexity 34.19 vs 34.16)."""
    out = tmp_path / scheme
    assert main(["quantize", "--scheme", scheme, "--output", str(out)]) == 0
    assert f"quantized 28 linears ({scheme}, data-free)" in capsys.readouterr().out
    report = tmp_path / "e.json"
    assert main(["eval", "--model", str(out), "--limit", "200", "--report", str(report)]) == 0
    assert label in capsys.readouterr().out  # the eval table names the format
    assert json.loads(report.read_text())["quantization"]["weights"] == "fp8_e4m3"
    assert main(["check", str(report)]) == 0


@pytest.mark.parametrize("extra,named", [(["--method", "gptq"], "--method"),
                                         (["--bits", "8"], "--bits"),
                                         (["--bits", "4"], "--bits"),  # --bits' default, given: still refused
                                         (["--calib", "easyvqa"], "--calib"),
                                         (["--format", "compressed-tensors"], "--format"),
                                         (["--format", "auto"], "--format")])
def test_a_scheme_refuses_the_integer_methods_settings(extra, named, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", "--scheme", "FP8_BLOCK", *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qvlquant quantize: error: {named} does not apply to --scheme FP8_BLOCK (FP8 e4m3 "
                          "128x128 blocks, dynamic activations; data-free: ") and ": drop it" in err
    assert len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("extra", [[], ["--method", "gptq"]])
def test_w8a8_with_bits_4_is_refused_naming_the_flag_and_what_to_do(extra, tmp_path, capsys):
    """Issue 26: --scheme W8A8 --bits 4 ran a W8A8 export and ignored the 4."""
    out = tmp_path / "out"
    assert main(["quantize", "--scheme", "W8A8", "--bits", "4", *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qvlquant quantize: error: --bits does not apply to --scheme W8A8 (INT8 per-channel")
    assert err.endswith("drop it; for 4-bit integer weights leave out --scheme and use --method gptq --bits 4")
    assert len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("extra,named", [(["--device", "cuda"], "--device"), (["--dtype", "bfloat16"], "--dtype"),
                                         (["--offload", "cpu"], "--offload")])
def test_a_data_free_scheme_refuses_where_layers_would_run(extra, named, tmp_path, capsys):
    """Data-free, each weight is quantized on the CPU as it streams from the checkpoint: these flags did nothing."""
    out = tmp_path / "out"
    assert main(["quantize", "--scheme", "NVFP4A16", *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qvlquant quantize: error: {named} does not apply to --scheme NVFP4A16 (") and \
        err.endswith("drop it; a data-free scheme runs no layer: it quantizes each weight on the CPU as the export "
                     "streams it from the checkpoint (--device cpu may stay)")
    assert len(err.splitlines()) == 1 and not out.exists()


def test_a_flag_a_recipes_scheme_does_not_take_is_refused(tmp_path, capsys):
    """A recipe's settings and the flags given with it are checked alike: the FP8 recipe with --group-size."""
    out = tmp_path / "out"
    recipe = pathlib.Path(__file__).resolve().parent.parent / "recipes" / "demo-fp8-block.yaml"
    assert main(["quantize", "--recipe", str(recipe), "--group-size", "128", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qvlquant quantize: error: --group-size does not apply to --scheme FP8_BLOCK")
    assert len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("scheme,label", [("FP8", "compressed-tensors FP8 static"),
                                          ("NVFP4", "compressed-tensors NVFP4 W4A4")])
def test_calibrated_schemes_quantize_from_calibration_data_and_pass_the_check(scheme, label, tmp_path, capsys):
    """The calibrated schemes from the command line on the demo's chats, then eval (the served numerics: static
    FP8 activations, NVFP4 activations per 16 inputs) and qvlquant's own gate with its default tolerances
    (RESULTS.md, "Calibrated FP8 and NVFP4 on the demo")."""
    out = tmp_path / scheme
    assert main(["quantize", "--scheme", scheme, "--num-samples", "32", "--output", str(out)]) == 0
    smoothing = "SmoothQuant 0.8, " if scheme == "NVFP4" else ""  # NVFP4's default strength
    assert f"quantized 28 linears ({scheme}, {smoothing}activation scales from " in capsys.readouterr().out
    report = tmp_path / "e.json"
    assert main(["eval", "--model", str(out), "--limit", "200", "--report", str(report)]) == 0
    assert label in capsys.readouterr().out
    assert main(["check", str(report)]) == 0


@pytest.mark.parametrize("scheme,extra,message", [
    ("FP8", ["--method", "gptq"], "--method does not apply to --scheme FP8"),
    ("NVFP4", ["--override", "self_attn:bits=8"], "--override / --ignore does not apply to --scheme NVFP4"),
    ("FP8", ["--nproc", "2"], "scheme FP8 runs in one process"),
    ("NVFP4A16", ["--calib", "easyvqa"], "only FP8 and NVFP4 take calibration data (the calibrated schemes)"),
    ("FP8", ["--smoothing-strength", "0.5"], "SmoothQuant is for --scheme W8A8 (with --method gptq or rtn) and "
                                             "--scheme NVFP4 (W4A4); not for scheme FP8"),
    ("NVFP4A16", ["--smoothing-strength", "0.5"], "not for scheme NVFP4A16"),
    ("NVFP4", ["--smoothing-strength", "auto"], "smoothing_strength auto searches for the least int8 (W8A8) output "
                                                "error; for --scheme NVFP4 give a number from 0 to 1"),
])
def test_the_calibrated_schemes_refuse_what_does_not_apply_before_any_work(scheme, extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", "--scheme", scheme, *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("extra,flag", [(["--override", "self_attn:bits=8"], "--override / --ignore"),
                                        (["--ignore", r"layers\.1\.mlp"], "--override / --ignore"),
                                        (["--group-size", "64"], "--group-size"), (["--calib", "easyvqa"], "--calib"),
                                        (["--num-samples", "64"], "--num-samples")])
def test_w8a8_refuses_per_module_rules_and_the_integer_methods_settings_as_fp8_does(extra, flag, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", "--scheme", "W8A8", *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qvlquant quantize: error: {flag} does not apply to --scheme W8A8 (INT8 per-channel, "
                          "dynamic per-token int8 activations; data-free: weights from the checkpoint, no calibration, "
                          "in its own format): drop it")
    assert len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--method", "awq"], "scheme W8A8 rounds its (smoothed) weights with --method gptq or rtn, got awq"),
    (["--method", "gptq", "--smoothing-strength", "1.2"], "smoothing_strength must be a number from 0 to 1"),
    (["--method", "gptq", "--bits", "8"], "--bits does not apply to --scheme W8A8"),
    (["--method", "gptq", "--asym", "--mse", "0"], "--asym, --mse do not apply to --scheme W8A8"),
    (["--method", "gptq", "--nproc", "2"], "scheme W8A8 runs in one process"),
])
def test_calibrated_w8a8_refuses_bad_settings_before_any_work(extra, message, tmp_path, capsys):
    """--scheme W8A8 with --method gptq / rtn or --smoothing-strength is the calibrated path (SmoothQuant, then
    GPTQ or RTN); what it cannot take is a one-line error naming it, before anything is read or written."""
    out = tmp_path / "out"
    assert main(["quantize", "--scheme", "W8A8", *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_w8a8_quantizes_without_data_and_passes_the_check(tmp_path, capsys):
    """Data-free INT8 W8A8 from the command line, then eval (the served numerics: int8 activations per token) and
    qvlquant's own gate with its default tolerances."""
    out = tmp_path / "w8a8"
    assert main(["quantize", "--scheme", "W8A8", "--output", str(out)]) == 0
    assert "quantized 28 linears (W8A8, data-free)" in capsys.readouterr().out
    report = tmp_path / "e.json"
    assert main(["eval", "--model", str(out), "--limit", "200", "--report", str(report)]) == 0
    assert "compressed-tensors W8A8 INT8" in capsys.readouterr().out  # the eval table names the format
    assert json.loads(report.read_text())["quantization"]["weights"] == "int8_w8a8"
    assert main(["check", str(report)]) == 0


def test_target_bits_writes_a_mixed_export_whose_recipe_reproduces_it(tmp_path):
    """The search's export differs from uniform W4 (rules in the config), its report holds the measured table, and
    mixed_precision.yaml, rerun with --recipe and no search, gives the same safetensors bytes."""
    import hashlib

    from qvlquant.storage.manifest import verify_manifest

    out, again = tmp_path / "mixed", tmp_path / "again"
    assert main(["quantize", "--method", "gptq", "--target-bits", "4.5", "--num-samples", "8", "--output",
                 str(out)]) == 0
    report = json.loads((out / "quantize_report.json").read_text())
    mixed = report["mixed_precision"]
    assert mixed["target_bits"] == 4.5 and mixed["bits_per_weight"] <= 4.5 and mixed["recipe"] == "mixed_precision.yaml"
    assert len(mixed["groups"]) == 16 and {g["chosen"] for g in mixed["groups"]} != {4}
    assert all(g["errors"]["8"] < g["errors"]["4"] < g["errors"]["3"] for g in mixed["groups"])
    assert report["config"]["rules"] and "target_bits" not in json.dumps(report["config"]["rules"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"]  # per-module widths, as GPTQModel writes them
    verify_manifest(out)  # the recipe is published with the rest and covered by the manifest
    assert "mixed_precision.yaml" in json.loads((out / "qvlquant_manifest.json").read_text())["files"]
    assert main(["quantize", "--recipe", str(out / "mixed_precision.yaml"), "--output", str(again)]) == 0
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(out / "model.safetensors") == digest(again / "model.safetensors")
    assert (out / "config.json").read_text() == (again / "config.json").read_text()
    assert "mixed_precision" not in json.loads((again / "quantize_report.json").read_text())


@pytest.mark.parametrize("argv,message", [
    (["--method", "awq", "--target-bits", "4.25"], "AWQ GEMM format holds one width"),
    (["--method", "gptq", "--target-bits", "2.5"], "target_bits 2.5 is below the smallest candidate, W3 at 3.1"),
    (["--method", "gptq", "--target-bits", "12", "--candidate-bits", "3,4,8"],
     "target_bits 12 is above the largest candidate, W8 at 8.1"),
    (["--method", "gptq", "--target-bits", "4.5", "--candidate-bits", "3,5"], "candidate_bits: '5' is not one of"),
    (["--method", "gptq", "--target-bits", "4.5", "--sensitivity", "hessian"], "invalid choice: 'hessian'"),
    (["--method", "gptq", "--target-bits", "-1"], "target_bits must be a finite number above 0"),
    (["--method", "gptq", "--target-bits", "4.5", "--nproc", "2"], "--target-bits measures in one process"),
])
def test_target_bits_is_checked_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and not out.exists()


def test_target_bits_on_the_model_names_the_exact_floor(tmp_path, capsys):
    """The job config checks a nominal 4096-square linear; the search checks the model's own (the demo's small
    linears carry more scale bits per weight), before any layer is quantized."""
    assert main(["quantize", "--method", "gptq", "--target-bits", "3.2", "--num-samples", "2",
                 "--output", str(tmp_path / "o")]) == 2
    assert "below the smallest candidate, W3 at 3.2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
