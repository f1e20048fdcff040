"""Temperature scaling, so the head's ``probabilities`` mean what they say, and the expected calibration error.

One scalar ``T`` divides the head's logits; it is fitted on the validation split by minimising the negative
log-likelihood (a convex problem in ``1 / T``), which never changes which class ranks first. The trained head keeps
the fitted ``T`` folded into its last layer (``Head.with_temperature``), so the exported SavedModel and TFLite files
serve calibrated probabilities without any change to the graph.

Expected calibration error (ECE): photos are binned by their top probability into ``bins`` equal-width bins; ECE is
the photo-weighted mean over bins of |accuracy - mean top probability|.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_BINS = 15
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 100) -> float:
    """The ``T`` in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the validation NLL of ``softmax(logits / T)``
    (golden-section search on log T; the NLL is unimodal in T). 1.0 when there is nothing to fit on."""
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        return 1.0
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, math.exp(log_t))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
        if hi - lo < 1e-6:
            break
    return float(math.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # bin i holds confidences in (i / bins, (i + 1) / bins]; a confidence of exactly 0 goes to bin 0
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for i in range(bins):
        members = index == i
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def calibration_report(uncalibrated_logits: np.ndarray, labels: np.ndarray, temperature: float,
                       bins: int = DEFAULT_BINS) -> dict:
    """ECE and NLL of one split before and after dividing the logits by ``temperature``."""
    before = softmax(uncalibrated_logits.astype(np.float64))
    after = softmax(uncalibrated_logits.astype(np.float64) / temperature)
    return {
        "ece_before": expected_calibration_error(before, labels, bins),
        "ece_after": expected_calibration_error(after, labels, bins),
        "nll_before": negative_log_likelihood(uncalibrated_logits, labels),
        "nll_after": negative_log_likelihood(uncalibrated_logits, labels, temperature),
        "photos": int(len(labels)),
    }
