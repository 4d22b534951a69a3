"""benchmarks/mixed_precision.py --gptqmodel, checked in qvlquant's venv without GPTQModel's: the hand rule handed to
GPTQModel as its ``dynamic`` selects, the way GPTQModel matches (from the start of a name), exactly the linears
qvlquant's plan gives 8 bits; the peer run's arguments are qvlquant's GPTQ defaults; what GPTQModel saved is checked
linear by linear against the plan; the verdicts compare the right rows."""

import importlib.util
import pathlib
import re
import sys

import pytest

from qvlquant.quant.formats import PackFormat
from qvlquant.quant.rules import packed_bits

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mp = _script("mixed_precision")
bench_peers = _script("bench_peers")


@pytest.fixture(scope="module")
def demo():
    return mp.Bench("demo")


def test_hand_rule_as_dynamic_selects_what_qvlquants_plan_widens(demo):
    hand = demo.hand_rule()
    dynamic = mp.gptqmodel_dynamic(demo, hand)
    assert dynamic and all(k.startswith("+:") and v == {"bits": 8, "group_size": 128, "sym": True}
                           for k, v in dynamic.items())  # no desc_act: the job's act-order stays on
    plan = demo.modules(hand)
    last = demo.layers - 1
    for name, _, _ in demo.linears:
        # GPTQModel: the first key whose regex matches from the start of the name (re.match, its pcre module)
        hit = next((v for k, v in dynamic.items() if re.match(k[2:], name)), None)
        assert (hit or {}).get("bits", 4) == plan.config_for(name).spec.bits, name
        assert (hit is not None) == (".layers.0." in name or f".layers.{last}." in name), name
    assert mp.gptqmodel_dynamic(demo, ()) == {}


def test_peer_run_is_qvlquants_gptq_defaults(demo):
    extra = bench_peers.PEER_RUNS[mp.PEER_RUN][2]
    mp.check_peer_settings(demo, extra, (4, 8))
    for changed in (["--damp", "0.1", "--actorder", "static"], ["--damp", "0.01", "--actorder", "none"],
                    extra + ["--mse", "2.4"]):
        with pytest.raises(SystemExit, match="qvlquant's GPTQ at 4 bits"):
            mp.check_peer_settings(demo, changed, (4, 8))
    with pytest.raises(SystemExit, match="at 3 bits"):  # qvlquant's mse range search is on below 4 bits
        mp.check_peer_settings(demo, extra, (3,))


def _saved(demo, rules, wrong: str | None = None, bits_of_wrong: int = 4) -> dict:
    """A GPTQModel meta.json's ``packed`` as run_gptqmodel writes it, each linear at the plan's width."""
    plan = demo.modules(rules)
    packed = {}
    for name, k, n in demo.linears:
        spec = plan.config_for(name).spec
        if name == wrong:
            spec = type(spec)(bits_of_wrong, spec.group_size, spec.sym)
        packed[name] = {"bits": spec.bits, "groups": spec.groups(k), "in_features": k, "out_features": n,
                        "packed_bits": packed_bits(PackFormat.GPTQ, spec, k, n),
                        "key": name.replace("language_model.", "")}
    return {"packed": packed}


def test_applied_widths_are_the_plans_or_an_error_naming_the_linear(demo):
    hand = demo.hand_rule()
    got = mp.applied_widths(demo, hand, 4, _saved(demo, hand))
    assert got["bits_per_weight"] == pytest.approx(demo.size(hand)["bits_per_weight"], rel=1e-12)
    assert got["mib"] == pytest.approx(demo.size(hand)["mib"], rel=1e-12)
    assert sorted(set(got["widths"].values())) == [4, 8]
    first = demo.linears[0][0]
    with pytest.raises(SystemExit, match=rf"{re.escape(first)}: GPTQModel saved \(bits, groups, in, out\) \(4,"):
        mp.applied_widths(demo, hand, 4, _saved(demo, hand, wrong=first))  # GPTQModel ignored the rule there
    saved = _saved(demo, ())
    del saved["packed"][first]
    with pytest.raises(SystemExit, match=f"{re.escape(first)}: not among GPTQModel's quantized linears"):
        mp.applied_widths(demo, (), 4, saved)


def test_verdicts_compare_the_peer_with_the_same_rule_and_the_search_with_the_peer():
    def rows(variant, values, **extra):
        return [dict(model="m", variant=variant, seed=i, perplexity=v, bits_per_weight=6.0, mib=1.0, **extra)
                for i, v in enumerate(values)]

    summary = {r["variant"]: r for r in mp.summarise(
        rows(mp.HAND, [34.0, 34.01, 33.99]) + rows(f"{mp.PEER}: {mp.HAND}", [34.05, 34.06, 34.04], mirrors=mp.HAND)
        + rows("search (output) at hand rule's size", [34.03, 34.04, 34.02]))}
    peer = summary[f"{mp.PEER}: {mp.HAND}"]
    assert peer["vs_qvlquant"] == peer["vs_hand_rule"] == "worse"
    search = summary["search (output) at hand rule's size"]
    assert search["vs_hand_rule"] == "worse" and search["vs_peer_hand_rule"] == "better"
    assert "vs_qvlquant" not in summary[mp.HAND] and "vs_peer_hand_rule" not in summary[mp.HAND]
    table = mp.fmt_table(list(summary.values()))
    assert "| vs qvlquant | vs GPTQModel hand rule |" in table
    assert "vs qvlquant" not in mp.fmt_table([summary[mp.HAND]])  # the table without peers is unchanged
