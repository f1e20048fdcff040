"""`prepare`: a folder of class sub-folders -> a clean, split dataset manifest.

Every file is decoded with the preprocessing contract (so anything the model will later read is readable), then
corrupt, tiny, exact-duplicate (sha256) and near-duplicate (perceptual hash) photos are dropped, and so is every
copy of a photo filed under two classes (its label is unknown). Every usable photo is kept (fewer training photos
cost accuracy, which ``bench/accuracy_cv.py``'s ``<method>@N`` measures) or, when asked, each class is balanced to
N photos, and every photo gets a split. Both the balance and the split depend only on the file's sha256 (and the
seed), as in retrain.py's ``which_set``: adding photos never moves an existing photo to another split, but for one
case. A class needs a photo in train, validation (training refuses a class it cannot validate) and test, and a
small one often has none in validation or test by hash alone: a photo is then lent there (``lend_to_empty_splits``),
and goes back to its own split once the class has a photo of its own there.
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import imagehash
import numpy as np

from training_job.errors import UserError
from training_job.dataset import SPLITS, ManifestRow, write_manifest
from training_job.preprocessing import FILE_LIMITS, PREPROCESSING_VERSION, InvalidImage, decode_image, open_image

DEFAULT_PER_CLASS = None  # keep every usable photo; N balances the classes to N photos each
DEFAULT_VALIDATION_PCT = 10.0
DEFAULT_TEST_PCT = 10.0
DEFAULT_DEMO_PCT = 5.0  # photos held out to show the served model; every other unseen photo is in test
IMBALANCE_WARNING_RATIO = 2.0  # largest class / smallest class kept
DEFAULT_MIN_SIDE = 64
DEFAULT_NEAR_DUPLICATE_DISTANCE = 4  # phash Hamming distance; resized/recompressed copies land at 0-2
FEW_PHOTOS_WARNING = 20  # retrain.py warns below 20 photos per class
_EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)
_HASH_BUCKETS = 10_000
# The splits every class needs a photo in, filled in this order: train learns it, validation stops training and
# calibrates it, test measures it. Demo photos only show the served model.
NEEDED_SPLITS = ("train", "validation", "test")


@dataclass
class Inspected:
    """What decoding one file found; ``reason`` is set when the file cannot be used at all."""

    path: Path
    label: str
    size_bytes: int = 0
    sha256: str = ""
    width: int = 0
    height: int = 0
    image_format: str = ""
    phash: int = -1
    reason: str = ""
    detail: str = ""


@dataclass
class Dropped:
    path: str
    label: str
    reason: str
    detail: str


@dataclass
class Lent:
    """A photo moved from the split its hash gave it (``from_split``) to one its class had no photo in."""

    path: str
    label: str
    from_split: str
    to_split: str

    def to_json(self) -> dict:
        return {"path": self.path, "label": self.label, "from": self.from_split, "to": self.to_split}


@dataclass
class PrepareReport:
    source: str
    manifest: str
    preprocessing_version: str
    params: dict
    classes: dict = field(default_factory=dict)
    dropped: list[Dropped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    lent: list[Lent] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["dropped_by_reason"] = dict(Counter(d.reason for d in self.dropped))
        out["lent"] = [lent.to_json() for lent in self.lent]
        return out


def split_percentage(sha256: str, seed: int = 0, salt: str = "split") -> float:
    """A stable number in [0, 100) for a photo: a function of its bytes' hash, the seed and a purpose salt."""
    digest = hashlib.sha256(f"{salt}:{seed}:{sha256}".encode()).hexdigest()
    return (int(digest[:15], 16) % _HASH_BUCKETS) * 100.0 / _HASH_BUCKETS


def which_split(sha256: str, validation_pct: float, test_pct: float, demo_pct: float, seed: int = 0) -> str:
    pct = split_percentage(sha256, seed)
    return next(split for split, (low, high) in split_ranges(validation_pct, test_pct, demo_pct).items()
                if low <= pct < high)


def split_ranges(validation_pct: float, test_pct: float, demo_pct: float) -> dict[str, tuple[float, float]]:
    """The range [low, high) of ``split_percentage`` each split takes (validation's first, train's last)."""
    test_from, demo_from = validation_pct, validation_pct + test_pct
    train_from = demo_from + demo_pct
    return {"validation": (0.0, test_from), "test": (test_from, demo_from), "demo": (demo_from, train_from),
            "train": (train_from, 100.0)}


