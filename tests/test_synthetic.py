"""The drawn stand-in dataset: five clearly named classes, deterministic, readable by the contract and `prepare`."""
from __future__ import annotations

from pathlib import Path

from training_job import cli
from training_job.dataset import labels_of, read_manifest
from training_job.prepare import prepare_dataset
from training_job.preprocessing import preprocess_bytes
from training_job.synthetic import SYNTHETIC_WARNING, generate_synthetic_dataset


def test_synthetic_dataset_is_named_deterministic_and_usable(tmp_path):
    out = generate_synthetic_dataset(tmp_path / "a", per_class=8, seed=3)
    again = generate_synthetic_dataset(tmp_path / "b", per_class=8, seed=3)
    other = generate_synthetic_dataset(tmp_path / "c", per_class=8, seed=4)

    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["synthetic_earthstar", "synthetic_fly_agaric", "synthetic_puffball", "synthetic_red_cup",
                       "synthetic_stinkhorn"]
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == 40 and not list(out.rglob(".*"))
    for path in files:
        assert preprocess_bytes(path.read_bytes()).shape == (224, 224, 3)
        twin = tmp_path / "b" / path.relative_to(out)
        assert twin.read_bytes() == path.read_bytes(), "same seed, same photos"
    assert any(p.read_bytes() != (tmp_path / "c" / p.relative_to(out)).read_bytes() for p in files)
    assert other.exists()

    rows = prepare_dataset(out, tmp_path / "prepared", per_class=0, progress=False)
    assert labels_of(rows) == folders
    assert len(rows) >= 35, "random variation keeps most drawings apart from near-duplicate detection"
    assert "SYNTHETIC" in SYNTHETIC_WARNING and "real photos" in SYNTHETIC_WARNING


def test_prepare_synthetic_runs_the_data_step_without_photos(tmp_path, capsys):
    assert cli.main(["prepare", "--synthetic", "--source", str(tmp_path / "no-photos"), "--out",
                     str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "real photos" in printed
    rows = read_manifest(tmp_path / "out" / "manifest.csv")
    assert len(labels_of(rows)) == 5 and all(r.label.startswith("synthetic_") for r in rows)
    assert all(Path(r.path).is_relative_to(tmp_path / "out" / "synthetic-photos") for r in rows)
