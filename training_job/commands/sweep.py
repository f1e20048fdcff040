"""`sweep`: train a small grid of learning rates x architectures and pick the best on validation."""
from __future__ import annotations

import argparse
from pathlib import Path

from training_job.errors import UserError
from training_job.train import DEFAULT_ARCHITECTURE


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive numbers, got {text!r}")
    return values


def register(subparsers) -> None:
    from training_job.commands.train import add_training_arguments, default_manifest

    parser = subparsers.add_parser(
        "sweep", help="grid of learning rates x architectures; best picked on validation",
        description="Train one run per (architecture, learning rate) on the same cached bottlenecks, each with its "
        "own TensorBoard run under var/tensorboard/<sweep>/, and pick the best on the validation split. Each run is "
        "the whole recipe, whole-network fine-tuning included (minutes per run; --no_fine_tune_whole sweeps the "
        "head alone in seconds). "
        "Writes var/runs/<sweep>/sweep.json; publish the best with `publish --run_dir`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--manifest", default=str(default_manifest()), help="manifest.csv written by `prepare`")
    parser.add_argument("--learning_rates", type=_floats, default=[0.0003, 0.001, 0.003, 0.01],
                        help="comma-separated learning rates")
    parser.add_argument("--architectures", default=DEFAULT_ARCHITECTURE,
                        help="comma-separated architectures (built in: efficientnet_lite0..2, mobilenet_1.0_224)")
    parser.add_argument("--sweep_dir", default=None, help="folder for the runs (default var/runs/sweep-<timestamp>)")
    add_training_arguments(parser, architecture=False)
    parser.set_defaults(func=run)


def run(args) -> int:
    from training_job.commands.train import check_config, config_from_args, load_rows
    from training_job.pipeline import runs_dir, timestamp
    from training_job.sweep import run_sweep
    from training_job.train import TrainingError

    rows = load_rows(args.manifest)
    architectures = [a.strip() for a in args.architectures.split(",") if a.strip()]
    if not architectures:
        raise UserError("--architectures is empty")
    config = config_from_args(args)
    for arch in architectures:
        check_config(config.__class__(**{**config.__dict__, "architecture": arch}))
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else runs_dir() / f"sweep-{timestamp()}"
    not_mushrooms = Path(args.not_mushrooms) if args.not_mushrooms else None
    try:
        report = run_sweep(rows, config, args.learning_rates, architectures, sweep_dir,
                           not_mushrooms=not_mushrooms, reject_rate=args.open_set_reject_rate)
    except (TrainingError, ValueError) as exc:
        raise UserError(str(exc)) from None
    best = report["best"]
    print(f"best on validation: {best['name']} (validation accuracy {best['validation_accuracy']:.4f}, "
          f"test accuracy {best['test_accuracy']:.4f})")
    print(f"run folder: {best['run_dir']}\nsweep report: {sweep_dir / 'sweep.json'}")
    print(f"tensorboard --logdir {report['tensorboard']}")
    return 0
