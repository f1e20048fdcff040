"""Which folders are versions: one rule (training_job/registry.py), read the same way by every reader."""
from __future__ import annotations

from pathlib import Path

from bench.common import latest_published_version
from services.model_server.source import versions_on_disk
from devstack.demo_report import latest_version_dir
from training_job import publish, registry


def make_model_dir(root: Path) -> Path:
    model_dir = root / "mushrooms"
    for name in ("1", "2", "10", "²", "٣", ".tmp-host-1-abc", "x3"):
        (model_dir / name).mkdir(parents=True)
        (model_dir / name / "saved_model.pb").write_bytes(b"")
    (model_dir / "7").write_text("a file, not a version folder")
    return model_dir


def test_only_folders_named_by_ascii_digits_are_versions(tmp_path):
    model_dir = make_model_dir(tmp_path)
    assert registry.version_dirs(model_dir) == {1: model_dir / "1", 2: model_dir / "2", 10: model_dir / "10"}
    assert registry.versions(model_dir) == [1, 2, 10]
    assert registry.latest_version_dir(model_dir) == model_dir / "10"
    assert registry.versions(tmp_path / "missing") == []
    assert registry.latest_version_dir(tmp_path / "missing") is None


def test_every_reader_of_the_registry_applies_the_same_rule(tmp_path):
    model_dir = make_model_dir(tmp_path)
    assert versions_on_disk(model_dir) == registry.version_dirs(model_dir)
    assert publish.versions(model_dir) == [1, 2, 10]
    assert latest_version_dir(tmp_path, "mushrooms") == model_dir / "10"
    assert latest_published_version(tmp_path, "mushrooms") == model_dir / "10"
