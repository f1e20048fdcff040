"""`publish`: export a run folder as a SavedModel into the next version of the registry, atomically."""
from __future__ import annotations

import argparse
from pathlib import Path

from training_job.errors import UserError


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    from training_job.paths import DEFAULT_MODEL_NAME, default_registry

    parser.add_argument("--registry", default=None,
                        help=f"registry folder (default $MUSHROOM_REGISTRY or <work dir>/registry: {default_registry()})")
    parser.add_argument("--model_name", default=DEFAULT_MODEL_NAME, help="model folder inside the registry")


def registry_of(args) -> Path:
    from training_job.paths import default_registry

    return Path(args.registry) if args.registry else default_registry()


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    add_registry_arguments(parser)
    parser.add_argument("--min_test_accuracy", type=float, default=None,
                        help="refuse to publish when the test accuracy is below this (0-1)")
    parser.add_argument("--no_tflite", action="store_true", help="skip the TFLite export (model.tflite and the <model_name>_int8 variant)")


def publish(run_dir: Path, args, base=None):
    from training_job.pipeline import publish_run

    if args.min_test_accuracy is not None and not 0 <= args.min_test_accuracy <= 1:
        raise UserError(f"--min_test_accuracy is a fraction in [0, 1] (got {args.min_test_accuracy})")
    registry = registry_of(args)
    try:
        n, version_dir, metrics = publish_run(run_dir, registry, args.model_name, base=base,
                                              min_test_accuracy=args.min_test_accuracy, tflite=not args.no_tflite)
    except PermissionError as exc:
        raise UserError(f"cannot write to the registry: {exc}") from None
    except FileNotFoundError as exc:  # the run's photos, re-read for the warm-up requests and the TFLite check
        raise UserError(f"{exc.filename} is missing: publishing reads the run's test photos where `prepare` found "
                        "them; put them back, or prepare and train again") from None
    print(f"published {args.model_name} version {n}: {version_dir}")
    if "tflite" in metrics:
        t = metrics["tflite"]
        print(f"test accuracy: SavedModel {metrics['test_accuracy']:.4f}, TFLite float {t['float_test_accuracy']:.4f}, "
              f"int8 {t['int8_test_accuracy']:.4f}")
    return n, version_dir, metrics


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "publish", help="export a run as a SavedModel into <registry>/<model_name>/<N>/ atomically",
        description="Export a training run (SavedModel with serving_default and predict_image_bytes, "
        "assets.extra/ with labels, model card, metrics, confusion matrix, manifest and TF Serving warm-up "
        "requests), model.tflite (float, serving_default only) into a temporary folder, fsync it, and rename it to the next integer "
        "version; then the int8 TFLite variant as the model <model_name>_int8, same version number. Safe against "
        "concurrent publishers and interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--run_dir", default=None, help="run folder (default: the newest under var/runs)")
    add_publish_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from training_job.commands.evaluate import resolve_run

    publish(resolve_run(args.run_dir), args)
    return 0