def lend_to_empty_splits(rows: list[ManifestRow], ranges: dict[str, tuple[float, float]],
                         seed: int = 0) -> tuple[list[ManifestRow], list[Lent]]:
    """One class's rows, each of NEEDED_SPLITS (of a non-empty range) given a photo when the hashes put none
    there, lent from ``_lender``'s split: the photo whose hash lies nearest the empty split's range (the one whose
    split a small shift of the ranges would change first). Returns the rows and what was lent."""
    rows, lent = list(rows), []
    for split in NEEDED_SPLITS:
        low, high = ranges[split]
        counts = Counter(r.split for r in rows)
        lender = _lender(counts)
        if high <= low or counts[split] or lender is None:
            continue

        def distance(row: ManifestRow) -> tuple[float, str]:
            pct = split_percentage(row.sha256, seed)
            return max(low - pct, pct - high, 0.0), row.sha256

        i = min((i for i, r in enumerate(rows) if r.split == lender), key=lambda i: distance(rows[i]))
        rows[i] = replace(rows[i], split=split)
        lent.append(Lent(rows[i].path, rows[i].label, lender, split))
    return rows, lent


def _lender(counts: Counter) -> str | None:
    """The split a class's photo is lent from: demo, which only shows the served model, while it has one; else the
    largest (train first among equals) while it keeps one; None when none can."""
    if counts["demo"]:
        return "demo"
    largest = min(counts, key=lambda s: (-counts[s], s != "train"), default=None)
    return largest if largest is not None and counts[largest] >= 2 else None


def _balance_key(item: Inspected, seed: int) -> str:
    # Salted differently from the split so that keeping "the smallest hashes" does not skew the split shares.
    return hashlib.sha256(f"balance:{seed}:{item.sha256}".encode()).hexdigest()


def inspect_file(path: Path, label: str, min_side: int = DEFAULT_MIN_SIDE) -> Inspected:
    """Read and decode one file with the contract; never raises for a bad photo."""
    item = Inspected(path=path, label=label)
    try:
        data = path.read_bytes()
    except OSError as exc:
        item.reason, item.detail = "unreadable", f"cannot read the file: {exc.strerror or exc}"
        return item
    item.size_bytes = len(data)
    item.sha256 = hashlib.sha256(data).hexdigest()
    try:
        header = open_image(data, FILE_LIMITS)
        item.image_format = header.format or ""
        width, height = header.size
        try:
            if header.getexif().get(_EXIF_ORIENTATION) in _SWAPPED_ORIENTATIONS:
                width, height = height, width
        except Exception:  # a broken EXIF block is not a reason to drop a photo the decoder accepts
            pass
        item.width, item.height = width, height
        decoded = decode_image(data, limits=FILE_LIMITS)
    except InvalidImage as exc:
        item.reason, item.detail = exc.code, exc.message
        return item
    if min(item.width, item.height) < min_side:
        item.reason = "tiny"
        item.detail = f"{item.width}x{item.height} px; the shorter side must be at least {min_side} px"
        return item
    item.phash = int(str(imagehash.phash(decoded)), 16)
    return item


# Folders a photo folder may hold that are not classes: macOS's zip metadata (AppleDouble "._" files).
NOT_CLASSES = frozenset({"__MACOSX"})


