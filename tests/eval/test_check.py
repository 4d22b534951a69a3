"""The CI gate, as a library (qvlquant.check, eval.check) and through ``qvlquant check``: a regression exits 1, bad
input (unknown task, negative / non-numeric tolerance, broken recipe, a report without the fields) exits 2."""

import json
import math
import os

import pytest

import qvlquant
from qvlquant.cli import main
from qvlquant.eval.check import (
    DEFAULT_MAX_DROP,
    Tolerances,
    check,
    format_rows,
    parse_max_drop,
    task_scores,
    verdicts,
)
from qvlquant.recipes import check_tolerances


def report(acc, ppl, n=100, **extra):
    return {"task": "easyvqa", "accuracy": acc, "n": n, "perplexity": ppl, **extra}


def write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_verdicts_rows_and_bounds():
    rows = verdicts(report(77.0, 34.5), report(77.5, 34.16))
    assert [(r.measure, r.ok, r.limit) for r in rows] == [("easyvqa accuracy %", True, ">= 76.50"),
                                                          ("held-out perplexity", True, "<= 34.843")]
    rows = verdicts(report(75.0, 34.5), report(77.5, 34.16), Tolerances({"easyvqa": 3.0}))
    assert rows[0].ok and rows[0].limit == ">= 74.50"
    rows = verdicts(report(76.4, 34.5), report(77.5, 34.16))  # 1.1 points lost, 1.0 allowed by default
    assert not rows[0].ok and DEFAULT_MAX_DROP == 1.0
    rows = verdicts(report(77.5, 36.0), report(77.5, 34.16), Tolerances(max_ppl_increase=2.0))
    assert not rows[1].ok and rows[1].limit == "<= 34.843"
    assert [r.measure for r in verdicts({"task": "easyvqa", "accuracy": 70, "n": 1}, report(70, 30, n=1))] == [
        "easyvqa accuracy %"]  # no perplexity in the candidate: no perplexity row


@pytest.mark.parametrize("drop,ppl_increase,accuracy,perplexity", [
    (0.0, 0.0, 77.5, 32.0),  # zero tolerance: the baseline's own scores
    (0.5, 12.5, 77.0, 36.0),  # exactly at the bounds (77.5 - 0.5 and 32 * 1.125 are exact in binary)
])
def test_a_score_at_its_bound_passes_and_the_next_float_beyond_fails(tmp_path, drop, ppl_increase, accuracy,
                                                                     perplexity):
    """The bounds are inclusive: --max-drop easyvqa=0 --max-ppl-increase 0 passes an unchanged model, and the
    smallest regression past a bound (one float) fails."""
    import math

    base, tol = report(77.5, 32.0), Tolerances({"easyvqa": drop}, ppl_increase)
    assert check(report(accuracy, perplexity), base, tol).passed
    assert check(report(math.nextafter(accuracy, 0), perplexity), base, tol).failed == ["easyvqa accuracy %"]
    assert check(report(accuracy, math.nextafter(perplexity, math.inf)), base, tol).failed == ["held-out perplexity"]
    same = write(tmp_path / "same.json", report(accuracy, perplexity, baseline=base))
    assert main(["check", str(same), "--max-drop", f"easyvqa={drop}", "--max-ppl-increase", str(ppl_increase)]) == 0


def test_verdicts_refuse_mismatched_reports():
    with pytest.raises(ValueError, match="different numbers of questions"):
        verdicts(report(70, 30, n=50), report(70, 30, n=100))
    with pytest.raises(ValueError, match=r"lacks task\(s\) \['easyvqa'\]"):
        verdicts({"tasks": {"docvqa": {"accuracy": 50}}, "n": 1}, report(70, 30, n=1))


def test_check_library_passes_and_fails_without_raising(tmp_path):
    good = check(report(77.2, 34.2, baseline=report(77.5, 34.16)))
    assert good.passed and good.failed == [] and len(good.rows) == 2
    bad = check(report(70.0, 40.0), report(77.5, 34.16))
    assert not bad.passed and bad.failed == ["easyvqa accuracy %", "held-out perplexity"]
    path = write(tmp_path / "r.json", report(76.0, 34.2, baseline=report(77.5, 34.16)))
    assert not check(path).passed  # 1.5 points lost
    assert check(path, tolerances=Tolerances({"easyvqa": 2.0})).passed
    assert qvlquant.check(str(path), max_drop={"easyvqa": 2.0}).passed
    base = write(tmp_path / "b.json", report(76.0, 34.2))
    assert check(str(path), str(base)).passed  # an explicit baseline file replaces the embedded one
    assert "REGRESSION" in format_rows(bad.rows) and "ok" in format_rows(good.rows)


