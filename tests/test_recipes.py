import argparse
import json
import os
import pathlib

import pytest

from qvlquant.cli import add_quantize, main, recipe_defaults
from qvlquant.eval.check import Tolerances
from qvlquant.recipes import COMMAND_LINE_ONLY, SETTINGS, load_recipe, parse_recipe

ROOT = pathlib.Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# Settings a recipe may hold before the quantize command has the flag (the streaming work adds them).
PLANNED_FLAGS = {"device", "offload"}


def quantize_actions() -> dict:
    """dest -> argparse action of the quantize flags (argparse's private list: only this cross-check reads it)."""
    sub = argparse.ArgumentParser().add_subparsers()
    add_quantize(sub)
    actions = {a.dest: a for a in sub.choices["quantize"]._actions if a.dest != "help"}
    actions["rules"] = actions.pop("cli_rules")  # --override / --ignore: a recipe's rules list
    return actions


# The Qwen3.5 / Qwen3.6 and Qwen3-VL-MoE checkpoints whose published settings were found (recipes/make_recipes.py
# PUBLISHED) and their families; rules are checked against a tiny model of the family.
HYBRID_RECIPES = {"qwen3.5-27b-gptq-int4": "qwen3_5", "qwen3.5-35b-a3b-gptq-int4": "qwen3_5_moe",
                  "qwen3.5-27b-fp8": "qwen3_5", "qwen3.6-27b-fp8": "qwen3_5", "qwen3.5-35b-a3b-fp8": "qwen3_5_moe",
                  "qwen3.6-35b-a3b-fp8": "qwen3_5_moe", "qwen3.5-397b-a17b-fp8": "qwen3_5_moe",
                  "qwen3-vl-235b-a22b-thinking-fp8": "qwen3_vl_moe", "qwen3-vl-30b-a3b-thinking-fp8": "qwen3_vl_moe"}


def test_every_published_checkpoint_has_a_recipe():
    names = {p.stem for p in RECIPES}
    for family, sizes in {"qwen2-vl": ["2b", "7b", "72b"], "qwen2.5-vl": ["3b", "7b", "72b"], "qwen3-vl": ["2b", "8b"]}.items():
        for size in sizes:
            for method in ("gptq-int4", "gptq-int8", "awq"):
                assert f"{family}-{size}-instruct-{method}" in names
    assert set(HYBRID_RECIPES) <= names


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
        assert values["sym"] is True and values["desc_act"] is False
        # Qwen2-VL's published damping; the Qwen3.5 checkpoints' was not found, so their recipes leave it unset
        assert values.get("damp_percent") == (None if path.stem in HYBRID_RECIPES else 0.1)
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


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds_a_job(path):
    from qvlquant.config import JobConfig

    settings = load_recipe(path).settings
    # a recipe of a hub model leaves the calibration data to the command line (its comment says so)
    given = {} if "scheme" in settings or "calib" in settings else {"calib": "my_chats.jsonl"}
    job = JobConfig.from_flat(output="-", **settings, **given)
    assert job.model == settings["model"] and job.scheme == settings.get("scheme")
    assert [r.to_dict() for r in job.rules] == [r.to_dict() for r in settings.get("rules", ())]
    if job.scheme is None:
        assert (job.quant.method, job.quant.spec.bits) == (settings["method"], settings["bits"])


def hybrid_plan(stem: str, model_type: str | None = None):
    """The recipe ``stem``'s job and its rules resolved against every quantizable linear of a tiny model of its
    family (``model_type``, by default HYBRID_RECIPES'; a meta skeleton, as quantize builds it), fused groups
    checked. -> (job, plan, linear names)."""
    import tiny_models
    import torch

    from qvlquant.config import JobConfig
    from qvlquant.engine.loop import decoder_linears, fused_groups
    from qvlquant.engine.skeleton import build_skeleton
    from qvlquant.families import family_for
    from qvlquant.quant.rules import ModulePlan

    model_type = model_type or HYBRID_RECIPES[stem]
    config = getattr(tiny_models, f"{model_type}_config")()
    family = family_for(model_type).bind(config)
    skeleton = build_skeleton(config, family, torch.float32)
    names = [name for name, _, _ in decoder_linears(skeleton, family)]
    settings = load_recipe(ROOT / "recipes" / f"{stem}.yaml").settings
    job = JobConfig.from_flat(output="-", **settings, **({} if "scheme" in settings else {"calib": "my_chats.jsonl"}))
    groups = fused_groups(family, len(skeleton.get_submodule(family.decoder_layers)))
    return job, ModulePlan.resolve(job.rules, job.quant, names, groups), names


@pytest.mark.parametrize("stem", [s for s in HYBRID_RECIPES if "gptq" in s])
def test_qwen3_5_gptq_recipes_keep_what_qwen_keeps_in_16_bit(stem):
    """Qwen's GPTQ-Int4 checkpoints quantize only the MLPs / routed experts (dynamic "-:.*attn.*",
    "-:.*shared_expert.*"): on a tiny model of the family every rule matches linears (the rules checker refuses one
    that matches none), every attention and shared-expert linear is skipped, and every other one is W4 g128."""
    job, plan, names = hybrid_plan(stem)
    skipped = {n for n in names if plan.config_for(n) is None}
    assert skipped == {n for n in names if "attn." in n or "shared_expert." in n}
    assert any(".linear_attn." in n for n in skipped) and any(".self_attn." in n for n in skipped)
    kept = [n for n in names if n not in skipped]
    assert kept and all(".mlp." in n for n in kept) and {plan.config_for(n) for n in kept} == {job.quant}
    if HYBRID_RECIPES[stem] == "qwen3_5_moe":
        assert any(".shared_expert." in n for n in skipped) and all(".experts." in n for n in kept)


def test_a_rule_that_matches_no_linear_of_the_model_is_refused():
    """The check the test above relies on: the MoE recipe's shared-expert rule on a dense Qwen3.5 matches nothing."""
    with pytest.raises(ValueError, match=r"shared_expert.*matches no quantizable linear"):
        hybrid_plan("qwen3.5-35b-a3b-gptq-int4", "qwen3_5")


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