def _class_files(folder: Path) -> list[Path]:
    """Every file under a class folder, following links to folders (photos kept on another disk) but reading each
    real folder once (a link back up the tree ends there); hidden files and folders skipped."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in names if not n.startswith(".") and (Path(root) / n).is_file()]
    return sorted(files)


def class_label(folder_name: str) -> str:
    """The label a class folder gives its photos: the folder's name in Unicode NFC, as typed text is (a Mac may
    store "é" as "e" plus an accent, which a label typed by a client would not match). A name whose bytes are not
    UTF-8 (Python holds them as surrogate escapes: a folder written on Windows or an old Linux, then copied here) is
    read as Windows-1252, the encoding such names nearly always have; its five unassigned bytes as Latin-1."""
    raw = os.fsencode(folder_name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in raw)
    return unicodedata.normalize("NFC", text)


@dataclass
class ClassFolders:
    """The classes of a photo folder: each label (``class_label`` of its folder's name) with its folder and files;
    the files lying outside class folders; warnings about folder names."""
    files: dict[str, list[Path]]
    folders: dict[str, Path]
    ignored: list[str]
    warnings: list[str]


def list_classes(source: Path) -> ClassFolders:
    if not source.exists():
        raise UserError(f"the photo folder {source} does not exist")
    if not source.is_dir():
        raise UserError(f"{source} is not a folder; expected a folder with one sub-folder of photos per class")
    found = ClassFolders({}, {}, [], [])
    for entry in sorted(source.iterdir()):
        if entry.name.startswith(".") or entry.name in NOT_CLASSES:
            continue
        if not entry.is_dir():
            found.ignored.append(str(entry))
            continue
        label = class_label(entry.name)
        if label in found.folders:
            raise UserError(f"the folders {found.folders[label].name!r} and {entry.name!r} in {source} both give "
                            f"the class label '{label}'; merge them or rename one")
        if any("\udc80" <= char <= "\udcff" for char in entry.name):  # how Python holds bytes that are not UTF-8
            found.warnings.append(f"the name of the folder {entry.name!r} is not UTF-8; its photos are labelled "
                                  f"'{label}' (the name read as Windows-1252): rename the folder to choose another")
        found.folders[label] = entry
        found.files[label] = _class_files(entry)
    if not found.files:
        loose = (f" (it holds {len(found.ignored)} file(s) directly; move them into a folder named after their "
                 "class)") if found.ignored else ""
        raise UserError(
            f"{source} has no class sub-folders{loose}; expected {source}/<class name>/<photos>, e.g. "
            f"{source}/amanita_muscaria/photo1.jpg"
        )
    if not any(found.files.values()):
        raise UserError(f"the class folders in {source} ({', '.join(found.files)}) contain no files")
    return found


def _inspect_all(classes: dict[str, list[Path]], min_side: int, workers: int, progress: bool) -> list[Inspected]:
    from tqdm import tqdm

    jobs = [(path, label) for label, paths in classes.items() for path in paths]
    # Pillow releases the GIL while decoding and resizing, so threads use both cores without pickling photos.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda job: inspect_file(job[0], job[1], min_side), jobs)
        return list(tqdm(results, total=len(jobs), desc="decoding photos", unit="photo", disable=not progress))


def _drop_duplicates(items: list[Inspected], distance: int, dropped: list[Dropped]) -> list[Inspected]:
    """Exact (sha256) then near (phash) duplicates, across all classes; the largest, then lowest-hash, photo wins.
    A photo whose copies are filed under different classes has no label anyone can trust (one of them is wrong and
    nothing says which): every copy is dropped as a ``label_conflict``."""
    ordered = sorted(items, key=lambda i: (-(i.width * i.height), i.sha256, str(i.path)))
    copies: dict[str, list[Dropped]] = {}  # the sha256 of each photo kept so far -> its copies, dropped
    by_sha: dict[str, Inspected] = {}
    kept: list[Inspected] = []
    for item in ordered:
        first = by_sha.get(item.sha256)
        if first is not None:
            copies[first.sha256].append(Dropped(str(item.path), item.label, "duplicate",
                                                f"byte-identical to {first.path}{_other_class(first, item)}"))
            continue
        by_sha[item.sha256] = item
        copies[item.sha256] = []
        kept.append(item)
    unique = kept
    if distance >= 0:
        unique = []
        hashes = np.zeros(len(kept), dtype=np.uint64)  # phashes of ``unique``, for a vectorised Hamming distance
        for item in kept:
            gaps = np.bitwise_count(hashes[: len(unique)] ^ np.uint64(item.phash))
            close = np.flatnonzero(gaps <= distance)
            if close.size:
                twin, gap = unique[close[0]], int(gaps[close[0]])
                copies[twin.sha256] += [Dropped(str(item.path), item.label, "near_duplicate",
                                                f"looks like {twin.path}{_other_class(twin, item)} (perceptual-hash "
                                                f"distance {gap})"), *copies.pop(item.sha256)]
                continue
            hashes[len(unique)] = item.phash
            unique.append(item)
    usable = []
    for item in unique:
        group = copies[item.sha256]
        labels = sorted({item.label, *(copy.label for copy in group)})
        if len(labels) == 1:
            dropped.extend(group)
            usable.append(item)
            continue
        detail = (f"the same photo is filed under classes {', '.join(repr(label) for label in labels)} "
                  f"({len(group) + 1} copies): its label is unknown")
        dropped.extend(Dropped(path, label, "label_conflict", detail)
                       for path, label in [(str(item.path), item.label), *((c.path, c.label) for c in group)])
    return usable


def _other_class(kept: Inspected, copy: Inspected) -> str:
    return "" if kept.label == copy.label else f" in class '{kept.label}'"


def _check_params(per_class: int | None, validation_pct: float, test_pct: float, demo_pct: float) -> None:
    for name, value in (("validation", validation_pct), ("test", test_pct), ("demo", demo_pct)):
        if not 0 <= value < 100:
            raise UserError(f"the {name} percentage must be between 0 and 100, got {value}")
    if validation_pct + test_pct + demo_pct >= 100:
        raise UserError(
            f"validation + test + demo percentages add up to {validation_pct + test_pct + demo_pct}; "
            "they must leave something for training (< 100)"
        )
    if per_class is not None and per_class < 1:
        raise UserError(f"--per_class must be at least 1 (or 0 for no limit), got {per_class}")


def prepare_dataset(
    source_dir: str | Path,
    out_dir: str | Path,
    per_class: int | None = DEFAULT_PER_CLASS,
    validation_pct: float = DEFAULT_VALIDATION_PCT,
    test_pct: float = DEFAULT_TEST_PCT,
    demo_pct: float = DEFAULT_DEMO_PCT,
    seed: int = 0,
    *,
    min_side: int = DEFAULT_MIN_SIDE,
    near_duplicate_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE,
    workers: int | None = None,
    progress: bool = True,
) -> list[ManifestRow]:
    """Write ``out_dir/manifest.csv`` and ``out_dir/report.json``; return the manifest rows.

    ``per_class=None`` (or 0) keeps every usable photo. Raises ``UserError`` for input that cannot make a dataset
    (after writing the report, so the user can see why).
    """
    per_class = per_class or None
    _check_params(per_class, validation_pct, test_pct, demo_pct)
    source = Path(source_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if out == source or source in out.parents:
        raise UserError(f"--out {out} is inside the photo folder {source}; it would be read as a class. "
                        "Choose a folder outside it")
    found = list_classes(source)
    classes = found.files
    report = PrepareReport(
        source=str(source),
        manifest=str(out / "manifest.csv"),
        preprocessing_version=PREPROCESSING_VERSION,
        params=dict(per_class=per_class, validation_pct=validation_pct, test_pct=test_pct, demo_pct=demo_pct,
                    seed=seed, min_side=min_side, near_duplicate_distance=near_duplicate_distance),
        ignored=found.ignored,
        warnings=list(found.warnings),
    )
    items = _inspect_all(classes, min_side, workers or os.cpu_count() or 2, progress)
    good = []
    for item in items:
        if item.reason:
            report.dropped.append(Dropped(str(item.path), item.label, item.reason, item.detail))
        else:
            good.append(item)
    unique = _drop_duplicates(good, near_duplicate_distance, report.dropped)

    rows: list[ManifestRow] = []
    empty_classes = []
    ranges = split_ranges(validation_pct, test_pct, demo_pct)
    for label, paths in classes.items():
        members = sorted((i for i in unique if i.label == label), key=lambda i: _balance_key(i, seed))
        if per_class is not None and len(members) > per_class:
            for extra in members[per_class:]:
                report.dropped.append(Dropped(str(extra.path), label, "balance",
                                              f"class has more than {per_class} usable photos"))
            members = members[:per_class]
        class_rows, lent = lend_to_empty_splits([
            ManifestRow(str(i.path), label, i.sha256, which_split(i.sha256, validation_pct, test_pct, demo_pct, seed),
                        i.width, i.height, i.size_bytes)
            for i in members
        ], ranges, seed)
        rows.extend(class_rows)
        report.lent.extend(lent)
        for moved in lent:
            report.warnings.append(f"class '{label}' had no photo in {moved.to_split} by the photos' hashes: "
                                   f"{Path(moved.path).name} is lent there from {moved.from_split} (every class "
                                   f"needs one in {', '.join(NEEDED_SPLITS)})")
        renamed = sum(1 for i in members if not _extension_matches(i.path, i.image_format))
        report.classes[label] = {
            "files": len(paths),
            "kept": len(class_rows),
            "dropped": dict(Counter(d.reason for d in report.dropped if d.label == label)),
            "splits": {s: sum(1 for r in class_rows if r.split == s) for s in SPLITS},
            "format_differs_from_extension": renamed,
        }
        if not class_rows:
            empty_classes.append(label)
        elif per_class is not None and len(class_rows) < per_class:
            report.warnings.append(f"class '{label}' has only {len(class_rows)} usable photos (asked for {per_class})")
        if class_rows and len(class_rows) < FEW_PHOTOS_WARNING:
            report.warnings.append(f"class '{label}' has fewer than {FEW_PHOTOS_WARNING} photos; "
                                   "the model will not learn it well")
        missing = [s for s in SPLITS if report.classes[label]["splits"][s] == 0 and ranges[s][0] < ranges[s][1]]
        if class_rows and missing:
            report.warnings.append(f"class '{label}' has no photos in split(s): {', '.join(missing)}")

    kept = {label: c["kept"] for label, c in report.classes.items() if c["kept"]}
    if kept and max(kept.values()) > IMBALANCE_WARNING_RATIO * min(kept.values()):
        largest, smallest = max(kept, key=kept.get), min(kept, key=kept.get)
        report.warnings.append(
            f"classes are imbalanced: '{largest}' has {kept[largest]} usable photos, '{smallest}' {kept[smallest]}; "
            f"the model will lean towards the larger classes (--per_class {kept[smallest]} balances them)")

    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.csv").unlink(missing_ok=True)  # an earlier folder's, which must not outlive this report
        _write_json(report.to_json(), out / "report.json")
    except OSError as exc:
        raise UserError(f"cannot write to {out}: {exc.strerror or exc}") from None
    if empty_classes:
        reasons = {label: report.classes[label]["dropped"] or {"no files": 0} for label in empty_classes}
        first = {label: next((d for d in report.dropped if d.label == label), None) for label in empty_classes}
        raise UserError(
            "no usable photos in class " + "; ".join(
                f"'{label}' ({_describe_counts(reasons[label])}"
                + (f"; the first, {Path(first[label].path).name}: {first[label].detail}" if first[label] else "")
                + ")" for label in empty_classes)
            + f". Add photos or remove the folder. Details: {out / 'report.json'}"
        )
    if len(report.classes) < 2:
        raise UserError(f"only one class ('{next(iter(report.classes))}') in {source}; a classifier needs at least "
                        "two class sub-folders")
    write_manifest(rows, out / "manifest.csv")
    return rows


def _extension_matches(path: Path, image_format: str) -> bool:
    ext = path.suffix.lower().lstrip(".")
    known = {"JPEG": {"jpg", "jpeg", "jpe", "jfif"}, "PNG": {"png"}, "WEBP": {"webp"}, "GIF": {"gif"},
             "TIFF": {"tif", "tiff"}, "BMP": {"bmp"}}
    return ext in known.get(image_format, {image_format.lower()})


def _describe_counts(counts: dict) -> str:
    return ", ".join(f"{n} {reason}" if n else reason for reason, n in counts.items())


def _write_json(data: dict, path: Path) -> None:
    """``data`` as UTF-8 JSON, accents as themselves; a path's undecodable bytes (surrogate escapes) are written as
    JSON's \\udcXX escapes, which json.loads reads back as the same path."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", errors="backslashreplace")
    tmp.replace(path)


def read_report(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "report.json").read_text())


def format_summary(report: dict) -> str:
    """The human summary of a report.json: per class kept/dropped/splits, then the warnings."""
    lines = [f"prepared {report['source']} -> {report['manifest']}"]
    width = max(len(label) for label in report["classes"]) if report["classes"] else 5
    lines.append(f"  {'class':<{width}}  files  kept  " + "  ".join(f"{s:>10}" for s in SPLITS) + "  dropped")
    for label, c in report["classes"].items():
        dropped = _describe_counts(c["dropped"]) or "-"
        lines.append(f"  {label:<{width}}  {c['files']:>5}  {c['kept']:>4}  "
                     + "  ".join(f"{c['splits'][s]:>10}" for s in SPLITS) + f"  {dropped}")
    totals = report.get("dropped_by_reason", {})
    if totals:
        lines.append("dropped: " + _describe_counts(totals))
    if report.get("ignored"):
        lines.append(f"ignored {len(report['ignored'])} file(s) outside class folders")
    lines.extend(f"warning: {w}" for w in report.get("warnings", []))
    return "\n".join(lines)