@pytest.mark.parametrize("tol,message", [
    (lambda: Tolerances({"easyvqq": 0.0}), "unknown task 'easyvqq'; known: easyvqa, docvqa"),
    (lambda: Tolerances({"easyvqa": -1.0}), r"max_drop\['easyvqa'\] must be a finite number >= 0, got -1.0"),
    (lambda: Tolerances({"easyvqa": "1"}), "must be a finite number >= 0, got '1'"),
    (lambda: Tolerances({"easyvqa": float("inf")}), "got inf"),
    (lambda: Tolerances(max_ppl_increase=-0.5), "max_ppl_increase must be a finite number >= 0"),
    (lambda: Tolerances(max_ppl_increase=float("nan")), "max_ppl_increase must be"),
    (lambda: Tolerances().override({"mmbenc": 1.0}), "unknown task 'mmbenc'"),
    (lambda: parse_max_drop(["easyvqq=0"]), "--max-drop 'easyvqq=0': unknown task 'easyvqq'"),
    (lambda: parse_max_drop(["easyvqa=-2"]), "--max-drop 'easyvqa=-2': POINTS must be a finite number >= 0"),
    (lambda: parse_max_drop(["easyvqa=lots"]), "expected TASK=POINTS"),
    (lambda: parse_max_drop(["easyvqa"]), "expected TASK=POINTS"),
    (lambda: parse_max_drop(["=1"]), "expected TASK=POINTS"),
])
def test_bad_tolerances_are_errors(tol, message):
    with pytest.raises(ValueError, match=message):
        tol()


def test_tolerance_resolution_recipe_then_flags(tmp_path):
    recipe = write(tmp_path / "r.yaml", "method: gptq\ncheck:\n  max_drop:\n    easyvqa: 2.0\n  max_ppl_increase: 1.0\n")
    assert check_tolerances() == Tolerances({}, 2.0)
    assert check_tolerances(recipe) == Tolerances({"easyvqa": 2.0}, 1.0)
    assert check_tolerances(recipe, {"easyvqa": 0.5}) == Tolerances({"easyvqa": 0.5}, 1.0)
    assert check_tolerances(recipe, {"docvqa": 3.0}, 0.0) == Tolerances({"easyvqa": 2.0, "docvqa": 3.0}, 0.0)
    assert parse_max_drop(["easyvqa=1", "docvqa=2.5", "easyvqa=0"]) == {"easyvqa": 0.0, "docvqa": 2.5}


@pytest.mark.parametrize("data,message", [
    ({"n": 3}, "not an eval report"),
    ({"task": "easyvqa", "n": 3}, "accuracy must be a finite number, got None"),
    ({"task": "easyvqa", "accuracy": "77", "n": 3}, "accuracy must be a finite number, got '77'"),
    ({"task": "easyvqa", "accuracy": 77, "n": 3, "perplexity": "high"}, "perplexity must be a finite number"),
    ({"tasks": {"docvqa": 50}, "n": 3}, "tasks must map task"),
    ([1, 2], "not an eval report"),
    ("{not json", "cannot read eval report"),
    ({"task": ["easyvqa"], "accuracy": 77, "n": 3}, r"task must be a task name, got \['easyvqa'\]"),
    ({"task": "easyvqa", "accuracy": 77, "n": [3]}, r"n must be a whole number >= 0, got \[3\]"),
    ({"task": "easyvqa", "accuracy": 77, "n": 3, "model": {"a": 1}}, "model must be a string"),
    ({"task": "easyvqa", "accuracy": 77, "n": 3, "baseline": [1]}, "baseline: not an eval report"),
    ({"task": "easyvqa", "accuracy": 77, "n": 3, "baseline": {"task": "easyvqa", "accuracy": 70, "perplexity": "x"}},
     "baseline: perplexity must be a finite number"),
])
def test_reports_without_the_needed_fields_are_errors(tmp_path, data, message):
    path = write(tmp_path / "r.json", data)
    with pytest.raises(ValueError, match=message) as e:
        check(path, report(77.5, 34.16, n=3))
    assert str(path) in str(e.value)  # the error names the file
    with pytest.raises(ValueError, match=message):  # the same fields wrong in the baseline
        check(report(77.5, 34.16, n=3), path)


