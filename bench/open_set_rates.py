"""The "not a mushroom" check's rates by the reject rate its threshold is calibrated at, on published versions.

For each version (a SavedModel in the registry and the run folder it was published from), the served
``mushroom_score`` of the run's training, validation, test and demo photos and of the not-mushroom photos; then, for
each --rates value, the threshold the training job would set (``open_set.threshold_at``: that quantile of the
training and validation scores together) and the share of each set it rejects. Issue 14's targets: >= 90 % of the
not-mushroom photos rejected, <= 5 % of unseen mushrooms (test and demo) wrongly rejected.

Usage: python -m bench.open_set_rates --version REGISTRY_VERSION_DIR RUN_DIR [--version ...] [--rates 0,0.01,0.03]
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import OPEN_SET_RATES, write_result
from training_job.open_set import threshold_at
from training_job.paths import shared_data_dir
from training_job.preprocessing import load_image_file


def served_scores(signature, paths: list[Path], size: int) -> np.ndarray:
    import tensorflow as tf

    return np.concatenate([signature(images=tf.constant(np.stack([load_image_file(p, size) for p in paths[i:i + 32]])))
                           ["mushroom_score"].numpy() for i in range(0, len(paths), 32)])


def rates_at(scores: dict[str, np.ndarray], rate: float) -> dict:
    threshold = threshold_at(np.concatenate([scores["train"], scores["validation"]]), rate)
    return {"threshold": threshold, **{name: float(np.mean(values < threshold)) for name, values in scores.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", nargs=2, action="append", required=True, metavar=("VERSION_DIR", "RUN_DIR"))
    parser.add_argument("--rates", default=None, help="comma-separated quantiles (default: 0 and "
                        "bench.common.OPEN_SET_RATES, the training job's own among them)")
    parser.add_argument("--not_mushrooms", type=Path, default=shared_data_dir() / "not-mushrooms")
    args = parser.parse_args(argv)
    import tensorflow as tf

    rates = [float(r) for r in args.rates.split(",")] if args.rates else [0.0, *OPEN_SET_RATES]
    not_mushrooms = sorted(p for p in args.not_mushrooms.iterdir() if p.is_file())
    versions = []
    for version_dir, run_dir in args.version:
        signature = tf.saved_model.load(version_dir).signatures["serving_default"]
        size = int(signature.structured_input_signature[1]["images"].shape[1])
        with open(Path(run_dir) / "manifest.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        photos = {split: [Path(r["path"]) for r in rows if r["split"] == split]
                  for split in ("train", "validation", "test", "demo")}
        scores = {**{split: served_scores(signature, paths, size) for split, paths in photos.items()},
                  "not_mushrooms": served_scores(signature, not_mushrooms, size)}
        by_rate = {str(rate): rates_at(scores, rate) for rate in rates}
        versions.append({"version": version_dir, "run": run_dir,
                         "photos": {name: len(values) for name, values in scores.items()}, "by_rate": by_rate})
        print(version_dir)
        for rate, row in by_rate.items():
            print(f"  rate {rate}: threshold {row['threshold']:.3f}; rejected: train {row['train']:.3f}, "
                  f"validation {row['validation']:.3f}, "
                  f"test {row['test']:.3f}, demo {row['demo']:.3f}, not mushrooms {row['not_mushrooms']:.3f}")
    write_result("open_set_rates", {"rates": rates, "versions": versions})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
