"""`prepare`: every kind of bad file is dropped with its reason; balance and splits are deterministic and stable."""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from tests.support import MUSHROOMS
from training_job import cli
from training_job.dataset import SPLITS, ManifestRow, read_manifest
from training_job.prepare import (
    DEFAULT_DEMO_PCT, DEFAULT_TEST_PCT, DEFAULT_VALIDATION_PCT, inspect_file, lend_to_empty_splits, prepare_dataset,
    read_report, split_percentage, split_ranges, which_split,
)
from training_job.preprocessing import decode_image
from training_job.train import check_trainable

NOT_JPEG_NAMED_JPG = ["amanita_muscaria/train_amanita_muscaria_272.jpg",  # WEBP
                      "amanita_muscaria/train_amanita_muscaria_441.jpg"]  # PNG


@lru_cache(maxsize=None)
def distinct_photos(species: str, count: int) -> tuple[Path, ...]:
    """Real photos of one species that are far from each other in perceptual-hash space (the source has near
    duplicates, which prepare would rightly drop)."""
    chosen, hashes = [], []
    for path in sorted((MUSHROOMS / species).iterdir()):
        img = decode_image(path.read_bytes())
        if min(img.size) < 100:
            continue
        h = imagehash.phash(img)
        if all(h - other > 12 for other in hashes):
            chosen.append(path)
            hashes.append(h)
        if len(chosen) == count:
            return tuple(chosen)
    raise AssertionError(f"not {count} distinct photos of {species}")


