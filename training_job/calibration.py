"""Temperature scaling, so the head's ``probabilities`` mean what they say, and the expected calibration error.

One scalar ``T`` divides the head's logits; it is fitted on the validation split by minimising the negative
log-likelihood (a convex problem in ``1 / T``), which never changes which class ranks first. A validation split the
model gets entirely right says only that its error rate is small, not that it is zero, yet its likelihood keeps
growing as ``T`` shrinks: the fit would make the model as confident as the bounds allow. So the fit counts one
error's worth of doubt (the rule of succession: after n right answers out of n, expect the next to be wrong with
probability 1 / (n + 2)): each photo's target is its label with weight 1 - 1 / (n + 2), the rest spread evenly over
the classes. It leans every fit towards less confidence by that much, errors or not; bench/calibration_doubt.py
measures what it does to the test folds' calibration.

The trained head keeps the fitted ``T`` folded into its last layer (``Head.with_temperature``), so the exported
SavedModel and TFLite files serve calibrated probabilities without any change to the graph.

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
    return cross_entropy(logits, labels, temperature, 0.0)


def cross_entropy(logits: np.ndarray, labels: np.ndarray, temperature: float, doubt: float) -> float:
    """Mean cross-entropy of ``softmax(logits / temperature)`` against targets that put ``1 - doubt`` on the label
    and ``doubt`` evenly over every class (``doubt`` 0: the negative log-likelihood)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-((1 - doubt) * log_probs[np.arange(len(labels)), labels] + doubt * log_probs.mean(axis=1)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 100,
                    doubt: float | None = None) -> float:
    """The ``T`` in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the cross-entropy of ``softmax(logits / T)``
    against the labels with one error's worth of doubt (1 / (n + 2) spread over the classes; the module's
    docstring says why; ``doubt`` 0 fits the plain likelihood), by golden-section search on log T (the loss is
    unimodal in T). 1.0 when there is nothing to fit on."""
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        return 1.0
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5) - 1) / 2
    doubt = 1.0 / (len(labels) + 2) if doubt is None else doubt

    def loss(log_t: float) -> float:
        return cross_entropy(logits, labels, math.exp(log_t), doubt)

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
