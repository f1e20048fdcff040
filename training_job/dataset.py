"""The dataset manifest: one row per kept photo, written by `prepare`, read by training, evaluation and the demo."""
from __future__ import annotations

import csv
import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SPLITS = ("train", "validation", "test", "demo")


@dataclass(frozen=True)
class ManifestRow:
    path: str  # absolute path of the photo, read in place
    label: str  # class folder name, e.g. "amanita_muscaria"
    sha256: str  # of the file's bytes
    split: str  # one of SPLITS
    width: int
    height: int
    bytes: int


FIELDS = [f.name for f in fields(ManifestRow)]


def manifest_order(rows: list[ManifestRow]) -> list[ManifestRow]:
    """``rows`` in the order a manifest file holds them: by label, split, then photo hash. Whatever pairs per-photo
    results with a run's manifest (the misclassified list) relies on the run having used this order."""
    return sorted(rows, key=lambda r: (r.label, r.split, r.sha256))


def open_photo_csv(path: str | Path, mode: str = "r"):
    """A CSV file of photo paths (the manifest, a run's misclassified list), opened as UTF-8 but for the bytes of
    a file name that are not UTF-8 (a photo named on another system): those are written as the file system holds
    them, and read back as the same path (Python's surrogate escapes)."""
    return open(path, mode, newline="", encoding="utf-8", errors="surrogateescape")


def write_manifest(rows: list[ManifestRow], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open_photo_csv(tmp, "w") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in manifest_order(rows):
            writer.writerow(asdict(row))
    tmp.replace(path)


def read_manifest(path: str | Path) -> list[ManifestRow]:
    with open_photo_csv(path) as f:
        return [
            ManifestRow(r["path"], r["label"], r["sha256"], r["split"], int(r["width"]), int(r["height"]),
                        int(r["bytes"]))
            for r in csv.DictReader(f)
        ]


def demo_rows(rows: list[ManifestRow]) -> list[ManifestRow]:
    """The photos a demo of the model shows: the demo split's, or the test split's when it has none (a small
    folder's demo photos can all be lent to the splits training needs, prepare.py); the model never trained on
    either."""
    for split in ("demo", "test"):
        chosen = [r for r in rows if r.split == split]
        if chosen:
            return chosen
    return []


def manifest_fingerprint(rows: list[ManifestRow]) -> str:
    """Identifies the data a model was trained on: sha256 over (label, sha256, split) of every row."""
    h = hashlib.sha256()
    for row in sorted(rows, key=lambda r: (r.label, r.sha256, r.split)):
        h.update(f"{row.label}\t{row.sha256}\t{row.split}\n".encode())
    return h.hexdigest()


def labels_of(rows: list[ManifestRow]) -> list[str]:
    """Class labels in the column order of every model trained on these rows (sorted)."""
    return sorted({r.label for r in rows})
