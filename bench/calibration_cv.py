"""How low temperature scaling can bring the expected calibration error (issue 14's target: ECE <= 3 %), and which
estimate of the temperature gets there, on the folds of bench/accuracy_cv.py (same folds, same heads).

Per fold, the head of a frozen method (default ``lite0_frozen``, the default recipe) and its test-fold ECE with the
temperature ``T`` fitted on:
- ``validation``: the fold's 80 validation photos (what the training job does);
- ``cross_fitted``: the validation photos plus out-of-fold logits of every training photo (``--parts`` sub-heads,
  each trained without one part of the training photos and read on that part), so about 13 times the photos;
- ``oracle``: the test fold itself. Not a method (it looks at the answers it is scored on): the lowest ECE any single
  temperature reaches on those photos, so it tells what temperature scaling can do at all.

And the floor of the measurement itself: ECE is a binned estimate, biased upwards on few photos, so even a perfectly
calibrated model shows some. ``calibrated_model_ece`` draws the answers of a model whose confidences are the
validation-scaled test confidences and which is right exactly that often, on as many photos as a test fold and as
``--holdout_photos`` (the hidden hold-out's size), and reports the mean ECE of those draws: a measured ECE near it
cannot be told from perfect calibration.

Usage: python -m bench.calibration_cv [--data DIR] [--folds 5] [--method lite0_frozen] [--parts 4]
       [--holdout_photos 440]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.accuracy_cv import METHOD_ARCHITECTURES, fold_rows, paired_difference
from bench.common import write_result
from training_job.paths import shared_data_dir

ESTIMATES = ("validation", "cross_fitted", "oracle")
FROZEN_METHODS = [m for m in METHOD_ARCHITECTURES if m.endswith("_frozen") or m == "frozen"]
CALIBRATED_DRAWS = 400


def calibrated_model_ece(confidences: np.ndarray, classes: int, photos: int, rng: np.random.Generator,
                         draws: int = CALIBRATED_DRAWS) -> float:
    """Mean ECE, over ``draws``, of ``photos`` answers of a perfectly calibrated ``classes``-way model: each draw
    samples that many top-1 confidences (with replacement) from ``confidences`` and makes each answer right with
    exactly that probability."""
    from training_job.calibration import expected_calibration_error

    total = 0.0
    for _ in range(draws):
        confidence = rng.choice(confidences, photos)
        right = rng.random(photos) < confidence
        # class 0 is the answer (a top-1 confidence is at least 1 / classes), the rest share what is left
        probs = np.column_stack([confidence] + [(1 - confidence) / (classes - 1)] * (classes - 1))
        total += expected_calibration_error(probs, np.where(right, 0, 1))
    return total / draws


def held_out_parts(rows, parts: int, seed: int) -> list[list]:
    """The rows of one fold re-split ``parts`` times: in the j-th, part j of the training photos is "test" (the
    photos its sub-head is read on), the other training photos stay "train", validation stays, and the fold's own
    test photos are "unused" (never trained on, never read). Every training photo is held out exactly once; none
    when ``parts`` is 0."""
    if parts == 0:
        return []
    train = [i for i, r in enumerate(rows) if r.split == "train"]
    chunks = np.array_split(np.random.default_rng(seed).permutation(train), parts)
    out = []
    for chunk in chunks:
        held = {int(i) for i in chunk}
        out.append([dataclasses.replace(r, split="test") if i in held
                    else dataclasses.replace(r, split="unused") if r.split == "test" else r
                    for i, r in enumerate(rows)])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "mushrooms"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--method", default="lite0_frozen", choices=FROZEN_METHODS)
    parser.add_argument("--parts", type=int, default=4,
                        help="sub-heads per fold for the cross-fitted temperature (0: not measured)")
    parser.add_argument("--label_smoothing", type=float, default=None,
                        help="the heads' label smoothing (default: the training job's)")
    parser.add_argument("--holdout_photos", type=int, default=440,
                        help="photos of the hold-out the floor is also reported for")
    parser.add_argument("--result", default="calibration_cv", help="the result file's name in bench/results")
    args = parser.parse_args(argv)

    from training_job.bottlenecks import BaseNetwork
    from training_job.calibration import expected_calibration_error, fit_temperature, softmax
    from training_job.prepare import prepare_dataset
    from training_job.train import TrainConfig, train_head

    work = Path(tempfile.mkdtemp(prefix="calibration-cv-"))
    rows = prepare_dataset(args.data, work / "dataset", per_class=0, progress=False)
    labels = sorted({r.label for r in rows})
    index = {label: i for i, label in enumerate(labels)}
    folds = np.array_split(np.random.default_rng(0).permutation(len(rows)), args.folds)  # accuracy_cv's folds
    architecture = METHOD_ARCHITECTURES[args.method]
    base = BaseNetwork(architecture)

    smoothing = TrainConfig.label_smoothing if args.label_smoothing is None else args.label_smoothing

    def classes(rows_k, split: str) -> np.ndarray:
        return np.array([index[r.label] for r in rows_k if r.split == split])

    per_fold, scaled_confidences = [], []
    for k in range(args.folds):
        rows_k = fold_rows(rows, folds, k)
        config = TrainConfig(architecture=architecture, seed=k, label_smoothing=smoothing,  # accuracy_cv's head
                             fine_tune_whole=False)
        trained = train_head(rows_k, config, work / "tensorboard", f"fold{k}", base=base, progress=False)
        truth, y_val = classes(rows_k, "test"), classes(rows_k, "validation")
        test_logits = trained.head.logits(trained.split_bottlenecks["test"].features)
        val_logits = trained.head.logits(trained.split_bottlenecks["validation"].features)
        fitted_on = {"validation": (val_logits, y_val), "oracle": (test_logits, truth)}
        logits, answers = [val_logits], [y_val]
        for j, sub_rows in enumerate(held_out_parts(rows_k, args.parts, seed=100 + k)):
            sub = train_head(sub_rows, config, work / "tensorboard", f"fold{k}-part{j}", base=base, progress=False)
            logits.append(sub.head.logits(sub.split_bottlenecks["test"].features))
            answers.append(classes(sub_rows, "test"))
        if args.parts:
            fitted_on["cross_fitted"] = (np.concatenate(logits), np.concatenate(answers))
        test_logits = test_logits.astype(np.float64)
        entry = {"fold": k, "test_photos": len(truth),
                 "accuracy": round(float(np.mean(test_logits.argmax(1) == truth)), 4),
                 "ece_uncalibrated": round(expected_calibration_error(softmax(test_logits), truth), 4)}
        for estimate in fitted_on:
            x, y = fitted_on[estimate]
            temperature = fit_temperature(x, y)
            entry[estimate] = {"temperature": round(temperature, 3), "fitted_on_photos": len(y),
                               "ece": round(expected_calibration_error(softmax(test_logits / temperature), truth),
                                            4)}
        scaled_confidences.append(softmax(test_logits / entry["validation"]["temperature"]).max(axis=1))
        per_fold.append(entry)
        print(entry, flush=True)

    estimates = [e for e in ESTIMATES if e in per_fold[0]]
    result = {"method": args.method, "architecture": architecture, "photos": len(rows), "folds": args.folds,
              "parts": args.parts, "label_smoothing": smoothing, "per_fold": per_fold,
              "ece_uncalibrated": round(float(np.mean([f["ece_uncalibrated"] for f in per_fold])), 4)}
    result["accuracy"] = round(float(np.mean([f["accuracy"] for f in per_fold])), 4)
    for estimate in estimates:
        result[estimate] = {"ece": round(float(np.mean([f[estimate]["ece"] for f in per_fold])), 4),
                            "temperature": round(float(np.mean([f[estimate]["temperature"] for f in per_fold])), 3)}
        print(estimate, result[estimate])
    if "cross_fitted" in estimates:
        result["cross_fitted_minus_validation"] = paired_difference(
            [f["cross_fitted"]["ece"] for f in per_fold], [f["validation"]["ece"] for f in per_fold])
        print("cross_fitted - validation", result["cross_fitted_minus_validation"])
    rng = np.random.default_rng(0)
    pooled = np.concatenate(scaled_confidences)
    result["calibrated_model_ece"] = {
        "test_fold": round(float(np.mean([calibrated_model_ece(c, len(labels), len(c), rng)
                                          for c in scaled_confidences])), 4),
        "holdout": round(calibrated_model_ece(pooled, len(labels), args.holdout_photos, rng), 4),
        "holdout_photos": args.holdout_photos, "draws": CALIBRATED_DRAWS}
    print("a perfectly calibrated model's ECE", result["calibrated_model_ece"])
    write_result(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
