"""The per-layer RSE metric and the per-head integer program of DiTFastAttnV2."""

import itertools

import numpy as np
import pytest
import torch

from fastattn.headwise.milp import choice_cost, choose_head_methods, greedy_head_methods
from fastattn.headwise.rse import relative_squared_error, relative_squared_errors


def test_rse_is_per_head_squared_error_over_variance():
    ref = torch.randn(2, 3, 10, 4)
    assert torch.equal(relative_squared_error(ref, ref), torch.zeros(3))
    # predicting each head's mean gives exactly 1
    mean = ref.mean(dim=(0, 2, 3), keepdim=True).expand_as(ref)
    torch.testing.assert_close(relative_squared_error(mean, ref), torch.ones(3))
    out = ref.clone()
    out[:, 1] += 0.5
    r = relative_squared_error(out, ref)
    assert r[0] == 0 and r[2] == 0
    want = (0.25 * ref[:, 1].numel()) / ((ref[:, 1] - ref[:, 1].mean()) ** 2).sum()
    torch.testing.assert_close(r[1], want)
    with pytest.raises(ValueError, match="equal shapes"):
        relative_squared_error(ref, ref[:, :2])


def test_rse_of_many_outputs_in_bf16_matches_float64():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 4, 64, 8, generator=g)
    outs = [ref + 0.1 * torch.randn(ref.shape, generator=g), torch.zeros_like(ref), ref]
    want = torch.stack([((o.double() - ref.double()) ** 2).sum((0, 2, 3))
                        / ((ref.double() - ref.double().mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3))
                        for o in outs], 1)
    torch.testing.assert_close(relative_squared_errors(outs, ref).double(), want, atol=1e-6, rtol=1e-5)
    got = relative_squared_errors([o.bfloat16() for o in outs], ref.bfloat16()).double()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)  # bf16 inputs, float32 sums
    assert relative_squared_errors(outs, ref).shape == (4, 3)


def satisfies(choice, rse, delta, c):
    n = len(choice)
    per = [rse[h, m] for h, m in enumerate(choice)]
    return sum(per) <= delta + 1e-9 and all(r <= c / n * delta + 1e-9 for r in per)


def test_milp_beats_greedy_on_a_constructed_case():
    # methods: full (latency 1), arrow (0.5), cache (0); delta 1, c 1.5 -> each head <= 0.75.
    # Greedy gives head 0 its cheapest method (cache, 0.75 of the budget) and head 1 must stay full;
    # the optimum is arrow on head 0 (error 0) and cache on head 1.
    rse = np.array([[0.0, 0.0, 0.75], [0.0, 0.3, 0.3]])
    latency = np.array([1.0, 0.5, 0.0])
    greedy = greedy_head_methods(rse, latency, 1.0, 1.5)
    best = choose_head_methods(rse, latency, 1.0, 1.5)
    assert greedy == [2, 0] and best == [1, 2]
    assert satisfies(best, rse, 1.0, 1.5) and satisfies(greedy, rse, 1.0, 1.5)
    assert choice_cost(best, rse, latency)[0] < choice_cost(greedy, rse, latency)[0]


@pytest.mark.parametrize("seed", range(6))
def test_milp_is_the_feasible_optimum(seed):
    rng = np.random.default_rng(seed)
    heads, methods = int(rng.integers(1, 5)), 4
    rse = np.concatenate([np.zeros((heads, 1)), rng.uniform(0, 0.6, (heads, methods - 1))], 1)
    rse[0, -1] = np.nan  # an unavailable candidate (a cache before the first step)
    latency = np.array([1.0, 0.4, 0.2, 0.0])
    delta, c = 0.5, 1.5
    chosen = choose_head_methods(rse, latency, delta, c)
    assert not np.isnan(rse[0, chosen[0]])
    assert satisfies(chosen, rse, delta, c)
    feasible = [ch for ch in itertools.product(range(methods), repeat=heads)
                if not any(np.isnan(rse[h, m]) for h, m in enumerate(ch)) and satisfies(ch, rse, delta, c)]
    best = min(choice_cost(ch, rse, latency)[0] for ch in feasible)
    assert choice_cost(chosen, rse, latency)[0] == pytest.approx(best)
    greedy = greedy_head_methods(rse, latency, delta, c)
    assert choice_cost(chosen, rse, latency)[0] <= choice_cost(greedy, rse, latency)[0]


def test_the_solver_is_skipped_when_each_heads_own_best_fits(monkeypatch):
    import scipy.optimize

    calls = []
    real = scipy.optimize.milp
    monkeypatch.setattr(scipy.optimize, "milp", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    latency = np.array([1.0, 0.4, 0.4, 0.0])
    rse = np.array([[0.0, 0.05, 0.01, 0.1], [0.0, 0.02, 0.03, 0.5], [0.0, 0.0, 0.0, np.nan]])
    # head 0: cache fits alone (0.1 <= 1.5/3 * 0.4); head 1: cache is over its share -> arrow with the
    # smaller error at equal latency; head 2: no cache -> the smaller-error arrow; 0.1+0.02 <= 0.4
    assert choose_head_methods(rse, latency, 0.4, 1.5) == [3, 1, 1] and calls == []
    rse[0, 3] = rse[1, 1] = rse[1, 2] = 0.19  # each within its share (0.2), over the budget together
    rse[2, 1] = rse[2, 2] = 0.05
    chosen = choose_head_methods(rse, latency, 0.4, 1.5)
    assert calls and satisfies(chosen, rse, 0.4, 1.5)


def test_zero_budget_keeps_every_head_full():
    rse = np.array([[0.0, 0.1], [0.0, 0.2]])
    assert choose_head_methods(rse, [1.0, 0.0], 0.0) == [0, 0]


def test_bad_shapes_and_budgets():
    with pytest.raises(ValueError, match="rse must be"):
        choose_head_methods(np.zeros((2, 3)), [1.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="threshold"):
        choose_head_methods(np.zeros((2, 2)), [1.0, 0.0], -1.0)


def test_no_head_constraint_lets_one_head_take_the_whole_budget():
    # two heads, methods [full, cheap]; the cheap method costs head 0 the whole budget
    rse, latency = [[0.0, 0.9], [0.0, 2.0]], [1.0, 0.1]
    assert choose_head_methods(rse, latency, delta=1.0, coefficient=1.5) == [0, 0]  # 0.9 > (1.5 / 2) x 1.0
    assert choose_head_methods(rse, latency, delta=1.0, coefficient=None) == [1, 0]
    assert greedy_head_methods(rse, latency, delta=1.0, coefficient=None) == [1, 0]
    with pytest.raises(ValueError, match="head coefficient > 0 or None"):
        choose_head_methods(rse, latency, delta=1.0, coefficient=0)
