"""bench/fine_tune_step_bench.py: settings alternate in reversed order every other round, each figure is per step, and
the ratios are to the first setting's medians."""
from __future__ import annotations

import pytest

from bench.fine_tune_step_bench import step_times, summary


def test_settings_alternate_and_each_figure_is_per_step():
    ran, now = [], [0.0]
    cost = {"frozen_0": 2.0, "frozen_3": 1.2}

    def step_of(name):
        def step():
            ran.append(name)
            now[0] += cost[name]
        return step

    clock = lambda: now[0]  # noqa: E731 - wall and CPU alike here
    times = step_times({name: step_of(name) for name in cost}, rounds=4, steps_per_round=3, clocks=(clock, clock))
    # round order a b, b a, a b, b a: each round runs one setting's steps together
    rounds = [ran[i:i + 3] for i in range(0, len(ran), 3)]
    assert [r[0] for r in rounds] == ["frozen_0", "frozen_3", "frozen_3", "frozen_0"] * 2
    assert all(len(set(r)) == 1 for r in rounds)
    assert times == {
        "frozen_0": [pytest.approx((2.0, 2.0))] * 4, "frozen_3": [pytest.approx((1.2, 1.2))] * 4}


def test_ratios_are_to_the_first_settings_medians():
    rows = summary({"frozen_0": [(2.0, 3.0), (2.4, 2.6), (9.0, 9.0)], "frozen_3": [(1.2, 2.1), (1.3, 2.2), (1.1, 2.0)]})
    assert rows["frozen_0"]["wall_ratio"] == 1.0 and rows["frozen_0"]["wall_s"] == 2.4  # a disturbed round is outvoted
    assert rows["frozen_3"]["wall_ratio"] == pytest.approx(1.2 / 2.4)
    assert rows["frozen_3"]["cpu_ratio"] == pytest.approx(2.1 / 3.0)
