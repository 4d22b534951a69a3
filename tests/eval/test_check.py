import json

import pytest

from qvlquant.cli import main
from qvlquant.eval.check import compare


def report(acc, ppl, n=100, **extra):
    return {"task": "easyvqa", "accuracy": acc, "n": n, "perplexity": ppl, **extra}


def test_compare_rows_and_verdicts():
    rows = compare(report(77.0, 34.5), report(77.5, 34.16))
    assert [r.ok for r in rows] == [True, True]
    rows = compare(report(75.0, 34.5), report(77.5, 34.16), {"easyvqa": 3.0})
    assert rows[0].ok
    rows = compare(report(77.5, 36.0), report(77.5, 34.16), max_ppl_increase=2.0)
    assert not rows[1].ok and rows[1].limit == "<= 34.843"


def test_compare_refuses_mismatched_reports():
    with pytest.raises(ValueError, match="different numbers of questions"):
        compare(report(70, 30, n=50), report(70, 30, n=100))
    with pytest.raises(ValueError, match="lacks task"):
        compare({"tasks": {}, "n": 1}, report(70, 30, n=1))


def test_cli_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report(77.2, 34.2, baseline=report(77.5, 34.16))))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report(70.0, 40.0, baseline=report(77.5, 34.16))))
    assert main(["check", str(good)]) == 0 and "check: passed" in capsys.readouterr().out
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "FAILED: easyvqa accuracy %, held-out perplexity" in out
    assert main(["check", str(bad), "--max-drop", "easyvqa"]) == 2
    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps(report(70, 30)))
    assert main(["check", str(alone)]) == 2 and "holds no baseline" in capsys.readouterr().err


def test_tolerances_from_a_recipe(tmp_path, capsys):
    rep = tmp_path / "r.json"
    rep.write_text(json.dumps(report(76.0, 34.3, baseline=report(77.5, 34.16))))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: gptq\ncheck:\n  max_drop:\n    easyvqa: 2.0\n  max_ppl_increase: 1.0\n")
    assert main(["check", str(rep), "--recipe", str(recipe)]) == 0  # 1.5 points allowed by the recipe's 2.0
    assert main(["check", str(rep), "--recipe", str(recipe), "--max-drop", "easyvqa=1.0"]) == 1  # flag wins
    assert main(["check", str(rep), "--recipe", str(recipe), "--max-ppl-increase", "0.1"]) == 1
    recipe.write_text("check:\n  max_dorp: {}\n")
    assert main(["check", str(rep), "--recipe", str(recipe)]) == 2 and "unknown check key(s) ['max_dorp']" in capsys.readouterr().err
