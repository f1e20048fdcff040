"""What the gateway may know of a model beyond the TF Serving API: display names and the demo photos, read from
the version folders' ``assets.extra/`` when the registry is mounted (optional: without it labels are shown as is)."""
from __future__ import annotations

import csv
import json
from pathlib import Path


def display_name(label: str, names: dict[str, str]) -> str:
    return names.get(label) or label.replace("_", " ").capitalize()


class ModelInfo:
    def __init__(self, base_path: str | None):
        self.base_path = Path(base_path) if base_path else None
        self._names: dict[int, dict] = {}  # version -> its labels.json

    def _assets(self, version: int) -> Path | None:
        if self.base_path is None:
            return None
        folder = self.base_path / str(version) / "assets.extra"
        return folder if folder.is_dir() else None

    def _labels_json(self, version: int) -> dict:
        if version not in self._names:
            assets = self._assets(version)
            self._names[version] = {}
            if assets and (assets / "labels.json").exists():
                self._names[version] = json.loads((assets / "labels.json").read_text())
        return self._names[version]

    def display_names(self, version: int) -> dict[str, str]:
        return self._labels_json(version).get("display_names", {})

    def class_labels(self, version: int) -> list[dict]:
        """The model's classes in column order with display names ([] without the registry)."""
        names = self.display_names(version)
        return [{"label": label, "display_name": display_name(label, names)}
                for label in self._labels_json(version).get("labels", [])]

    def demo_photos(self, version: int) -> list[dict]:
        assets = self._assets(version)
        if assets is None or not (assets / "manifest.csv").exists():
            return []
        names = self.display_names(version)
        with open(assets / "manifest.csv", newline="") as f:
            return [{"sha256": r["sha256"], "label": r["label"], "display_name": display_name(r["label"], names),
                     "path": r["path"]} for r in csv.DictReader(f) if r["split"] == "demo"]
