"""`collect`: users' corrections kept by the gateway's photo store become new class-folder training photos."""
from __future__ import annotations

import argparse

from training_job.commands import add_flag
from training_job.paths import shared_data_dir, var_dir


def register(subparsers) -> None:
    from training_job import prepare as p

    parser = subparsers.add_parser(
        "collect",
        help="turn users' corrections (the gateway's --photo-store) into new class-folder training photos",
        description="Read STORE/corrections.jsonl (written by a gateway started with --photo-store STORE); copy each "
        "corrected photo to OUT/<true label>/<sha256>.<ext> unless it is missing, unreadable, labelled with a class "
        "DATA does not have, corrected to different labels by different users, or a byte-identical or "
        "near-duplicate (perceptual hash) of a photo in DATA, in OUT or of another new one. OUT/provenance.csv "
        "says which answer, which version and when. OUT may be DATA itself, so the next `run` trains on old + new "
        "photos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--store", required=True, help="the gateway's photo store folder (--photo-store)")
    parser.add_argument("--data", default=str(shared_data_dir() / "mushrooms"),
                        help="the existing training photos, one sub-folder per class")
    parser.add_argument("--out", default=str(var_dir() / "corrections"),
                        help="where the new class folders and provenance.csv go (may be --data)")
    add_flag(parser, "--min_side", type=int, default=p.DEFAULT_MIN_SIDE, help="smaller photos are dropped as tiny")
    add_flag(parser, "--near_duplicate_distance", type=int, default=p.DEFAULT_NEAR_DUPLICATE_DISTANCE,
             help="perceptual-hash Hamming distance at or below which two photos are near duplicates (-1 disables)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from training_job.collect import collect, format_collect_summary

    report = collect(args.store, args.data, args.out, args.min_side, args.near_duplicate_distance, args.workers)
    print(format_collect_summary(report, Path(args.out)))
    for dropped in report.dropped:
        print(f"  dropped {dropped['sha256'][:12] or '-'} ({dropped['label'] or '-'}): {dropped['reason']}: "
              f"{dropped['detail']}")
    return 0
