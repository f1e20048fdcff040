"""Accuracy with less noise than one test split: 5-fold cross-validation over all the shared photos, the frozen
base (the default) against --fine_tune_blocks 1, paired fold by fold (same folds, same seeds).

A test split of ~150 photos moves by 0.7 points per photo, so one split cannot tell two methods 1-2 points apart;
five folds that each hold out a fifth of the photos can, roughly. Each fold: validation = 80 photos of the other
four fifths (early stopping), train = the rest; the bottleneck and activation caches are the user's own.

Usage: python -m bench.accuracy_cv [--data DIR] [--folds 5]
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

from bench.common import write_result
from training_job.paths import shared_data_dir

VALIDATION_PHOTOS = 80


def fold_rows(rows, folds: list[np.ndarray], k: int):
    rest = np.concatenate([folds[j] for j in range(len(folds)) if j != k])
    split = {int(i): "test" for i in folds[k]}
    split.update({int(i): "validation" for i in rest[:VALIDATION_PHOTOS]})
    split.update({int(i): "train" for i in rest[VALIDATION_PHOTOS:]})
    return [dataclasses.replace(row, split=split[i]) for i, row in enumerate(rows)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "mushrooms"))
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args(argv)

    from training_job.bottlenecks import BaseNetwork
    from training_job.fine_tune import fine_tune
    from training_job.prepare import prepare_dataset
    from training_job.train import TrainConfig, train_head

    work = Path(tempfile.mkdtemp(prefix="accuracy-cv-"))
    rows = prepare_dataset(args.data, work / "dataset", per_class=0, progress=False)
    labels = sorted({r.label for r in rows})
    index = {label: i for i, label in enumerate(labels)}
    folds = np.array_split(np.random.default_rng(0).permutation(len(rows)), args.folds)
    base = BaseNetwork("mobilenet_1.0_224")
    per_fold = []
    for k in range(args.folds):
        rows_k = fold_rows(rows, folds, k)
        config = TrainConfig(fine_tune_blocks=1, seed=k)
        frozen = train_head(rows_k, config, work / "tensorboard", f"fold{k}", base=base, progress=False)
        truth = np.array([index[r.label] for r in rows_k if r.split == "test"])
        tuned = fine_tune(rows_k, config, base, frozen.head, frozen.split_bottlenecks,
                          work / "tensorboard" / f"fold{k}", progress=False)
        accuracy = {
            "frozen": float(np.mean(frozen.head.predict(frozen.split_bottlenecks["test"].features).argmax(1) == truth)),
            "fine_tuned_1_block": float(np.mean(
                tuned.head.predict(tuned.split_bottlenecks["test"].features).argmax(1) == truth)),
        }
        per_fold.append({"fold": k, "test_photos": len(truth), **accuracy,
                         "fine_tune_epochs": tuned.epochs_run, "fine_tune_seconds": round(tuned.seconds, 1)})
        print(per_fold[-1], flush=True)
    result = {"photos": len(rows), "folds": args.folds, "per_fold": per_fold}
    for method in ("frozen", "fine_tuned_1_block"):
        values = [f[method] for f in per_fold]
        result[method] = {"mean": round(float(np.mean(values)), 4), "min": min(values), "max": max(values)}
    gain = [f["fine_tuned_1_block"] - f["frozen"] for f in per_fold]
    result["fine_tune_gain"] = {"mean": round(float(np.mean(gain)), 4),
                                "standard_error": round(float(np.std(gain, ddof=1) / np.sqrt(len(gain))), 4)}
    print(result["frozen"], result["fine_tuned_1_block"], result["fine_tune_gain"])
    write_result("accuracy_cv", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
