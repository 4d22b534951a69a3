import argparse
import json
import os
import pathlib

import pytest

from qvlquant.cli import add_quantize, main, recipe_defaults
from qvlquant.eval.check import Tolerances
from qvlquant.recipes import COMMAND_LINE_ONLY, SETTINGS, load_recipe, parse_recipe

RECIPES = sorted((pathlib.Path(__file__).parent.parent / "recipes").glob("*.yaml"))
# Settings a recipe may hold before the quantize command has the flag (the streaming work adds them).
PLANNED_FLAGS = {"device", "offload"}


def quantize_actions() -> dict:
    """dest -> argparse action of the quantize flags (argparse's private list: only this cross-check reads it)."""
    sub = argparse.ArgumentParser().add_subparsers()
    add_quantize(sub)
    actions = {a.dest: a for a in sub.choices["quantize"]._actions if a.dest != "help"}
    actions["rules"] = actions.pop("cli_rules")  # --override / --ignore: a recipe's rules list
    return actions


def test_every_published_checkpoint_has_a_recipe():
    names = {p.stem for p in RECIPES}
    for family, sizes in {"qwen2-vl": ["2b", "7b", "72b"], "qwen2.5-vl": ["3b", "7b", "72b"], "qwen3-vl": ["2b", "8b"]}.items():
        for size in sizes:
            for method in ("gptq-int4", "gptq-int8", "awq"):
                assert f"{family}-{size}-instruct-{method}" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_validate(path):
    values = load_recipe(path).settings
    assert recipe_defaults(str(path)) == dict(values)  # the CLI takes exactly the library's settings
    if "scheme" in values:  # Qwen's FP8: data-free, none of the integer methods' settings
        assert values["scheme"] == "FP8_BLOCK" and set(values) == {"model", "scheme"}
        assert path.stem.endswith("fp8") or path.stem.endswith("fp8-block")
        return
    assert values["method"] in ("gptq", "awq") and values["group_size"] == 128
    if values["method"] == "gptq":
        assert values["sym"] is True and values["desc_act"] is False and values["damp_percent"] == 0.1
    else:
        assert values["bits"] == 4 and values["sym"] is False
    assert ("pad_intermediate_to" in values) == ("72b" in path.stem)
    assert recipe_defaults(str(path)) == dict(values)  # the CLI takes exactly the library's settings


def test_qwen3_vl_fp8_checkpoints_have_a_recipe_that_configures_a_job():
    from qvlquant.config import JobConfig
    from qvlquant.quant.formats import Fp8Format

    for size in ("2b", "4b", "8b", "32b"):
        path = pathlib.Path(__file__).parent.parent / "recipes" / f"qwen3-vl-{size}-instruct-fp8.yaml"
        job = JobConfig.from_flat(output="-", **load_recipe(path).settings)
        assert job.fp8_format is Fp8Format.BLOCK and job.calib.source is None
    demo = load_recipe(pathlib.Path(__file__).parent.parent / "recipes" / "demo-fp8-block.yaml")
    assert demo.tolerances == Tolerances({"easyvqa": 1.0}, 1.0)


def test_the_demo_recipe_carries_its_check_tolerances():
    recipe = load_recipe(pathlib.Path(__file__).parent.parent / "recipes" / "demo-gptq-int4.yaml")
    assert recipe.tolerances == Tolerances({"easyvqa": 1.0}, 2.0)
    assert recipe.settings["model"] == "demo" and recipe.settings["num_samples"] == 32 and "check" not in recipe.settings


def test_schema_matches_the_quantize_flags():
    """Every quantize flag is a recipe key or deliberately command-line only; the declared types and choices are
    the flags' (a flag added or changed without the schema fails here)."""
    actions = quantize_actions()
    assert set(SETTINGS) - PLANNED_FLAGS <= set(actions)
    assert set(actions) - COMMAND_LINE_ONLY == set(SETTINGS) - (PLANNED_FLAGS - set(actions))
    for key, action in actions.items():
        if key in COMMAND_LINE_ONLY:
            continue
        spec = SETTINGS[key]
        if key == "rules":  # each flag appends one rule (RuleFlag); the recipe holds the list
            assert spec.type is list and type(action).__name__ == "RuleFlag", key
            continue
        if action.nargs == 0:  # store_true / store_false
            assert spec.type is bool, key
        else:
            assert spec.type is (action.type or str), key
        assert tuple(sorted(action.choices or ())) == tuple(sorted(spec.choices)), key


def test_values_are_typed_and_nullable_only_where_declared():
    settings = parse_recipe({"damp_percent": 1, "device": "cuda:1", "offload": "cpu", "text_column": None,
                             "pad_intermediate_to": None}, "r.yaml").settings
    assert settings == {"damp_percent": 1.0, "device": "cuda:1", "offload": "cpu", "text_column": None,
                        "pad_intermediate_to": None}
    assert type(settings["damp_percent"]) is float
    assert parse_recipe({}, "r.yaml").tolerances == Tolerances()


