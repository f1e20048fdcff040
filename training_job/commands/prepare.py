"""`prepare`: decode, clean, balance and split a folder of class sub-folders into a dataset manifest."""
from __future__ import annotations

import argparse

from training_job.commands import add_flag
from training_job import prepare as p
from training_job.paths import shared_data_dir, var_dir


def default_source():
    return shared_data_dir() / "mushrooms"


def default_out():
    return var_dir() / "dataset"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="decode, de-duplicate, balance and split photos into a manifest",
        description="Decode every file under SOURCE/<class>/ with the preprocessing contract; drop corrupt, tiny, "
        "byte-identical and near-duplicate (perceptual hash) photos; keep every usable photo, or at most --per_class "
        "per class (chosen by a hash of each photo, so the choice is stable); assign each photo to "
        "train/validation/test/demo by a hash of its bytes (adding photos never moves existing ones). With the "
        "defaults, 75 % of the photos train, 10 % validate, 10 % test and 5 % are held out for the demo. "
        "Writes OUT/manifest.csv and OUT/report.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--source", type=str, default=str(default_source()),
                        help="folder with one sub-folder of photos per class")
    parser.add_argument("--out", type=str, default=str(default_out()),
                        help="where manifest.csv and report.json are written")
    add_flag(parser, "--per_class", type=int, default=p.DEFAULT_PER_CLASS,
                        help="photos kept per class, to balance them (fewer -> a warning); 0 or unset = keep all")
    add_flag(parser, "--validation_percentage", type=float, default=p.DEFAULT_VALIDATION_PCT,
                        help="percentage of photos in the validation split")
    add_flag(parser, "--testing_percentage", type=float, default=p.DEFAULT_TEST_PCT,
                        help="percentage of photos in the test split")
    add_flag(parser, "--demo_percentage", type=float, default=p.DEFAULT_DEMO_PCT,
                        help="percentage held out for demos (never trained or tuned on)")
    parser.add_argument("--seed", type=int, default=0, help="changes which photos are balanced out and the splits")
    add_flag(parser, "--min_side", type=int, default=p.DEFAULT_MIN_SIDE,
                        help="photos whose shorter side is smaller (px) are dropped as tiny")
    add_flag(parser, "--near_duplicate_distance", type=int, default=p.DEFAULT_NEAR_DUPLICATE_DISTANCE,
                        help="perceptual-hash Hamming distance at or below which two photos are near duplicates "
                        "(-1 disables)")
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (0 = one per CPU)")
    parser.add_argument("--synthetic", action="store_true",
                        help="generate a small synthetic drawn dataset into OUT/synthetic-photos and prepare that "
                        "keeping all of them (only to run the pipeline without photos; a real model needs real photos)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    source, per_class = Path(args.source), args.per_class
    if args.synthetic:
        per_class = 0  # the drawn set is small by design; keep it all
        from training_job.synthetic import SYNTHETIC_WARNING, generate_synthetic_dataset

        source = generate_synthetic_dataset(Path(args.out) / "synthetic-photos")
        print(SYNTHETIC_WARNING)
    p.prepare_dataset(
        source, args.out, per_class=per_class, validation_pct=args.validation_percentage,
        test_pct=args.testing_percentage, demo_pct=args.demo_percentage, seed=args.seed, min_side=args.min_side,
        near_duplicate_distance=args.near_duplicate_distance, workers=args.workers,
    )
    print(p.format_summary(p.read_report(args.out)))
    return 0
