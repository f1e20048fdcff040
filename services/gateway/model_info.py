"""What the gateway may know of a model beyond the TF Serving API: display names and the demo photos, read from
the version folders' ``assets.extra/`` when the registry is mounted (optional: without it class names are shown as
is). Its *class names* are the model's output columns (labels.json's "labels", the HTTP API's "label" fields)."""
from __future__ import annotations

import json
from pathlib import Path

from training_job.dataset import demo_rows, read_manifest


def display_name(class_name: str, names: dict[str, str]) -> str:
    return names.get(class_name) or class_name.replace("_", " ").capitalize()


class ModelInfo:
    def __init__(self, base_path: str | None):
        self.base_path = Path(base_path) if base_path else None
        self._classes: dict[int, dict] = {}  # version -> its labels.json (class names, display names)

    def _assets(self, version: int) -> Path | None:
        if self.base_path is None:
            return None
        folder = self.base_path / str(version) / "assets.extra"
        return folder if folder.is_dir() else None

    def _classes_file(self, version: int) -> dict:
        if version not in self._classes:
            assets = self._assets(version)
            self._classes[version] = {}
            if assets and (assets / "labels.json").exists():
                self._classes[version] = json.loads((assets / "labels.json").read_text())
        return self._classes[version]

    def keep(self, versions) -> None:
        """Forgets what was read for any other version: a version number that comes back, or is found to be another
        model (version_facts.py), has its labels.json read afresh."""
        self._classes = {v: known for v, known in self._classes.items() if v in versions}

    def display_names(self, version: int) -> dict[str, str]:
        return self._classes_file(version).get("display_names", {})

    def class_names(self, version: int) -> list[dict]:
        """The model's class names in column order with display names ([] without the registry), as the HTTP API
        writes them ({"label", "display_name"})."""
        names = self.display_names(version)
        return [{"label": class_name, "display_name": display_name(class_name, names)}
                for class_name in self._classes_file(version).get("labels", [])]

    def demo_photos(self, version: int) -> list[dict]:
        assets = self._assets(version)
        if assets is None or not (assets / "manifest.csv").exists():
            return []
        names = self.display_names(version)
        return [{"sha256": r.sha256, "label": r.label, "display_name": display_name(r.label, names), "path": r.path}
                for r in demo_rows(read_manifest(assets / "manifest.csv"))]
