"""`evaluate`: (re-)evaluate a run folder on its test split."""
from __future__ import annotations

import argparse
from pathlib import Path

from training_job.errors import UserError


def latest_run() -> Path | None:
    from training_job.pipeline import runs_dir

    runs = sorted((p for p in runs_dir().glob("*") if (p / "head.npz").exists()), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def resolve_run(run_dir: str | None) -> Path:
    if run_dir:
        path = Path(run_dir)
    else:
        path = latest_run()
        if path is None:
            raise UserError("no training run found under var/runs: run `python -m training_job train` first")
    if not (path / "head.npz").exists():
        raise UserError(f"{path} is not a training run folder (no head.npz); pass --run_dir of a `train` run")
    return path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="test-split accuracy, per-class precision/recall, confusion matrix, misclassified photos",
        description="Evaluate a run folder on its test split: writes metrics.json (accuracy, per-class "
        "precision/recall, confusion matrix, open-set rates), confusion_matrix.png and misclassified.csv "
        "into the run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--run_dir", default=None, help="run folder (default: the newest under var/runs)")
    parser.add_argument("--not_mushrooms", default=None,
                        help="folder of non-mushroom photos for the open-set rates (default ../shared/data/not-mushrooms)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import json

    from training_job.pipeline import evaluate_run

    run_dir = resolve_run(args.run_dir)
    not_mushrooms = Path(args.not_mushrooms) if args.not_mushrooms else None
    if not_mushrooms is not None and not not_mushrooms.is_dir():
        raise UserError(f"--not_mushrooms {not_mushrooms} is not a folder")
    try:
        metrics = evaluate_run(run_dir, not_mushrooms=not_mushrooms)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    print(f"test accuracy {metrics['test_accuracy']:.4f} on {metrics['test_photos']} photos")
    for label, m in metrics["per_class"].items():
        shown = {k: "n/a" if m[k] is None else f"{m[k]:.3f}" for k in ("precision", "recall")}
        print(f"  {label:24s} precision {shown['precision']} recall {shown['recall']} ({m['support']} photos)")
    print("confusion matrix (rows true, columns predicted):")
    print(json.dumps(metrics["confusion_matrix"]["rows_true_columns_predicted"]))
    o = metrics["open_set"]
    print(f"not-a-mushroom: {o['test_mushrooms_rejected']:.1%} of test mushrooms rejected"
          + (f", {o['not_mushrooms_rejected']:.1%} of non-mushrooms" if "not_mushrooms_rejected" in o else ""))
    print(f"written: {run_dir}/metrics.json, confusion_matrix.png, misclassified.csv")
    return 0
