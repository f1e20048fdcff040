"""bench/open_set_rates.py: the threshold is the quantile of the training and validation photos' scores, as the
training job sets it, and every set is measured against it."""
import numpy as np

from bench.open_set_rates import rates_at


def test_each_set_is_rejected_below_the_quantile_of_the_training_and_validation_scores():
    scores = {"train": np.linspace(0.5, 1.0, 91), "validation": np.linspace(0.8, 1.0, 10),  # alone: 0.82
              "test": np.array([0.4, 0.6, 0.9, 0.95]), "not_mushrooms": np.array([0.1, 0.2, 0.52])}
    row = rates_at(scores, 0.1)
    pooled = np.concatenate([scores["train"], scores["validation"]])
    assert abs(row["threshold"] - np.quantile(pooled, 0.1)) < 1e-9 and 0.53 < row["threshold"] < 0.56
    assert abs(row["train"] - np.mean(scores["train"] < row["threshold"])) < 1e-9
    assert (row["validation"], row["test"], row["not_mushrooms"]) == (0.0, 0.25, 1.0)
