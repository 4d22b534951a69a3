import json
import pathlib

import pytest

from qvlquant.cli import add_quantize, main, recipe_defaults

RECIPES = sorted((pathlib.Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def quantize_parser():
    import argparse

    root = argparse.ArgumentParser()
    sub = root.add_subparsers()
    add_quantize(sub)
    return sub.choices["quantize"]


def test_every_published_checkpoint_has_a_recipe():
    names = {p.stem for p in RECIPES}
    for family, sizes in {"qwen2-vl": ["2b", "7b", "72b"], "qwen2.5-vl": ["3b", "7b", "72b"], "qwen3-vl": ["2b", "8b"]}.items():
        for size in sizes:
            for method in ("gptq-int4", "gptq-int8", "awq"):
                assert f"{family}-{size}-instruct-{method}" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_validate(path):
    values = recipe_defaults(quantize_parser(), str(path))
    assert values["method"] in ("gptq", "awq") and values["group_size"] == 128
    if values["method"] == "gptq":
        assert values["sym"] is True and values["desc_act"] is False and values["damp_percent"] == 0.1
    else:
        assert values["bits"] == 4 and values["sym"] is False
    assert ("pad_intermediate_to" in values) == ("72b" in path.stem)


@pytest.mark.parametrize("text,message", [
    ("method: gptq\nbitz: 4\n", "unknown key(s) ['bitz']"),
    ("bits: 5\n", "bits must be one of [2, 3, 4, 8]"),
    ("bits: four\n", "bits must be int"),
    ("desc_act: yes please\n", "desc_act must be true or false"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_recipes_named(tmp_path, text, message, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert main(["quantize", "--recipe", str(path), "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_demo_recipe_with_a_flag_overriding_it(tmp_path):
    recipe = pathlib.Path(__file__).parent.parent / "recipes" / "demo-gptq-int4.yaml"
    out = tmp_path / "q"
    assert main(["quantize", "--recipe", str(recipe), "--num-samples", "4", "--output", str(out)]) == 0
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["method"] == "gptq" and report["bits"] == 4 and report["calibration"]["num_samples"] == 4
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["sym"] is True and config["damp_percent"] == 0.1 and config["true_sequential"] is True
