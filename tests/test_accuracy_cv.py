"""The cross-validation bench's arithmetic: folds partition the photos, paired differences carry a t interval."""
import numpy as np
import pytest

from bench.accuracy_cv import balanced_accuracy, fold_rows, paired_difference
from training_job.dataset import ManifestRow


def test_folds_partition_the_photos_and_validation_comes_from_the_rest():
    rows = [ManifestRow(f"p{i}.jpg", "a", f"{i:064x}", "train", 10, 10, 100) for i in range(200)]
    folds = np.array_split(np.random.default_rng(0).permutation(len(rows)), 5)
    tests = []
    for k in range(5):
        split = [r.split for r in fold_rows(rows, folds, k)]
        assert split.count("test") == 40 and split.count("validation") == 80 and split.count("train") == 80
        tests.append({i for i, s in enumerate(split) if s == "test"})
    assert set().union(*tests) == set(range(200)) and sum(len(t) for t in tests) == 200


def test_paired_difference_uses_the_t_quantile_of_the_fold_count():
    diff = paired_difference([0.93, 0.92, 0.94, 0.95, 0.91], [0.91, 0.90, 0.93, 0.92, 0.90])
    se = np.std([0.02, 0.02, 0.01, 0.03, 0.01], ddof=1) / np.sqrt(5)
    assert diff["mean"] == pytest.approx(0.018) and diff["standard_error"] == pytest.approx(se, abs=1e-4)
    assert diff["ci95"] == pytest.approx([0.018 - 2.776 * se, 0.018 + 2.776 * se], abs=1e-4)
    assert balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx((2 / 3 + 1) / 2)
