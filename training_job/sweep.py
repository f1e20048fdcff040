"""A small hyper-parameter grid (learning rates x architectures): one run folder and TensorBoard run each; the
best is picked on the VALIDATION split (accuracy, then lower cross-entropy of the model the run serves: fine-tuned
when it was), never on test."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from training_job.bottlenecks import BaseNetwork
from training_job.open_set import DEFAULT_REJECT_RATE
from training_job.pipeline import tensorboard_dir, train_run
from training_job.train import TrainConfig


def served_validation(summary: dict) -> tuple[float, float]:
    """(validation accuracy, validation cross-entropy) of the model a run serves, from its train_summary.json:
    fine-tuned and mirror-averaged as the run was, uncalibrated (the temperature does not change the ranking). Run
    folders from before ``served_validation_accuracy`` was recorded give their fine-tuning's figure (or the head's)."""
    tuned = summary.get("fine_tune_whole") or summary.get("fine_tune") or {}
    accuracy = summary.get("served_validation_accuracy",
                           tuned.get("validation_accuracy", summary["validation_accuracy"]))
    return accuracy, summary["calibration"]["validation"]["nll_before"]


def run_sweep(rows, base_config: TrainConfig, learning_rates, architectures, sweep_dir: Path, *,
              tensorboard_root: Path | None = None, not_mushrooms=None, reject_rate: float = DEFAULT_REJECT_RATE,
              progress: bool = True) -> dict:
    sweep_dir = Path(sweep_dir)
    tensorboard_root = Path(tensorboard_root or tensorboard_dir()) / sweep_dir.name
    results = []
    for architecture in architectures:
        base = BaseNetwork(architecture, base_config.weights_file)
        for lr in learning_rates:
            config = replace(base_config, architecture=architecture, learning_rate=lr)
            name = f"{base.architecture}-lr{lr:g}"
            run_dir, metrics = train_run(rows, config, sweep_dir / name, base=base,
                                         tensorboard_root=tensorboard_root, not_mushrooms=not_mushrooms,
                                         reject_rate=reject_rate, progress=progress)
            summary = json.loads((run_dir / "train_summary.json").read_text())
            accuracy, cross_entropy = served_validation(summary)
            results.append({
                "name": name, "run_dir": str(run_dir), "architecture": base.architecture, "learning_rate": lr,
                "validation_accuracy": accuracy, "validation_cross_entropy": cross_entropy,
                "head_validation_accuracy": summary["validation_accuracy"],
                "test_accuracy": metrics["test_accuracy"], "epochs_run": summary["epochs_run"],
            })
            if progress:
                print(f"{name}: validation accuracy {accuracy:.4f}, cross-entropy {cross_entropy:.4f}")
    best = max(results, key=lambda r: (r["validation_accuracy"], -r["validation_cross_entropy"]))
    report = {"runs": results, "best": best, "picked_on": "validation accuracy, then lower validation cross-entropy",
              "tensorboard": str(tensorboard_root)}
    (sweep_dir / "sweep.json").write_text(json.dumps(report, indent=2))
    return report
