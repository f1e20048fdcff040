"""`collect`: users' corrections (the gateway's photo store, services/gateway/photo_store.py) become a class-folder
tree of new training photos, with provenance, de-duplicated against the existing data.

For each photo in ``STORE/corrections.jsonl`` (the last correction of a photo wins; photos whose users disagree are
left out): the photo must still be in the store, decode under the preprocessing contract (prepare.inspect_file),
carry a label that is a class of the existing data, and be neither byte-identical (sha256) nor a near duplicate
(perceptual hash within ``near_duplicate_distance``, prepare's rule) of an existing photo, of a photo collected
before, or of another new one. Kept photos go to ``OUT/<class folder>/<sha256>.<ext>``: the folder OUT has for the
label, else one named as the data's (a folder's name may spell its label otherwise: prepare.class_label); ``OUT/provenance.csv`` gets one row
per photo: which answer (request id), which version and model (its identity: a version number can be given again
to another model), when it was answered and corrected. ``OUT`` may be the data
folder itself (then the next ``run`` trains on old + new photos) or a folder of its own.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training_job.errors import UserError
from training_job.prepare import DEFAULT_MIN_SIDE, DEFAULT_NEAR_DUPLICATE_DISTANCE, Inspected, _inspect_all, \
    inspect_file, list_classes

PROVENANCE = "provenance.csv"
PROVENANCE_FIELDS = ["sha256", "label", "predicted", "model", "version", "identity", "request_id", "answered_at",
                     "corrected_at", "collected_at", "file"]
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg"}


@dataclass
class CollectReport:
    corrections: int = 0
    repeated: int = 0  # lines repeating a correction already read: a client retried a feedback that had been logged
    collected: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)  # {"sha256", "label", "reason", "detail"}

    def counts(self) -> dict[str, int]:
        return dict(Counter(d["reason"] for d in self.dropped))

    def to_json(self) -> dict:
        return {"corrections": self.corrections, "repeated": self.repeated, "collected": len(self.collected),
                "dropped": self.counts(), "photos": self.collected, "dropped_photos": self.dropped}


def read_corrections(store: Path, report: CollectReport) -> dict[str, dict]:
    """{sha256: the photo's last correction}; photos corrected to different labels are dropped (``disagreement``).
    One answer (request id) corrected to one label is one correction however many times it was logged."""
    log = store / "corrections.jsonl"
    if not store.is_dir():
        raise UserError(f"{store} does not exist: give the gateway's photo store folder (its --photo-store)")
    if not log.is_file():
        return {}  # a store nobody corrected anything in yet
    by_photo: dict[str, list[dict]] = {}
    read = set()
    for number, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            sha = record["sha256"]
            assert isinstance(sha, str) and isinstance(record["true_label"], str)
        except (ValueError, KeyError, AssertionError):
            report.dropped.append({"sha256": "", "label": "", "reason": "unreadable_record",
                                   "detail": f"{log}:{number} is not a correction record"})
            continue
        key = (sha, record.get("request_id"), record["true_label"])
        if key in read:
            report.repeated += 1
            continue
        read.add(key)
        report.corrections += 1
        by_photo.setdefault(sha, []).append(record)
    latest = {}
    for sha, records in by_photo.items():
        labels = sorted({r["true_label"] for r in records})
        if len(labels) > 1:
            report.dropped.append({"sha256": sha, "label": "", "reason": "disagreement",
                                   "detail": f"users corrected it to different labels: {', '.join(labels)}"})
            continue
        latest[sha] = max(records, key=lambda r: r.get("corrected_at", 0))
    return latest


def _near(hashes: np.ndarray, phash: int, distance: int) -> int | None:
    if distance < 0 or not hashes.size:
        return None
    gaps = np.bitwise_count(hashes ^ np.uint64(phash))
    close = np.flatnonzero(gaps <= distance)
    return int(close[0]) if close.size else None


def collect(store: str | Path, data: str | Path, out: str | Path, min_side: int = DEFAULT_MIN_SIDE,
            near_duplicate_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE, workers: int = 2,
            progress: bool = False, clock=time.time) -> CollectReport:
    store, data, out = Path(store), Path(data), Path(out)
    report = CollectReport()
    corrections = read_corrections(store, report)
    found = list_classes(data)
    classes = found.files
    existing: list[Inspected] = [i for i in _inspect_all(classes, min_side, workers, progress) if not i.reason]
    out_folders = found.folders  # label -> the folder of OUT its photos go to (the data's, when OUT is the data)
    if out.resolve() != data.resolve():
        out_folders = {}
        if out.is_dir() and any(p.is_dir() for p in out.iterdir()):
            collected = list_classes(out)
            existing += [i for i in _inspect_all(collected.files, min_side, workers, progress) if not i.reason]
            out_folders = collected.folders
    known_sha = {i.sha256: i for i in existing}
    pool = list(existing)  # photos a new one must not duplicate: existing, then each one collected
    hashes = np.array([i.phash for i in existing], dtype=np.uint64)
    rows = []
    for sha, record in sorted(corrections.items()):
        # NFC, as labels are: a model trained before they were may name a class in NFD (a Mac's folder name)
        label = unicodedata.normalize("NFC", record["true_label"])

        def drop(reason: str, detail: str) -> None:
            report.dropped.append({"sha256": sha, "label": label, "reason": reason, "detail": detail})

        if label not in classes:
            drop("unknown_class", f"{label!r} is not a class of {data} ({', '.join(sorted(classes))})")
            continue
        photo = next((p for p in (store / "corrected" / sha, store / "pending" / sha) if p.is_file()), None)
        if photo is None:
            drop("photo_missing", "the store no longer holds the photo (evicted, or kept by another replica)")
            continue
        item = inspect_file(photo, label, min_side)
        if item.reason:
            drop(item.reason, item.detail)
            continue
        if item.sha256 in known_sha:
            drop("duplicate", f"byte-identical to {known_sha[item.sha256].path}")
            continue
        twin = _near(hashes, item.phash, near_duplicate_distance)
        if twin is not None:
            drop("near_duplicate", f"looks like {pool[twin].path} (perceptual-hash distance "
                 f"{int(np.bitwise_count(np.uint64(pool[twin].phash) ^ np.uint64(item.phash)))})")
            continue
        # a folder OUT has for the label, else one named as the data's (a copy of OUT into the data then merges)
        folder = out_folders.get(label, out / found.folders[label].name)
        target = folder / f"{item.sha256}.{EXTENSIONS.get(item.image_format, 'img')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, target)
        item.path = target
        pool.append(item)
        known_sha[item.sha256] = item
        hashes = np.append(hashes, np.uint64(item.phash))
        row = {"sha256": item.sha256, "label": label, "predicted": record.get("predicted", ""),
               "model": record.get("model", ""), "version": record.get("version", ""),
               "identity": record.get("identity") or "",
               "request_id": record.get("request_id", ""), "answered_at": record.get("answered_at", ""),
               "corrected_at": record.get("corrected_at", ""), "collected_at": round(clock(), 3),
               "file": str(target.relative_to(out))}
        rows.append(row)
        report.collected.append(row)
    if rows:
        append_provenance(out / PROVENANCE, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "collect_report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def append_provenance(path: Path, rows: list[dict]) -> None:
    """``rows`` appended to the provenance file, under the columns its header has (a file written before a column
    was added keeps its header; the rows fill those columns); a new file gets PROVENANCE_FIELDS."""
    header = None
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header or PROVENANCE_FIELDS, restval="", extrasaction="ignore")
        if header is None:
            writer.writeheader()
        writer.writerows(rows)


def format_collect_summary(report: CollectReport, out: Path) -> str:
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(report.counts().items())) or "none"
    per_class = Counter(r["label"] for r in report.collected)
    classes = ", ".join(f"{label} {n}" for label, n in sorted(per_class.items())) or "none"
    repeated = f" (and {report.repeated} repeated lines)" if report.repeated else ""
    return (f"{report.corrections} corrections read{repeated}; {len(report.collected)} new photos collected into {out} "
            f"({classes}); dropped: {dropped}")
