"""Champion/challenger (training_job/challenge.py): the statistics, the decision on real SavedModels (tiny ones), and
`python -m training_job run --challenge` end to end on a few shared photos."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.support import MUSHROOMS
from training_job.tiny_model import LABELS, write_tiny_model
from training_job.challenge import challenge, decide, mcnemar_exact, paired_bootstrap, predict_labels
from training_job.dataset import ManifestRow
from training_job.paths import PROJECT_ROOT
from training_job.preprocessing import load_image_file
from training_job.publish import publish_dir


def test_paired_bootstrap_interval_of_the_accuracy_difference():
    same = np.array([True, False] * 50)
    assert paired_bootstrap(same, same) == (0.0, 0.0, 0.0)
    better = same.copy()
    better[1::2][:20] = True  # right on 20 more photos of 100
    diff, low, high = paired_bootstrap(better, same)
    assert diff == pytest.approx(0.2) and 0.1 < low < 0.2 < high < 0.3
    assert paired_bootstrap(better, same) == (diff, low, high)  # seeded: the same interval every run
    with pytest.raises(ValueError):
        paired_bootstrap(np.array([True]), np.array([True, False]))


def test_mcnemar_exact_counts_only_discordant_photos():
    new, old = np.array([False] * 10 + [True] * 5), np.array([True] * 10 + [True] * 5)
    assert mcnemar_exact(new, old) == {"only_challenger_right": 0, "only_champion_right": 10,
                                       "p_value": pytest.approx(2 / 1024)}
    assert mcnemar_exact(old, old)["p_value"] == 1.0


def test_decide_is_non_inferiority_with_a_margin():
    champion = np.array([True] * 80 + [False] * 20)
    slightly_worse = champion.copy()
    slightly_worse[:1] = False  # one photo of 100 lost: within noise and margin? the interval decides
    clearly_worse = champion.copy()
    clearly_worse[:30] = False
    assert decide(champion, champion)["publish"]
    refused = decide(clearly_worse, champion)
    assert not refused["publish"] and refused["interval"][1] < 0 and refused["reason"].startswith(
        "challenger worse: accuracy difference -0.3000")
    assert decide(slightly_worse, champion, margin=0.05)["publish"]
    assert not decide(slightly_worse, champion, margin=0.0)["publish"]  # lower bound -0.03 < 0


def test_challenge_on_saved_models_refuses_a_worse_challenger_and_reports_corrections(tmp_path):
    champion = write_tiny_model(tmp_path / "champion", bias=0.0)
    same = write_tiny_model(tmp_path / "same", bias=0.0)
    worse = write_tiny_model(tmp_path / "worse", bias=8.0)  # answers the first class for every photo
    photos = [p for label in LABELS for p in sorted((MUSHROOMS / label).iterdir())[:12]]
    truth = predict_labels(champion, np.stack([load_image_file(p) for p in photos])).labels  # champion is right
    rows = [ManifestRow(str(p), t, hashlib.sha256(p.read_bytes()).hexdigest(), "test", 0, 0, 0)
            for p, t in zip(photos, truth)]
    rows.append(ManifestRow(str(photos[0]), truth[0], "x" * 64, "train", 0, 0, 0))  # not judged on
    corrections = {rows[0].sha256, rows[1].sha256}

    kept = challenge(same, champion, rows, corrections)
    assert kept["publish"] and kept["challenger_accuracy"] == kept["champion_accuracy"] == 1.0
    assert kept["test_photos"] == 48 and kept["corrections"]["test_photos"] == 2

    refused = challenge(worse, champion, rows, corrections)
    assert not refused["publish"] and refused["champion_accuracy"] == 1.0
    assert refused["challenger_accuracy"] < 0.5 and refused["interval"][1] < 0
    assert refused["mcnemar"]["only_challenger_right"] == 0 and refused["mcnemar"]["p_value"] < 0.001


def test_run_challenge_publishes_a_better_model_with_both_scores(tmp_path):
    data = tmp_path / "data"
    for label in LABELS:
        (data / label).mkdir(parents=True)
        for photo in sorted((MUSHROOMS / label).iterdir())[:40]:
            shutil.copy(photo, data / label / photo.name)
    registry = tmp_path / "registry"
    publish_dir(lambda d: write_tiny_model(d, bias=0.0), registry, "mushrooms")  # a poor champion: version 1
    result = subprocess.run(
        [sys.executable, "-m", "training_job", "run", "--challenge", f"--data={data}", f"--registry={registry}",
         f"--work_dir={tmp_path / 'work'}", "--per_class=0", "--testing_percentage=30",
         "--validation_percentage=20", "--demo_percentage=5", "--epochs=30", "--no_tflite",
         "--no_fine_tune_whole"],  # the gate, not the recipe: a head on frozen features beats the tiny champion
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "challenge passed: challenger not worse" in result.stdout
    report = json.loads((registry / "mushrooms" / "2" / "assets.extra" / "challenge.json").read_text())
    assert report["publish"] and report["champion"].endswith("mushrooms/1")
    assert report["challenger_accuracy"] > report["champion_accuracy"] and report["interval"][0] > 0
    assert report["test_photos"] > 10
