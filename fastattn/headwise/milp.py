"""Choose each head's method: minimise latency under DiTFastAttnV2's error budget.

For one layer at one step, with RSE r[h, m] of method m on head h and latency t[m]:

    minimise   sum_h t[m_h]
    subject to sum_h r[h, m_h] <= delta           (the layer's budget)
               r[h, m_h] <= (c / n) * delta        (no head takes more than its share; n heads; c = None:
                                       no such constraint, the V2 ablation's "no constraint" row)

solved exactly as a 0/1 integer program with ``scipy.optimize.milp`` (HiGHS). ``full`` has
r = 0, so the all-full choice is always feasible. When every head's own fastest admissible
method already fits the layer's budget that choice is optimal and the solver is not called
(the search decides thousands of layers; most are this case). ``greedy_head_methods`` is the
per-head greedy baseline the tests compare against.
"""

from __future__ import annotations

import math

import numpy as np


def _check(rse, latency, delta, coefficient):
    """The arrays, and each head's RSE cap: (c / n) * delta, or delta (the layer's) for c = None."""
    rse, latency = np.asarray(rse, dtype=float), np.asarray(latency, dtype=float)
    if rse.ndim != 2 or latency.shape != (rse.shape[1],):
        raise ValueError(f"rse must be [heads, methods] and latency [methods], got {rse.shape} and {latency.shape}")
    if not delta >= 0 or (coefficient is not None and not coefficient > 0):
        raise ValueError(f"threshold must be >= 0 and the head coefficient > 0 or None, got {delta} and {coefficient}")
    per_head = delta if coefficient is None else coefficient / rse.shape[0] * delta
    return rse, latency, per_head


def choose_head_methods(rse, latency, delta: float, coefficient: float | None = 1.5, fallback: int = 0) -> list[int]:
    """Index of the chosen method per head. NaN/inf RSE marks a method unavailable for a head
    (e.g. no cache yet). ``fallback`` is the always-feasible zero-error method (full)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    rse, latency, per_head = _check(rse, latency, delta, coefficient)
    heads, methods = rse.shape
    allowed = np.isfinite(rse) & (rse <= per_head + 1e-12)
    allowed[:, fallback] = True
    r = np.where(allowed, np.nan_to_num(rse, nan=0.0, posinf=0.0), 0.0)
    # tie-break equal latencies towards the smaller error without changing the optimum
    span = max(latency.max() - latency.min(), 1.0)
    cost = np.tile(latency, heads) + 1e-6 * span * r.ravel() / max(delta, 1e-12)
    own = np.where(allowed, cost.reshape(heads, methods), np.inf).argmin(1)  # each head's best alone
    if r[np.arange(heads), own].sum() <= delta:
        return [int(m) for m in own]
    one_per_head = np.kron(np.eye(heads), np.ones(methods))
    constraints = [LinearConstraint(one_per_head, 1, 1), LinearConstraint(r.ravel()[None, :], -np.inf, delta)]
    result = milp(cost, integrality=np.ones(heads * methods), bounds=Bounds(0, allowed.ravel().astype(float)),
                  constraints=constraints)
    if result.x is None:  # cannot happen with a zero-error fallback; stay safe
        return [fallback] * heads
    return [int(i) for i in np.round(result.x).reshape(heads, methods).argmax(1)]


def greedy_head_methods(rse, latency, delta: float, coefficient: float | None = 1.5, fallback: int = 0) -> list[int]:
    """Heads in order, each takes its fastest method that fits the per-head and remaining budget."""
    rse, latency, per_head = _check(rse, latency, delta, coefficient)
    heads = rse.shape[0]
    used, chosen = 0.0, []
    for h in range(heads):
        pick = fallback
        for m in np.argsort(latency, kind="stable"):
            r = rse[h, m]
            if m == fallback or (math.isfinite(r) and r <= per_head and used + r <= delta):
                pick = int(m)
                break
        used += 0.0 if pick == fallback else float(rse[h, pick])
        chosen.append(pick)
    return chosen


def choice_cost(choice, rse, latency) -> tuple[float, float]:
    """(total latency, total RSE) of a choice."""
    rse, latency = np.asarray(rse, dtype=float), np.asarray(latency, dtype=float)
    return float(sum(latency[m] for m in choice)), float(sum(rse[h, m] for h, m in enumerate(choice)))