def link_photos(folder: Path, photos, names=None) -> list[Path]:
    """Symlinks, so the shared photos are read in place, not copied."""
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for i, photo in enumerate(photos):
        link = folder / (names[i] if names else photo.name)
        link.symlink_to(photo)
        links.append(link)
    return links


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def test_each_kind_of_bad_file_is_dropped_with_its_reason(tmp_path):
    source = tmp_path / "photos"
    good = distinct_photos("amanita_muscaria", 4)
    link_photos(source / "fly agaric", good[:3], ["plain.jpg", "space in name.jpg", "ünïcödé.jpg"])
    link_photos(source / "bolete", distinct_photos("boletus_edulis", 3))
    cls = source / "fly agaric"
    original = good[0].read_bytes()
    (cls / "z exact copy.jpg").write_bytes(original)  # of identical files the first path is kept
    smaller = decode_image(original)
    smaller = smaller.resize((smaller.width * 7 // 10, smaller.height * 7 // 10))
    (cls / "near copy.jpg").write_bytes(encode(smaller, "JPEG", quality=70))
    (cls / "webp named.jpg").write_bytes(encode(decode_image(good[3].read_bytes()), "WEBP"))
    (cls / "truncated.jpg").write_bytes(good[1].read_bytes()[:5000])
    (cls / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (cls / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>")
    (cls / "empty.jpg").write_bytes(b"")
    (cls / "tiny.png").write_bytes(encode(Image.new("RGB", (40, 300), (9, 99, 9)), "PNG"))
    (cls / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (source / "README.txt").write_text("a file outside the class folders")

    rows = prepare_dataset(source, tmp_path / "out", per_class=250, progress=False)

    report = read_report(tmp_path / "out")
    reasons = {Path(d["path"]).name: d["reason"] for d in report["dropped"]}
    assert reasons == {
        "z exact copy.jpg": "duplicate",
        "near copy.jpg": "near_duplicate",
        "truncated.jpg": "corrupt",
        "garbage.jpg": "not_an_image",
        "page.jpg": "not_an_image",
        "empty.jpg": "empty",
        "tiny.png": "tiny",
    }
    kept = {Path(r.path).name for r in rows if r.label == "fly agaric"}
    assert kept == {"plain.jpg", "space in name.jpg", "ünïcödé.jpg", "webp named.jpg"}
    assert report["classes"]["fly agaric"]["format_differs_from_extension"] == 1
    assert report["ignored"] == [str((source / "README.txt").resolve())]
    assert len([r for r in rows if r.label == "bolete"]) == 3
    near = next(d for d in report["dropped"] if d["reason"] == "near_duplicate")
    assert "plain.jpg" in near["detail"], "the larger original is kept, the recompressed copy dropped"
    assert read_manifest(tmp_path / "out" / "manifest.csv") == sorted(rows, key=lambda r: (r.label, r.split, r.sha256))


def test_a_photo_filed_under_two_classes_is_dropped_from_both(tmp_path):
    """The shared photos hold such pairs (a bolete filed as both edulis and erythropus): one of the two labels is
    wrong and nothing says which, so keeping either copy teaches the model a label that may be false."""
    source = tmp_path / "photos"
    fly, bolete = distinct_photos("amanita_muscaria", 4), distinct_photos("boletus_edulis", 4)
    link_photos(source / "fly agaric", fly)
    link_photos(source / "bolete", bolete)
    (source / "bolete" / "filed twice.jpg").write_bytes(fly[0].read_bytes())  # byte-identical
    smaller = decode_image(fly[1].read_bytes())
    smaller = smaller.resize((smaller.width * 7 // 10, smaller.height * 7 // 10))
    (source / "bolete" / "recompressed.jpg").write_bytes(encode(smaller, "JPEG", quality=70))  # a near copy
    (source / "fly agaric" / "z copy.jpg").write_bytes(fly[2].read_bytes())  # an ordinary duplicate

    rows = prepare_dataset(source, tmp_path / "out", progress=False)

    report = read_report(tmp_path / "out")
    conflicts = {(d["label"], Path(d["path"]).name) for d in report["dropped"] if d["reason"] == "label_conflict"}
    assert conflicts == {("fly agaric", fly[0].name), ("bolete", "filed twice.jpg"),
                         ("fly agaric", fly[1].name), ("bolete", "recompressed.jpg")}
    assert all("'bolete'" in d["detail"] and "'fly agaric'" in d["detail"]
               for d in report["dropped"] if d["reason"] == "label_conflict")
    assert {Path(r.path).name for r in rows} == {p.name for p in fly[2:] + bolete}
    assert [d["reason"] for d in report["dropped"] if d["reason"] != "label_conflict"] == ["duplicate"]
    assert report["classes"]["bolete"]["dropped"] == {"label_conflict": 2}


def test_an_unreadable_file_is_reported_not_raised(tmp_path):
    item = inspect_file(tmp_path, "a")  # a directory cannot be read as a file
    assert item.reason == "unreadable" and "cannot read" in item.detail


def test_the_shared_photos_that_are_not_jpeg_are_kept():
    for name in NOT_JPEG_NAMED_JPG:
        item = inspect_file(MUSHROOMS / name, "amanita_muscaria")
        assert item.reason == "" and item.image_format in ("WEBP", "PNG")


def test_splits_are_stable_when_photos_are_added_and_runs_are_reproducible(tmp_path):
    source = tmp_path / "photos"
    first = {"amanita_muscaria": 24, "boletus_edulis": 24}
    for species, n in first.items():
        link_photos(source / species, distinct_photos(species, 36)[:n])
    rows = prepare_dataset(source, tmp_path / "a", per_class=0, progress=False)
    before = {r.sha256: r.split for r in rows}
    assert len(before) == 48
    lent_paths = {lent["path"] for lent in read_report(tmp_path / "a")["lent"]}
    lent = {r.sha256 for r in rows if r.path in lent_paths}
    prepare_dataset(source, tmp_path / "b", per_class=0, progress=False)
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()

    for species in first:
        link_photos(source / species, distinct_photos(species, 36)[24:])
    after = {r.sha256: r.split for r in prepare_dataset(source, tmp_path / "c", per_class=0, progress=False)}
    assert len(after) == 72
    moved = {sha for sha in before if after[sha] != before[sha]}
    assert moved <= lent, "adding photos moved an existing photo to another split"
    # a photo lent to a split its class had none in goes back to its own once the class has one there
    assert all(after[sha] == which_split(sha, DEFAULT_VALIDATION_PCT, DEFAULT_TEST_PCT, DEFAULT_DEMO_PCT)
               for sha in moved)

    reseeded = {r.sha256: r.split for r in prepare_dataset(source, tmp_path / "d", per_class=0, seed=7,
                                                           progress=False)}
    assert reseeded != after, "the seed changes the split"


def hashed_to_train(species: str, count: int) -> list[Path]:
    """``count`` real, distinct photos of ``species`` whose hashes all put them in train: a class that the hash
    split alone leaves without a validation or test photo."""
    chosen = [p for p in distinct_photos(species, 30)
              if which_split(sha256(p), DEFAULT_VALIDATION_PCT, DEFAULT_TEST_PCT, DEFAULT_DEMO_PCT) == "train"]
    assert len(chosen) >= count
    return chosen[:count]


def test_a_class_whose_hashes_leave_validation_or_test_empty_gets_a_photo_lent_there(tmp_path, capsys):
    """A hobbyist's folder of a dozen photos a species: by hash alone a class has no validation photo about one
    time in four (0.9 ** 12), and training refused the whole folder. Each class of three photos or more now has
    one in train, validation and test: lent from its demo photos, else its largest split, the photo whose hash lies
    nearest the empty split's range, and the report says which."""
    source = tmp_path / "photos"
    classes = {"amanita_muscaria": hashed_to_train("amanita_muscaria", 6),
               "boletus_edulis": hashed_to_train("boletus_edulis", 6),
               "boletus_erythropus": hashed_to_train("boletus_erythropus", 2)}
    for species, photos in classes.items():
        link_photos(source / species, photos)
    rows = prepare_dataset(source, tmp_path / "out", progress=False)

    splits = {label: Counter(r.split for r in rows if r.label == label) for label in classes}
    assert splits["amanita_muscaria"] == splits["boletus_edulis"] == {"train": 4, "validation": 1, "test": 1}
    assert splits["boletus_erythropus"] == {"train": 1, "validation": 1}  # two photos: train keeps one
    report = read_report(tmp_path / "out")
    for species, photos in classes.items():
        # train's range is the top of the hash's: the lowest hashes lie nearest validation's, then test's
        lowest = [p.name for p in sorted(photos, key=lambda p: split_percentage(sha256(p)))]
        lent = [(Path(l["path"]).name, l["from"], l["to"]) for l in report["lent"] if l["label"] == species]
        expected = [(lowest[0], "train", "validation"), (lowest[1], "train", "test")]
        assert lent == expected[:len(photos) - 1]
        assert report["classes"][species]["splits"] == {**dict.fromkeys(SPLITS, 0), **splits[species]}
    assert any("'boletus_edulis'" in w and "lent" in w and lowest_name in w
               for w in report["warnings"]
               for lowest_name in [min(classes["boletus_edulis"], key=lambda p: split_percentage(sha256(p))).name])
    assert any("'boletus_erythropus' has no photos in split(s): test, demo" in w for w in report["warnings"])
    check_trainable([r for r in rows if r.label != "boletus_erythropus"])  # refused before: no validation photo


def rows_hashed_to(*splits: str) -> list[ManifestRow]:
    """One class's manifest rows, the i-th hashed to ``splits[i]`` by the default percentages."""
    shas = (hashlib.sha256(str(i).encode()).hexdigest() for i in range(10_000))
    by_split: dict[str, list[str]] = {}
    for sha in shas:
        split = which_split(sha, DEFAULT_VALIDATION_PCT, DEFAULT_TEST_PCT, DEFAULT_DEMO_PCT)
        by_split.setdefault(split, []).append(sha)
    return [ManifestRow(f"/photos/{i}.jpg", "c", by_split[split].pop(), split, 100, 100, 1000)
            for i, split in enumerate(splits)]


@pytest.mark.parametrize("hashed, lent", [
    (("train", "train", "train"), [("train", "validation"), ("train", "test")]),
    (("train", "demo", "demo"), [("demo", "validation"), ("demo", "test")]),
    (("demo", "demo", "demo"), [("demo", "train"), ("demo", "validation"), ("demo", "test")]),
    (("validation", "validation", "validation"), [("validation", "train"), ("validation", "test")]),
    (("train", "test", "demo", "demo"), [("demo", "validation")]),
    (("train", "validation", "test", "demo"), []),
    (("train", "test"), []),  # two photos: neither split can spare one
])
def test_a_photo_is_lent_from_demo_first_then_from_the_largest_split_while_it_keeps_one(hashed, lent):
    rows = rows_hashed_to(*hashed)
    ranges = split_ranges(DEFAULT_VALIDATION_PCT, DEFAULT_TEST_PCT, DEFAULT_DEMO_PCT)
    after, moved = lend_to_empty_splits(rows, ranges)
    assert [(m.from_split, m.to_split) for m in moved] == lent
    if len(rows) >= 3:
        assert {"train", "validation", "test"} <= {r.split for r in after}
    assert sorted(r.sha256 for r in after) == sorted(r.sha256 for r in rows)  # moved, never copied or lost


def test_split_shares_follow_the_percentages():
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000)]
    splits = [which_split(s, 10, 10, 20) for s in shas]
    shares = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert shares == pytest.approx({"train": 0.6, "validation": 0.1, "test": 0.1, "demo": 0.2}, abs=0.015)
    assert [which_split(s, 10, 10, 20) for s in shas[:100]] == splits[:100]
    assert set(which_split(s, 0, 0, 0) for s in shas[:100]) == {"train"}


def test_by_default_every_usable_photo_is_kept_and_three_quarters_of_them_train():
    """More training photos are more accuracy (bench/results/accuracy_cv_photos.json), so neither a class cap nor a
    large demo share holds photos back unless asked."""
    from training_job.cli import build_parser
    from training_job.prepare import DEFAULT_DEMO_PCT, DEFAULT_TEST_PCT, DEFAULT_VALIDATION_PCT

    parser = build_parser()
    for command in (["prepare"], ["run"]):
        args = parser.parse_args(command)
        assert not args.per_class
        assert (args.validation_percentage, args.testing_percentage, args.demo_percentage) == (
            DEFAULT_VALIDATION_PCT, DEFAULT_TEST_PCT, DEFAULT_DEMO_PCT)
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000)]
    splits = [which_split(s, DEFAULT_VALIDATION_PCT, DEFAULT_TEST_PCT, DEFAULT_DEMO_PCT) for s in shas]
    assert splits.count("train") / len(splits) >= 0.74 and splits.count("demo") > 0


def test_imbalanced_classes_are_kept_whole_with_a_warning_that_names_the_balancing_flag(tmp_path):
    source = tmp_path / "photos"
    link_photos(source / "many", distinct_photos("amanita_muscaria", 16))
    link_photos(source / "few", distinct_photos("boletus_edulis", 5))
    rows = prepare_dataset(source, tmp_path / "all", progress=False)
    assert sum(r.label == "many" for r in rows) == 16
    warnings = read_report(tmp_path / "all")["warnings"]
    assert any("imbalanced" in w and "'many' has 16" in w and "--per_class 5" in w for w in warnings)
    prepare_dataset(source, tmp_path / "balanced", per_class=5, progress=False)
    assert not any("imbalanced" in w for w in read_report(tmp_path / "balanced")["warnings"])


def test_balance_keeps_a_stable_subset_and_warns_about_small_classes(tmp_path):
    source = tmp_path / "photos"
    link_photos(source / "many", distinct_photos("amanita_muscaria", 16))
    link_photos(source / "few", distinct_photos("boletus_edulis", 5))

    ten = prepare_dataset(source, tmp_path / "ten", per_class=10, progress=False)
    twelve = prepare_dataset(source, tmp_path / "twelve", per_class=12, progress=False)

    kept_ten = {r.sha256 for r in ten if r.label == "many"}
    kept_twelve = {r.sha256 for r in twelve if r.label == "many"}
    assert len(kept_ten) == 10 and len(kept_twelve) == 12
    assert kept_ten < kept_twelve, "a larger N keeps a superset: the choice is by hash, not by chance"
    assert len([r for r in ten if r.label == "few"]) == 5
    report = read_report(tmp_path / "ten")
    assert report["classes"]["many"]["dropped"] == {"balance": 6}
    assert any("'few' has only 5 usable photos" in w for w in report["warnings"])


def _cli_error(capsys, *argv) -> str:
    assert cli.main(["prepare", *map(str, argv)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_bad_input_gets_a_clear_message(tmp_path, capsys):
    out = tmp_path / "out"
    assert "does not exist" in _cli_error(capsys, "--source", tmp_path / "missing", "--out", out)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no class sub-folders" in _cli_error(capsys, "--source", empty, "--out", out)

    (empty / "a").mkdir()
    (empty / "b").mkdir()
    assert "contain no files" in _cli_error(capsys, "--source", empty, "--out", out)

    single = tmp_path / "single"
    link_photos(single / "only_one", distinct_photos("boletus_edulis", 3))
    assert "only one class" in _cli_error(capsys, "--source", single, "--out", out)

    (single / "junk class").mkdir()
    (single / "junk class" / "x.jpg").write_bytes(b"<html></html>")
    (single / "junk class" / "y.jpg").write_bytes(b"")
    message = _cli_error(capsys, "--source", single, "--out", out)
    assert "no usable photos in class 'junk class'" in message
    assert "not_an_image" in message and "empty" in message
    # the reason of the class's first photo, so that one fault behind them all (a folder of iPhone photos, HEIC)
    # shows without opening the report
    assert "the first, x.jpg: not an image: this is an HTML/XML document" in message
    assert json.loads((out / "report.json").read_text())["classes"]["junk class"]["kept"] == 0
    assert not (out / "manifest.csv").exists()

    assert "add up to" in _cli_error(capsys, "--source", single, "--out", out, "--demo-percentage", "85")
    assert "inside the photo folder" in _cli_error(capsys, "--source", single, "--out", single / "prepared")
    (tmp_path / "a file").write_text("x")
    assert "cannot write" in _cli_error(capsys, "--source", single, "--out", tmp_path / "a file" / "out")


def test_cli_on_a_subset_of_the_shared_photos(tmp_path, capsys):
    source = tmp_path / "photos"
    for species in sorted(p.name for p in MUSHROOMS.iterdir()):
        link_photos(source / species, sorted((MUSHROOMS / species).iterdir())[:25])
    for name in NOT_JPEG_NAMED_JPG:
        link = source / name
        if not link.exists():
            link.symlink_to(MUSHROOMS / name)

    assert cli.main(["prepare", "--source", str(source), "--out", str(tmp_path / "out"), "--per-class", "20"]) == 0

    printed = capsys.readouterr().out
    rows = read_manifest(tmp_path / "out" / "manifest.csv")
    labels = sorted({r.label for r in rows})
    assert labels == sorted(p.name for p in MUSHROOMS.iterdir())
    assert all(sum(r.label == label for r in rows) == 20 for label in labels)
    assert {r.split for r in rows} == set(SPLITS)
    assert all(r.sha256 == sha256(Path(r.path)) and r.width >= 64 and r.height >= 64 for r in rows)
    for label in labels:
        assert label in printed


def test_flags_are_spelled_as_retrain_py_with_dashed_aliases_hidden(tmp_path, capsys):
    """--snake_case is the one spelling --help shows; the dashed spelling of earlier versions still parses."""
    from training_job.cli import build_parser

    parser = build_parser()
    snake = parser.parse_args(["prepare", "--per_class", "7", "--min_side", "9"])
    dashed = parser.parse_args(["prepare", "--per-class", "7", "--min-side", "9"])
    assert (snake.per_class, snake.min_side) == (dashed.per_class, dashed.min_side) == (7, 9)
    assert parser.parse_args(["prepare"]).per_class is None  # the hidden alias does not clobber the default
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--help"])
    shown = capsys.readouterr().out
    assert "--per_class" in shown and "--per-class" not in shown and "--min-side" not in shown


def test_a_failed_prepare_leaves_no_manifest_of_an_earlier_folder(tmp_path):
    """prepare writes the report of the folder it was given, then refuses it (an empty class): the manifest of an
    earlier folder must not stay beside that report, or train would quietly train on the earlier photos."""
    from training_job.errors import UserError

    first = tmp_path / "first"
    for species in ("amanita_muscaria", "boletus_edulis"):
        link_photos(first / species, distinct_photos(species, 3))
    out = tmp_path / "out"
    prepare_dataset(first, out, progress=False)
    assert (out / "manifest.csv").is_file()
    second = tmp_path / "second"
    link_photos(second / "amanita_vaginata", distinct_photos("amanita_vaginata", 3))
    (second / "empty_species").mkdir()
    with pytest.raises(UserError, match="no usable photos"):
        prepare_dataset(second, out, progress=False)
    assert read_report(out)["source"] == str(second)
    assert not (out / "manifest.csv").exists()


def test_photos_in_a_linked_sub_folder_of_a_class_are_read(tmp_path):
    """A class folder may hold a link to a folder elsewhere (photos on another disk): its photos are the class's,
    as those of a linked class folder are; a link back up the tree is read once, not forever."""
    elsewhere = tmp_path / "other-disk"
    link_photos(elsewhere, distinct_photos("amanita_muscaria", 3))
    source = tmp_path / "photos"
    link_photos(source / "amanita_muscaria", distinct_photos("amanita_muscaria", 6)[3:])
    (source / "amanita_muscaria" / "from-other-disk").symlink_to(elsewhere)
    (source / "amanita_muscaria" / "loop").symlink_to(source / "amanita_muscaria")
    link_photos(source / "boletus_edulis", distinct_photos("boletus_edulis", 3))
    rows = prepare_dataset(source, tmp_path / "out", progress=False)
    assert sum(r.label == "amanita_muscaria" for r in rows) == 6


def test_the_folder_macos_zips_carry_is_not_a_class(tmp_path):
    """Unzipping a folder zipped on a Mac adds __MACOSX/ (AppleDouble '._' files): not a species, so not a class
    to refuse as empty."""
    source = tmp_path / "photos"
    link_photos(source / "amanita_muscaria", distinct_photos("amanita_muscaria", 3))
    link_photos(source / "boletus_edulis", distinct_photos("boletus_edulis", 3))
    (source / "__MACOSX" / "amanita_muscaria").mkdir(parents=True)
    (source / "__MACOSX" / "amanita_muscaria" / "._photo.jpg").write_bytes(b"\0\5\26\7" + b"\0" * 60)
    rows = prepare_dataset(source, tmp_path / "out", progress=False)
    assert {r.label for r in rows} == {"amanita_muscaria", "boletus_edulis"}


def test_photos_named_on_another_system_are_read_and_their_class_named_as_that_system_meant(tmp_path):
    """File and folder names whose bytes are not UTF-8 (written on Windows or an old Linux, then copied here)
    are photos like any other: the manifest gives back paths that open, report.json stays JSON, and the class gets
    a readable label (the folder's name read as Windows-1252) with a warning that says so."""
    import os

    source = tmp_path / "photos"
    edulis = source / os.fsdecode(b"boletus_edulis_\xe9t\xe9")
    link_photos(edulis, distinct_photos("boletus_edulis", 3), names=[os.fsdecode(b"c\xe8pe_%d.jpg" % i)
                                                                     for i in range(3)])
    link_photos(source / "amanita_muscaria", distinct_photos("amanita_muscaria", 3))
    rows = prepare_dataset(source, tmp_path / "out", progress=False)

    assert {r.label for r in rows} == {"amanita_muscaria", "boletus_edulis_été"}
    back = read_manifest(tmp_path / "out" / "manifest.csv")
    assert set(back) == set(rows)
    named = [r for r in back if r.label == "boletus_edulis_été"]
    assert len(named) == 3 and all(Path(r.path).read_bytes() for r in named)
    report = read_report(tmp_path / "out")
    assert any("boletus_edulis_\\udce9t\\udce9" in w and "'boletus_edulis_été'" in w for w in report["warnings"])
    assert report["classes"]["boletus_edulis_été"]["kept"] == 3


def test_a_class_label_is_its_folder_name_as_typed_text_is():
    """A Mac can store "é" as "e" plus a combining accent (NFD): the label is the NFC form a client types."""
    import unicodedata

    from training_job.prepare import class_label

    assert class_label(unicodedata.normalize("NFD", "bolet_cèpe")) == "bolet_cèpe"
    assert class_label("amanita_muscaria") == "amanita_muscaria"
    assert class_label("Pfifferling_\udce4") == "Pfifferling_ä"  # byte 0xe4 in Windows-1252
    assert class_label("x\udc81") == "x\x81"  # a byte Windows-1252 leaves unassigned, read as Latin-1


def test_two_folders_giving_one_label_are_refused(tmp_path, capsys):
    import unicodedata

    source = tmp_path / "photos"
    link_photos(source / "bolet_cèpe", distinct_photos("boletus_edulis", 3))
    link_photos(source / unicodedata.normalize("NFD", "bolet_cèpe"), distinct_photos("boletus_edulis", 6)[3:])
    link_photos(source / "amanita_muscaria", distinct_photos("amanita_muscaria", 3))
    message = _cli_error(capsys, "--source", source, "--out", tmp_path / "out")
    assert "both give the class label 'bolet_cèpe'" in message and "merge them or rename one" in message


def test_the_cli_prints_photo_names_that_are_not_utf8_on_a_strict_utf8_terminal(tmp_path):
    """A UTF-8 terminal's stdout refuses surrogate escapes; the CLI prints them as \\udcXX instead of failing."""
    import os
    import subprocess
    import sys

    source = tmp_path / "photos"
    link_photos(source / "amanita_muscaria", distinct_photos("amanita_muscaria", 3),
                names=[os.fsdecode(b"muscaria_\xe9%d.jpg" % i) for i in range(3)])
    link_photos(source / "boletus_edulis", distinct_photos("boletus_edulis", 3))
    done = subprocess.run([sys.executable, "-m", "training_job", "prepare", "--source", str(source), "--out",
                           str(tmp_path / "out"), "--validation_percentage", "30", "--testing_percentage", "30"],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"}, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"muscaria_\\udce9" in done.stdout


def test_photos_of_a_61_mp_camera_and_a_200_mp_phone_are_kept(tmp_path):
    """Over the gateway's 60 M pixels, and the 200 MP one over the 179 M at which Pillow refuses to open a photo:
    the user's own photos all the same, which prepare keeps and training reads."""
    from training_job.preprocessing import load_image_file

    source = tmp_path / "photos"
    link_photos(source / "boletus_edulis", distinct_photos("boletus_edulis", 3))
    folder = source / "amanita_muscaria"
    link_photos(folder, distinct_photos("amanita_muscaria", 1))
    sizes = {"camera.jpg": ((9504, 6336), "RGB"), "phone.jpg": ((16320, 12240), "L")}
    for (name, (size, mode)), photo in zip(sizes.items(), distinct_photos("amanita_muscaria", 3)[1:]):
        big = decode_image(photo.read_bytes()).convert(mode).resize(size, Image.BILINEAR)
        big.save(folder / name, "JPEG", quality=85)
        del big
    rows = prepare_dataset(source, tmp_path / "out", progress=False)
    kept = {Path(r.path).name: (r.width, r.height) for r in rows if r.label == "amanita_muscaria"}
    assert len(kept) == 3 and all(kept[name] == size for name, (size, _) in sizes.items()), kept
    assert load_image_file(folder / "phone.jpg").shape == (224, 224, 3)