@pytest.mark.parametrize("data,message", [
    ({"method": "gptq", "bitz": 4}, "recipe r.yaml: unknown key(s) ['bitz']"),
    ({"bits": 5}, "recipe r.yaml: bits must be one of [2, 3, 4, 8], got 5"),
    ({"bits": "four"}, "bits must be int, got 'four'"),
    ({"bits": 4.0}, "bits must be int, got 4.0"),
    ({"bits": True}, "bits must be int, got True"),
    ({"num_samples": None}, "num_samples must be int, got None"),
    ({"desc_act": "yes please"}, "desc_act must be true or false"),
    ({"desc_act": 1}, "desc_act must be true or false"),
    ({"damp_percent": float("nan")}, "damp_percent must be a finite number"),
    ({"model": 7}, "model must be str, got 7"),
    ({"offload": "disk"}, "offload must be one of ['auto', 'cpu', 'device']"),
    ({"overwrite": True}, "unknown key(s) ['overwrite']"),  # replacing a folder is never a recipe's decision
    (["a list"], "expected a mapping"),
    (None, "expected a mapping"),
])
def test_bad_recipes_name_the_file_and_the_key(data, message):
    with pytest.raises(ValueError) as e:
        parse_recipe(data, "r.yaml")
    assert message in str(e.value) and "r.yaml" in str(e.value)


@pytest.mark.parametrize("text,message", [
    ("method: gptq\nbitz: 4\n", "unknown key(s) ['bitz']"),
    ("bits: 5\n", "bits must be one of [2, 3, 4, 8]"),
    ("bits: four\n", "bits must be int"),
    ("desc_act: yes please\n", "desc_act must be true or false"),
    ("- a list\n", "expected a mapping"),
    ("method: [gptq\n", "cannot read recipe"),
    ("check:\n  max_drop: {easyvqq: 1}\n", "unknown task 'easyvqq'"),
])
def test_bad_recipes_named(tmp_path, text, message, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert main(["quantize", "--recipe", str(path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_demo_recipe_with_a_flag_overriding_it(tmp_path):
    recipe = pathlib.Path(__file__).parent.parent / "recipes" / "demo-gptq-int4.yaml"
    out = tmp_path / "q"
    assert main(["quantize", "--recipe", str(recipe), "--num-samples", "4", "--output", str(out)]) == 0
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["method"] == "gptq" and report["bits"] == 4 and report["calibration"]["num_samples"] == 4
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["sym"] is True and config["damp_percent"] == 0.1 and config["true_sequential"] is True


def special_file(tmp_path, kind: str) -> str:
    """/dev/zero (endless), a FIFO with no writer (open blocks) or a folder, as a recipe path."""
    if kind == "fifo":
        os.mkfifo(tmp_path / "r.yaml")
        return str(tmp_path / "r.yaml")
    return {"dev-zero": "/dev/zero", "folder": str(tmp_path)}[kind]


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "folder"])
def test_recipe_that_is_not_a_regular_file_is_refused_unread(tmp_path, capsys, deadline, kind):
    path = special_file(tmp_path, kind)
    with deadline(5):
        assert main(["quantize", "--recipe", path, "--output", str(tmp_path / "o")]) == 2
        assert main(["check", "report.json", "--recipe", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qvlquant {cmd}: error: recipe {path} is not a regular file (a FIFO, a device or a folder); give a "
                   "file" for cmd in ("quantize", "check")]


def test_recipe_over_the_cap_is_refused_unread(tmp_path):
    path = tmp_path / "r.yaml"
    with open(path, "wb") as f:
        f.truncate((1 << 20) + 1)  # sparse: the size is all that is read
    with pytest.raises(ValueError, match=rf"^recipe {path} is 1048577 bytes, over the 1 MiB cap$"):
        load_recipe(path)


def alias_bomb(levels: int) -> str:
    """A 'billion laughs' under a known key: each level an anchored list of nine aliases of the one before, so that
    printing the value (in "model must be str, got ...") writes 9**levels strings."""
    lines = ['model:', '  - &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  - &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [alias_bomb(6), alias_bomb(9), "model: &m demo\n", "a: &x 1\nmodel: *x\n"],
                         ids=["bomb-6", "bomb-9", "anchor", "alias"])
def test_yaml_anchors_and_aliases_are_refused(tmp_path, text):
    """A 0.7 KB alias bomb expands to 387 million strings when printed; a recipe needs neither anchors nor
    aliases, so both are refused before anything is built, in a short message."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"anchors and aliases .* are not allowed in a recipe") as e:
        load_recipe(path)
    assert str(path) in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("text", ["[" * 100000, "model: " + "x" * 300000 + "\nbits: [" + "9," * 100000 + "9]\n"])
def test_deep_or_long_recipes_give_short_errors(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"recipe {path}") as e:
        load_recipe(path)
    assert len(str(e.value)) < 400


@pytest.mark.parametrize("flat", [
    {}, {"method": "gptq"}, {"method": "gptq", "desc_act": True, "mse": 2.4, "num_samples": 16, "seed": 3},
    {"method": "awq", "bits": 3, "export_format": "compressed-tensors", "max_length": 512},
    {"method": "gptq", "rules": [r"layers\.0\.:skip", "mlp.down_proj:bits=8,group_size=64"], "dtype": "float32"},
    {"method": "gptq", "target_bits": 4.25, "candidate_bits": "4,8", "sensitivity": "output"},
])
def test_a_written_recipe_builds_the_same_job(flat, tmp_path):
    """What the sensitivity search writes (job_recipe, dump_recipe) loads back as the job it came from."""
    from qvlquant.config import JobConfig
    from qvlquant.recipes import dump_recipe, job_recipe

    job = JobConfig.from_flat(output="o", **flat)
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(job_recipe(job), "a comment\nover two lines"))
    assert path.read_text().startswith("# a comment\n# over two lines\n")
    assert JobConfig.from_flat(output="o", **load_recipe(path).settings) == job
