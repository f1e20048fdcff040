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
        self._names: dict[int, dict[str, str]] = {}

    def _assets(self, version: int) -> Path | None:
        if self.base_path is None:
            return None
        folder = self.base_path / str(version) / "assets.extra"
        return folder if folder.is_dir() else None

    def display_names(self, version: int) -> dict[str, str]:
        if version not in self._names:
            assets = self._assets(version)
            names = {}
            if assets and (assets / "labels.json").exists():
                names = json.loads((assets / "labels.json").read_text()).get("display_names", {})
            self._names[version] = names
        return self._names[version]

    def demo_photos(self, version: int) -> list[dict]:
        assets = self._assets(version)
        if assets is None or not (assets / "manifest.csv").exists():
            return []
        names = self.display_names(version)
        with open(assets / "manifest.csv", newline="") as f:
            return [{"sha256": r["sha256"], "label": r["label"], "display_name": display_name(r["label"], names),
                     "path": r["path"]} for r in csv.DictReader(f) if r["split"] == "demo"]
