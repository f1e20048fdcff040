"""bench/open_set_rates.py: the threshold is the validation quantile, and every set is measured against it."""
import numpy as np

from bench.open_set_rates import rates_at


def test_each_set_is_rejected_below_the_validation_quantile():
    scores = {"validation": np.linspace(0.5, 1.0, 101), "test": np.array([0.4, 0.6, 0.9, 0.95]),
              "not_mushrooms": np.array([0.1, 0.2, 0.52])}
    row = rates_at(scores, 0.1)
    assert abs(row["threshold"] - 0.55) < 1e-9
    assert abs(row["validation"] - 10 / 101) < 1e-9
    assert (row["test"], row["not_mushrooms"]) == (0.25, 1.0)
