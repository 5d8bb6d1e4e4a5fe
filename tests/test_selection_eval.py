"""The folds and permutations that benchmarks/selection_eval.py judges the predictor with."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from benchmarks import predictor_eval, selection_eval

TASKS = ("a", "b", "c", "d", "e")
SEEDS = (0, 1)


@pytest.fixture
def pairs() -> pd.DataFrame:
    """Every cross-task directed pair of five tasks with two seeds each (80 pairs); the
    target numbers each pair, so a permuted target says where it came from."""
    rows = [
        {"self_task": a, "self_seed": sa, "other_task": b, "other_seed": sb}
        for a, sa, b, sb in itertools.product(TASKS, SEEDS, TASKS, SEEDS)
        if a != b
    ]
    frame = pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    frame["p05_head_interference_room"] = rng.uniform(0.01, 1.0, len(frame))
    frame["target"] = np.arange(len(frame), dtype=float)
    return frame


def test_run_permutation_moves_whole_runs_to_cross_task_pairs(pairs):
    y = pairs.target.to_numpy()
    permuted = selection_eval.run_permutation(pairs, y, np.random.default_rng(3))
    assert sorted(permuted) == sorted(y)  # a permutation of the measured values
    source = pairs.iloc[permuted.astype(int)].reset_index(drop=True)
    # every pair of one run takes its target from pairs of one other run, and the partner
    # run is mapped the same way whichever run it is paired with
    own = {}
    partner = {}
    for row, src in zip(pairs.itertuples(), source.itertuples(), strict=True):
        assert src.self_task != src.other_task
        own.setdefault((row.self_task, row.self_seed), set()).add((src.self_task, src.self_seed))
        partner.setdefault((row.other_task, row.other_seed), set()).add(
            (src.other_task, src.other_seed)
        )
    assert all(len(v) == 1 for v in own.values())
    assert all(len(v) == 1 for v in partner.values())
    assert {k: v for k, v in own.items()} == {k: v for k, v in partner.items()}


def test_leave_both_out_never_trains_on_either_task_of_the_held_out_pairs(pairs, monkeypatch):
    seen = []
    original = predictor_eval.RetentionPredictor.fit

    def spy(self, X, y, groups=None):
        seen.append(set(pairs.self_task[X.index]) | set(pairs.other_task[X.index]))
        return original(self, X, y, groups=groups)

    monkeypatch.setattr(predictor_eval.RetentionPredictor, "fit", spy)
    s = pairs.p05_head_interference_room.to_numpy()
    y = 1 - 0.2 * s  # exactly the damage model with power 1
    pred = predictor_eval.leave_both_out(
        pairs, ["p05_head_interference_room"], y, "damage", power=1.0
    )
    assert len(seen) == len(TASKS) * (len(TASKS) - 1) // 2
    held_out = [set(p) for p in itertools.combinations(TASKS, 2)]
    assert all(not (trained & out) for trained, out in zip(seen, held_out, strict=True))
    np.testing.assert_allclose(pred, y, atol=1e-6)


def test_within_task_is_the_mean_of_each_tasks_spearman():
    groups = np.array(["a"] * 4 + ["b"] * 4)
    y = np.array([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0])  # +1 in a, -1 in b
    assert selection_eval.within_task(pred, y, groups) == pytest.approx(0.0)
    pred[4:] = pred[4:][::-1]
    assert selection_eval.within_task(pred, y, groups) == pytest.approx(1.0)
