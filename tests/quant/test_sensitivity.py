import itertools
import random

import pytest
import torch

from qvlquant.quant.gptq import accumulate_hessian, hessian
from qvlquant.quant.rtn import fake_quantize
from qvlquant.quant.sensitivity import (
    choose,
    fill,
    output_energy,
    output_error,
    squared_error,
)
from qvlquant.quant.spec import QuantSpec


def inputs(seed=0, t=512, k=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.1 * torch.randn(t, k, generator=g)
    return x, torch.randn(48, k, generator=g)


def test_output_error_is_the_summed_output_error_of_rtn():
    """tr(dW H dW^T) with GPTQ's H = 2/n X^T X is twice the mean squared error of X dW^T per token."""
    x, w = inputs()
    H = hessian(*accumulate_hessian(torch.zeros(128, 128, dtype=torch.float64), 0, x, None))
    spec = QuantSpec(3, 32)
    direct = 2 / x.shape[0] * ((x @ (w - fake_quantize(w, spec)).T) ** 2).sum()
    assert output_error(w, H, spec) == pytest.approx(float(direct), rel=1e-4)
    assert output_energy(w, H) == pytest.approx(float(2 / x.shape[0] * ((x @ w.T) ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_error_falls_with_every_added_bit(seed):
    x, w = inputs(seed)
    H = 2 / x.shape[0] * x.T @ x
    errors = [output_error(w, H, QuantSpec(b, 32)) / output_energy(w, H) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0
    assert errors[1] > 3 * errors[2] > 9 * errors[3]  # each bit roughly quarters it: not a flat measure


def test_relative_errors_do_not_depend_on_a_layers_scale():
    """What makes layers comparable: inputs 10x larger and weights 10x smaller (or both larger) leave the
    relative error as it was (RTN's grid scales with the weight), where the raw tr(dW H dW^T) moves 100x."""
    x, w = inputs()
    spec = QuantSpec(4, 32)

    def rel(x, w):
        H = 2 / x.shape[0] * x.T @ x
        return output_error(w, H, spec) / output_energy(w, H)

    base = rel(x, w)
    assert rel(10 * x, w) == pytest.approx(base, rel=1e-4)
    assert rel(x, 8 * w) == pytest.approx(base, rel=1e-3)  # a power of two: the fp16 scales round alike
    H = 2 / x.shape[0] * x.T @ x
    assert output_error(w, 100 * H, spec) == pytest.approx(100 * output_error(w, H, spec), rel=1e-4)


def test_squared_error_counts_real_tokens_only():
    ref = torch.ones(2, 3, 4)
    out = ref.clone()
    out[1, 2] = 100.0  # padding
    out[0, 0] = 2.0
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert squared_error(ref, out, mask) == (4.0, 20.0)
    assert squared_error(ref, out, None)[0] == 4.0 + 4 * 99.0**2


def brute_force(options, budget):
    best = None
    for pick in itertools.product(*[range(len(g)) for g in options]):
        if sum(g[j][0] for g, j in zip(options, pick)) <= budget:
            err = sum(g[j][1] for g, j in zip(options, pick))
            best = err if best is None else min(best, err)
    return best


def random_table(rng, groups):
    """Sizes like the real candidates (3 < 4 < 8 < 16 bits times a group's weights), errors falling with size
    but not convexly."""
    table = []
    for _ in range(groups):
        weights = rng.choice([1, 2, 3, 4])
        errors = sorted((rng.random() for _ in range(3)), reverse=True) + [0.0]
        table.append([(b * weights + rng.randint(0, 2), e) for b, e in zip((3, 4, 8, 16), errors)])
    return table


@pytest.mark.parametrize("seed", range(40))
def test_choice_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    table = random_table(rng, rng.randint(1, 5))
    low, high = sum(g[0][0] for g in table), sum(g[-1][0] for g in table)
    budget = rng.randint(low, high)
    picked = choose(table, budget)
    assert sum(g[j][0] for g, j in zip(table, picked)) <= budget
    assert sum(g[j][1] for g, j in zip(table, picked)) == pytest.approx(brute_force(table, budget), abs=1e-12)


def test_choice_off_the_convex_hull():
    """A candidate under the line between its neighbours (here 5 bits for error 6, the hull gives 5 at 5 bits
    only by mixing) is what a Lagrangian sweep never picks; at a budget of 5 it is the best there is."""
    table = [[(0, 10.0), (5, 6.0), (10, 0.0)]]
    assert choose(table, 5) == [1]
    assert choose(table, 9) == [1] and choose(table, 10) == [2]


@pytest.mark.parametrize("seed", range(10))
def test_no_single_upgrade_still_fits(seed):
    """The target is met within one step: after the choice, no group can move to a larger candidate with less
    error within what is left of the budget; also when the table's sizes are rounded (few units)."""
    rng = random.Random(seed)
    table = [[(s * 1000 + rng.randint(0, 999), e) for s, e in g] for g in random_table(rng, 30)]
    low, high = sum(g[0][0] for g in table), sum(g[-1][0] for g in table)
    budget = rng.randint(low, high)
    for units in (1 << 16, 50):
        picked = choose(table, budget, max_units=units)
        used = sum(g[j][0] for g, j in zip(table, picked))
        assert used <= budget
        for g, j in zip(table, picked):
            assert not any(e < g[j][1] and 0 <= s - g[j][0] <= budget - used for s, e in g)


def test_rounded_table_stays_near_the_optimum():
    rng = random.Random(5)
    table = [[(s * 997 + rng.randint(0, 50), e) for s, e in g] for g in random_table(rng, 5)]
    budget = (sum(g[0][0] for g in table) + sum(g[-1][0] for g in table)) // 2
    exact = brute_force(table, budget)
    coarse = sum(g[j][1] for g, j in zip(table, choose(table, budget, max_units=64)))
    assert exact <= coarse <= exact + 0.5  # rounding costs at most a little of the error range (~1 per group)


def test_budget_below_the_smallest_candidates_is_an_error_naming_both():
    with pytest.raises(ValueError, match="smallest candidates take 7 bits, more than the budget of 6"):
        choose([[(3, 1.0), (4, 0.0)], [(4, 1.0)]], 6)


def test_fill_takes_the_best_drop_per_bit():
    table = [[(1, 5.0), (3, 1.0)], [(1, 5.0), (2, 2.0)]]  # 2 bits buy 4 (2 per bit), 1 bit buys 3
    assert fill(table, [0, 0], 3) == [0, 1]
    assert fill(table, [0, 0], 4) == [0, 1]  # 3 per bit first; the 1 bit left does not buy group 0's upgrade
    assert fill(table, [0, 0], 5) == [1, 1]
