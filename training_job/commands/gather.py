"""`gather`: download photos listed in <class>.txt URL files into a folder of class sub-folders."""
from __future__ import annotations

import argparse

from training_job.commands import add_flag
from training_job import gather as g
from training_job.paths import var_dir


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "gather",
        help="download photos from per-class URL lists (resumable)",
        description="Read LISTS/<class>.txt (one URL per line, '#' starts a comment) and download each photo to "
        "OUT/<class>/<sha1 of URL>.<ext>, concurrently, with timeouts and retries. Files already downloaded are "
        "skipped, so re-running resumes. Only real photos are kept (no HTML, no placeholders, at least --min_bytes, "
        "shorter side at least --min_side, decodable); every failed URL and why goes to OUT/"
        f"{g.FAILURE_LOG}. OUT is then ready for `prepare --source OUT`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("lists", help="folder of <class>.txt URL lists")
    parser.add_argument("--out", default=str(var_dir() / "photos"), help="folder of class sub-folders to fill")
    parser.add_argument("--workers", type=int, default=g.DEFAULT_WORKERS, help="concurrent downloads")
    parser.add_argument("--timeout", type=float, default=g.DEFAULT_TIMEOUT, help="seconds allowed per download")
    parser.add_argument("--retries", type=int, default=g.DEFAULT_RETRIES,
                        help="extra attempts after timeouts, network errors and HTTP 429/5xx")
    parser.add_argument("--backoff", type=float, default=g.DEFAULT_BACKOFF,
                        help="seconds before the first retry; doubles each time")
    add_flag(parser, "--min_bytes", type=int, default=g.DEFAULT_MIN_BYTES, help="smaller files are rejected")
    add_flag(parser, "--min_side", type=int, default=g.DEFAULT_MIN_SIDE,
                        help="photos whose shorter side is smaller (px) are rejected")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    result = g.gather_photos(args.lists, args.out, workers=args.workers, timeout=args.timeout, retries=args.retries,
                             backoff=args.backoff, min_bytes=args.min_bytes, min_side=args.min_side)
    print(result.summary())
    if result.failures:
        print(f"failed URLs and reasons: {Path(args.out) / g.FAILURE_LOG}")
    return 0
