"""Champion/challenger: the newly trained model (challenger) is published only when it is not worse than the version
being served (champion) on the same held-out photos, judged with a confidence interval, not a single number.

Both SavedModels answer every photo of the new dataset's test split through ``serving_default`` (the contract
shared with serving). The split is a function of a photo's hash only (prepare.py), so test photos were never
trained on by either model; photos that came back as users' corrections (``provenance.csv`` of ``collect``) are
reported again on their own. The decision: the paired bootstrap interval of accuracy(challenger) -
accuracy(champion) at ``confidence`` must have its lower bound at or above ``-margin`` (non-inferiority); McNemar's
exact test on the discordant photos is reported next to it. Both scores land in the new version's
``assets.extra/challenge.json``; a refused challenger is not published (its report stays in the run folder).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_MARGIN = 0.01
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 4000


class ChallengeRefused(Exception):
    """The challenger is worse than the champion: not published. ``report`` says by how much."""

    def __init__(self, report: dict):
        super().__init__(report["reason"])
        self.report = report


def paired_bootstrap(correct_new: np.ndarray, correct_old: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                     confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> tuple[float, float, float]:
    """(difference of accuracies new - old, lower, upper): percentile interval over photos resampled in pairs."""
    correct_new, correct_old = np.asarray(correct_new, bool), np.asarray(correct_old, bool)
    if correct_new.shape != correct_old.shape or correct_new.size == 0:
        raise ValueError("two non-empty answer lists on the same photos are needed")
    diff = correct_new.astype(float) - correct_old.astype(float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(diff.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mcnemar_exact(correct_new: np.ndarray, correct_old: np.ndarray) -> dict:
    """Exact two-sided McNemar test: only the photos one model gets right and the other wrong count."""
    correct_new, correct_old = np.asarray(correct_new, bool), np.asarray(correct_old, bool)
    only_new = int(np.sum(correct_new & ~correct_old))
    only_old = int(np.sum(~correct_new & correct_old))
    n, k = only_new + only_old, min(only_new, only_old)
    p_value = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"only_challenger_right": only_new, "only_champion_right": only_old, "p_value": p_value}


def decide(correct_new, correct_old, margin: float = DEFAULT_MARGIN, confidence: float = DEFAULT_CONFIDENCE,
           resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    diff, low, high = paired_bootstrap(correct_new, correct_old, resamples, confidence, seed)
    publish = low >= -margin
    verdict = "not worse" if publish else "worse"
    return {"publish": publish, "difference": diff, "interval": [low, high], "confidence": confidence,
            "margin": margin, "mcnemar": mcnemar_exact(correct_new, correct_old),
            "reason": f"challenger {verdict}: accuracy difference {diff:+.4f}, {confidence:.0%} paired bootstrap "
                      f"interval [{low:+.4f}, {high:+.4f}] {'>=' if publish else '<'} -{margin:g}"}


@dataclass
class Answers:
    labels: list[str]  # the predicted label per photo

    def correct(self, truth: list[str]) -> np.ndarray:
        return np.array([p == t for p, t in zip(self.labels, truth)], dtype=bool)


def predict_labels(version_dir: str | Path, pixels: np.ndarray, batch: int = 32) -> Answers:
    """Top-1 labels of a SavedModel (the registry contract's serving_default) for uint8 photos."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    labels: list[str] = []
    for start in range(0, len(pixels), batch):
        out = serve(images=tf.constant(pixels[start:start + batch]))
        classes = out["classes"].numpy()
        best = np.argmax(out["probabilities"].numpy(), axis=1)
        labels += [classes[i, j].decode() for i, j in enumerate(best)]
    return Answers(labels)


def correction_hashes(provenance: str | Path | None) -> set[str]:
    if not provenance or not Path(provenance).is_file():
        return set()
    with open(provenance, newline="") as f:
        return {row["sha256"] for row in csv.DictReader(f)}


def champion_dir(registry: Path, model_name: str, version: int | None = None) -> Path | None:
    """The champion: ``version`` if given, else the newest integer version folder of the model."""
    from training_job.publish import versions

    model_dir = Path(registry) / model_name
    if version is not None:
        path = model_dir / str(version)
        if not path.is_dir():
            raise FileNotFoundError(f"champion version {version} is not in {model_dir}")
        return path
    found = versions(model_dir) if model_dir.is_dir() else []
    return model_dir / str(found[-1]) if found else None


def challenge(challenger: Path, champion: Path, rows, corrections: set[str], margin: float = DEFAULT_MARGIN,
              confidence: float = DEFAULT_CONFIDENCE, image_size: int = 224) -> dict:
    """Both models on the test rows; the report with both scores and the decision."""
    from training_job.preprocessing import load_image_file

    test = [r for r in rows if r.split == "test"]
    if not test:
        raise ValueError("the dataset has no test photos to judge the challenger on")
    pixels = np.stack([load_image_file(r.path, image_size) for r in test])
    truth = [r.label for r in test]
    new, old = predict_labels(challenger, pixels), predict_labels(champion, pixels)
    correct_new, correct_old = new.correct(truth), old.correct(truth)
    report = {"champion": str(champion), "test_photos": len(test),
              "challenger_accuracy": float(correct_new.mean()), "champion_accuracy": float(correct_old.mean()),
              **decide(correct_new, correct_old, margin, confidence)}
    mask = np.array([r.sha256 in corrections for r in test], dtype=bool)
    report["corrections"] = {"test_photos": int(mask.sum()),
                             "challenger_accuracy": float(correct_new[mask].mean()) if mask.any() else None,
                             "champion_accuracy": float(correct_old[mask].mean()) if mask.any() else None}
    return report


def write_report(report: dict, folder: Path) -> Path:
    path = Path(folder) / "challenge.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
