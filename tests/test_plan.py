import itertools

import numpy as np
import pytest

from tba_fed import Span, TBAInputError, parse_plan, select_plan


def test_parse_paper_notation():
    plan = parse_plan("4->5, 1 -> 2", 12)
    assert plan.spans == (Span(1, 2), Span(4, 5))
    assert str(plan) == "1->2, 4->5" and plan.removed_blocks == [2, 5]
    assert parse_plan("2→5", 12).spans == (Span(2, 5),)


@pytest.mark.parametrize("text,match", [
    ("1->12", "0 <= s < e <= 11"),
    ("-1->2", "0 <= s < e"),
    ("3->3", "0 <= s < e"),
    ("5->2", "0 <= s < e"),
    ("1->4, 3->6", "overlap"),
    ("1->2, 2->3", "merge them into 1->3"),
    ("1-2", "cannot read span"),
    ("", "cannot read"),
])
def test_parse_rejects_bad_plans(text, match):
    with pytest.raises(TBAInputError, match=match) as err:
        parse_plan(text, 12)
    assert err.value.field == "plan"


def _brute_force(cost, k):
    n = cost.shape[0]
    spans = [(s, e) for s in range(n) for e in range(s + 1, n)]
    best = (np.inf, None)
    for r in range(1, k + 1):
        for combo in itertools.combinations(spans, r):
            ordered = sorted(combo)
            if sum(e - s for s, e in ordered) != k:
                continue
            if any(b[0] <= a[1] for a, b in zip(ordered, ordered[1:])):
                continue
            total = sum(cost[s, e] for s, e in ordered)
            if total < best[0]:
                best = (total, ordered)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dynamic_programme_is_exact(seed, k):
    rng = np.random.default_rng(seed)
    n = 7
    cost = rng.random((n, n)) * (1 + np.abs(np.subtract.outer(np.arange(n), np.arange(n))))
    plan = select_plan(cost, blocks=k)
    best_cost, _ = _brute_force(cost, k)
    assert sum(e - s for s, e in ((sp.start, sp.end) for sp in plan.spans)) == k
    assert sum(cost[sp.start, sp.end] for sp in plan.spans) == pytest.approx(best_cost)
    parse_plan(str(plan), n)  # the chosen plan is valid


def test_greedy_would_fail_but_dp_does_not():
    cost = np.full((6, 6), 10.0)
    cost[1, 2] = 0.1  # cheapest single span, but it blocks the best pair
    cost[0, 1], cost[2, 3] = 0.15, 0.15
    cost[3, 4] = 5.0
    plan = select_plan(cost, blocks=2)
    assert str(plan) == "0->1, 2->3"


def test_parameter_budget():
    cost = np.random.default_rng(0).random((12, 12))
    block, d_map = 1_774_464, 147_840
    plan = select_plan(cost, params=3_000_000, block_params=block, map_params=d_map)
    removed = len(plan.removed_blocks) * block - len(plan.spans) * d_map
    assert removed >= 3_000_000
    with pytest.raises(TBAInputError, match="budget"):
        select_plan(cost, params=10**12, block_params=block, map_params=d_map)
    with pytest.raises(TBAInputError, match="exactly one"):
        select_plan(cost)