def test_task_scores_reads_one_or_many_tasks():
    assert task_scores({"task": "easyvqa", "accuracy": 70}) == {"easyvqa": 70.0}
    assert task_scores({"tasks": {"docvqa": {"accuracy": 50}}, "task": "easyvqa", "accuracy": 70}) == {
        "docvqa": 50.0, "easyvqa": 70.0}


def test_cli_exit_codes(tmp_path, capsys):
    good = write(tmp_path / "good.json", report(77.2, 34.2, baseline=report(77.5, 34.16)))
    bad = write(tmp_path / "bad.json", report(70.0, 40.0, baseline=report(77.5, 34.16)))
    assert main(["check", str(good)]) == 0 and "check: passed" in capsys.readouterr().out
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "FAILED: easyvqa accuracy %, held-out perplexity" in out
    alone = write(tmp_path / "alone.json", report(70, 30))
    assert main(["check", str(alone)]) == 2 and "holds no baseline" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--max-drop", "easyvqa"], "expected TASK=POINTS"),
    (["--max-drop", "easyvqq=0"], "unknown task 'easyvqq'"),  # a typo no longer passes the gate silently
    (["--max-drop", "easyvqa=-1"], "must be a finite number >= 0"),
    (["--max-drop", "easyvqa=nan"], "must be a finite number >= 0"),
    (["--max-ppl-increase", "-1"], "--max-ppl-increase must be a finite number >= 0"),
])
def test_cli_bad_tolerances_exit_2_even_on_a_regression(tmp_path, capsys, argv, message):
    bad = write(tmp_path / "bad.json", report(70.0, 40.0, baseline=report(77.5, 34.16)))
    assert main(["check", str(bad), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text,message", [
    ("check:\n  max_dorp: {}\n", "unknown check key(s) ['max_dorp']"),
    ("check:\n  max_drop:\n    easyvqq: 0\n", "check.max_drop: unknown task 'easyvqq'"),
    ("check:\n  max_drop:\n    easyvqa: -1\n", "check.max_drop.easyvqa must be a finite number >= 0"),
    ("check:\n  max_drop:\n    easyvqa: lots\n", "check.max_drop.easyvqa must be a finite number >= 0, got 'lots'"),
    ("check:\n  max_ppl_increase: [1]\n", "check.max_ppl_increase must be"),
    ("check: 3\n", "check must be a mapping"),
    ("check:\n  max_drop: [easyvqa]\n", "check.max_drop must map task -> points"),
    ("check: {max_drop: {easyvqa: 1}\n", "cannot read recipe"),  # broken YAML: exit 2, not a traceback
    ("bitz: 4\n", "unknown key(s) ['bitz']"),
])
def test_cli_bad_recipe_exits_2_naming_the_file(tmp_path, capsys, text, message):
    rep = write(tmp_path / "r.json", report(76.0, 34.3, baseline=report(77.5, 34.16)))
    recipe = write(tmp_path / "r.yaml", text)
    assert main(["check", str(rep), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(recipe) in err and len(err.strip().splitlines()) == 1


def test_cli_missing_recipe_or_report_exits_2(tmp_path, capsys):
    rep = write(tmp_path / "r.json", report(76.0, 34.3, baseline=report(77.5, 34.16)))
    assert main(["check", str(rep), "--recipe", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read recipe" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "none.json")]) == 2
    assert "cannot read eval report" in capsys.readouterr().err
    assert main(["check", str(write(tmp_path / "x.json", {"n": 1, "baseline": report(1, 1)}))]) == 2
    assert "not an eval report" in capsys.readouterr().err


def test_tolerances_from_a_recipe(tmp_path):
    rep = write(tmp_path / "r.json", report(76.0, 34.3, baseline=report(77.5, 34.16)))
    recipe = write(tmp_path / "r.yaml", "method: gptq\ncheck:\n  max_drop:\n    easyvqa: 2.0\n  max_ppl_increase: 1.0\n")
    assert main(["check", str(rep), "--recipe", str(recipe)]) == 0  # 1.5 points allowed by the recipe's 2.0
    assert main(["check", str(rep), "--recipe", str(recipe), "--max-drop", "easyvqa=1.0"]) == 1  # flag wins
    assert main(["check", str(rep), "--recipe", str(recipe), "--max-ppl-increase", "0.1"]) == 1
    assert main(["check", str(rep)]) == 1  # without the recipe: the default 1.0 point


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "folder"])
def test_reports_that_are_not_regular_files_exit_2_unread(tmp_path, capsys, deadline, kind):
    """``qvlquant check /dev/zero`` read until memory ran out; a FIFO with no writer blocked for ever."""
    if kind == "fifo":
        os.mkfifo(tmp_path / "r.json")
    path = {"dev-zero": "/dev/zero", "fifo": str(tmp_path / "r.json"), "folder": str(tmp_path)}[kind]
    good = write(tmp_path / "good.json", report(76.0, 34.3, baseline=report(77.5, 34.16)))
    with deadline(5):
        assert main(["check", path]) == 2
        assert main(["check", str(good), "--baseline", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qvlquant check: error: eval report {path} is not a regular file (a FIFO, a device or a folder); "
                   "give a file"] * 2


def test_report_over_the_cap_exits_2_unread(tmp_path, capsys):
    path = tmp_path / "r.json"
    with open(path, "wb") as f:
        f.truncate((1 << 20) + 1)  # sparse
    assert main(["check", str(path)]) == 2
    assert f"eval report {path} is 1048577 bytes, over the 1 MiB cap" in capsys.readouterr().err


def test_a_flag_for_a_task_the_report_lacks_is_an_error_but_a_recipes_is_ignored(tmp_path, capsys):
    """--max-drop docvqa=1 on an easy-vqa report gated nothing and passed: now exit 2, naming the task and the
    tasks present. A recipe's check: section may name several tasks; those the report lacks are ignored."""
    rep = write(tmp_path / "r.json", report(77.2, 34.2, baseline=report(77.5, 34.16)))
    assert main(["check", str(rep), "--max-drop", "docvqa=1"]) == 2
    err = capsys.readouterr().err
    assert "docvqa" in err and "easyvqa" in err and "tasks present" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=r"'docvqa'.*tasks present: easyvqa"):
        qvlquant.check(str(rep), max_drop={"docvqa": 1.0})
    recipe = write(tmp_path / "r.yaml", "method: gptq\ncheck:\n  max_drop:\n    easyvqa: 1.0\n    docvqa: 2.0\n")
    assert main(["check", str(rep), "--recipe", str(recipe)]) == 0
    assert check(rep, tolerances=check_tolerances(recipe)).passed
    assert main(["check", str(rep), "--max-drop", "easyvqa=1"]) == 0


def test_each_accuracy_row_carries_the_standard_error_of_the_difference():
    """sqrt(p(1-p)/n) per side, combined: 77.5 % and 77.0 % on 200 questions -> 4.19 points."""
    rows = verdicts(report(77.0, 34.5, n=200), report(77.5, 34.16, n=200))
    expected = 100 * ((0.775 * 0.225 + 0.77 * 0.23) / 200) ** 0.5
    assert rows[0].std_error == pytest.approx(expected) and 4.1 < expected < 4.3
    assert rows[0].n == 200 and rows[1].std_error is None  # perplexity: no binomial error
    assert f"{expected:.2f}" in format_rows(rows).splitlines()[1]


def test_a_tolerance_within_the_noise_warns_on_stderr_without_failing(tmp_path, capsys):
    """A 1-point gate on 200 questions sits below 2 standard errors (8.4 points): a warning naming how many
    questions would make it meaningful; the verdict is unchanged. A tolerance above 2 SE, or 10,000 questions,
    gives none."""
    noisy = write(tmp_path / "noisy.json", report(77.0, 34.5, n=200, baseline=report(77.5, 34.16, n=200)))
    assert main(["check", str(noisy), "--max-drop", "easyvqa=1"]) == 0
    captured = capsys.readouterr()
    assert "check: passed" in captured.out and "warning" not in captured.out
    warning = captured.err.strip()
    needed = math.ceil(4 * (0.775 * 0.225 + 0.77 * 0.23) * 100**2 / 1.0**2)  # n where 2 SE = 1 point: 14,059
    assert "easyvqa" in warning and "200 questions" in warning and f"{needed:,} questions" in warning
    assert len(warning.splitlines()) == 1
    assert check(noisy, tolerances=Tolerances({"easyvqa": 1.0})).warnings == [warning.removeprefix(
        "qvlquant check: warning: ")]
    assert "zero tolerance" in check(noisy, tolerances=Tolerances({"easyvqa": 0.0})).warnings[0]
    assert main(["check", str(noisy), "--max-drop", "easyvqa=9"]) == 0 and capsys.readouterr().err == ""
    large = write(tmp_path / "large.json", report(77.0, 34.5, n=20000, baseline=report(77.5, 34.16, n=20000)))
    assert main(["check", str(large), "--max-drop", "easyvqa=1"]) == 0 and capsys.readouterr().err == ""
    assert check(large, tolerances=Tolerances({"easyvqa": 1.0})).warnings == []
