"""Temperature scaling and expected calibration error, and their place in a training run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from training_job.calibration import (
    MIN_TEMPERATURE, calibration_report, expected_calibration_error, fit_temperature, negative_log_likelihood, softmax,
)
from training_job.train import Head


def test_ece_of_hand_made_answers():
    # bin (0.8, 0.867]: two photos at 0.85, one right -> |0.5 - 0.85| = 0.35, weight 1/2
    # bin (0.933, 1.0]: two photos at 1.0, both right -> 0
    probs = np.array([[0.85, 0.15], [0.85, 0.15], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels, bins=15) == pytest.approx(0.175)
    assert expected_calibration_error(np.array([[0.6, 0.4]] * 5), np.array([0, 0, 0, 1, 1])) == pytest.approx(0.0)


def test_fitted_temperature_recovers_an_overconfident_model():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(scale=2.0, size=(4000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])  # calibrated by construction
    overconfident = 3.0 * true_logits
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    report = calibration_report(overconfident, labels, temperature)
    assert report["ece_after"] < 0.03 < report["ece_before"]
    assert report["nll_after"] < report["nll_before"]
    assert fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.1)


def test_a_validation_split_answered_all_right_does_not_make_the_model_certain():
    """80 validation photos, every one right: the plain likelihood fit runs to the smallest temperature allowed
    (probabilities of 1.0 for every answer); with one error's worth of doubt the mean confidence stays near the
    rule of succession's 81 / 82."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 80)
    logits = rng.normal(scale=0.5, size=(80, 4))
    logits[np.arange(80), labels] = logits.max(axis=1) + rng.uniform(1.0, 3.0, 80)  # right, with a margin
    assert fit_temperature(logits, labels, doubt=0.0) == pytest.approx(MIN_TEMPERATURE, rel=0.01)
    temperature = fit_temperature(logits, labels)
    assert temperature > 2 * MIN_TEMPERATURE
    confidence = softmax(logits / temperature).max(axis=1).mean()
    assert 0.95 < confidence < 0.995


def test_temperature_is_folded_into_the_head_and_survives_saving(tmp_path):
    rng = np.random.default_rng(2)
    kernels = [rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)]
    head = Head(["a", "b", "c"], kernels, [rng.normal(size=5).astype(np.float32), rng.normal(size=3).astype(np.float32)])
    features = rng.normal(size=(10, 8)).astype(np.float32)
    calibrated = head.with_temperature(2.5)
    np.testing.assert_allclose(calibrated.predict(features), softmax(head.logits(features) / 2.5), atol=1e-6)
    np.testing.assert_array_equal(calibrated.predict(features).argmax(1), head.predict(features).argmax(1))
    calibrated.save(tmp_path / "head.npz")
    loaded = Head.load(tmp_path / "head.npz")
    assert loaded.temperature == pytest.approx(2.5)
    np.testing.assert_allclose(loaded.uncalibrated().predict(features), head.predict(features), atol=1e-6)
    np.savez(tmp_path / "old.npz", labels=np.array(head.labels), layers=2, kernel0=head.kernels[0],
             kernel1=head.kernels[1], bias0=head.biases[0], bias1=head.biases[1])
    assert Head.load(tmp_path / "old.npz").temperature == 1.0  # runs written before calibration still load


def test_a_run_reports_ece_before_and_after_and_serves_calibrated_probabilities(trained_run, small_dataset):
    from training_job.pipeline import load_run

    run_dir, metrics = trained_run
    calibration = metrics["calibration"]
    assert json.loads((run_dir / "metrics.json").read_text())["calibration"] == calibration
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["calibration"]["temperature"] == pytest.approx(calibration["temperature"])
    _, _, head, _ = load_run(run_dir)
    assert head.temperature == pytest.approx(calibration["temperature"]) and head.temperature != 1.0
    for split in ("validation", "test"):
        assert 0 <= calibration[split]["ece_after"] <= 1 and 0 <= calibration[split]["ece_before"] <= 1
    validation = calibration["validation"]
    assert validation["nll_after"] <= validation["nll_before"] + 1e-9  # what the temperature was fitted to
    assert negative_log_likelihood(np.zeros((2, 2)), np.array([0, 1])) == pytest.approx(np.log(2))
