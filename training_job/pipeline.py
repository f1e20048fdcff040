"""The training job's steps glued together around a run folder.

A run folder (``var/runs/<run name>/``) holds everything a later step needs: ``manifest.csv``, ``config.json``,
``head.npz``, ``open_set.npz``, ``train_summary.json`` and the evaluation (``metrics.json``,
``confusion_matrix.png``, ``misclassified.csv``, ``misclassified_heatmaps.png``). ``publish`` exports a run into the
registry.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from training_job.bottlenecks import BaseNetwork, get_bottlenecks
from training_job.calibration import DEFAULT_BINS, calibration_report, fit_temperature
from training_job.dataset import labels_of, manifest_fingerprint, manifest_order, read_manifest, write_manifest
from training_job.evaluate import (
    MISCLASSIFIED_SHEET, candidate_report, open_set_metrics, photo_rows, write_evaluation, write_misclassified_sheet,
)
from training_job.open_set import DEFAULT_METHOD, DEFAULT_REJECT_RATE, OpenSet, calibrate
from training_job.paths import PROJECT_ROOT, shared_data_dir, var_dir
from training_job.train import Head, TrainConfig, load_config, plain_bottlenecks, save_config, split_rows, train_head

DISPLAY_NAMES = {
    "amanita_muscaria": "Fly agaric",
    "amanita_vaginata": "Grisette",
    "boletus_edulis": "Penny bun (porcini)",
    "boletus_erythropus": "Scarletina bolete",
}


def display_name(label: str) -> str:
    return DISPLAY_NAMES.get(label, label.replace("_", " ").strip().capitalize())


def default_not_mushrooms() -> Path | None:
    folder = shared_data_dir() / "not-mushrooms"
    return folder if folder.is_dir() else None


def runs_dir() -> Path:
    return var_dir() / "runs"


def tensorboard_dir() -> Path:
    return var_dir() / "tensorboard"


def code_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


TUNED_BLOCKS_FILE = "fine_tuned_blocks.npz"
# What a finished run leaves besides its inputs (manifest, config) and the networks it trained. ``head.npz`` marks a
# finished run: evaluate and publish take no folder without it.
RUN_OUTPUTS = ("head.npz", "open_set.npz", "train_summary.json", "metrics.json", "confusion_matrix.png",
               "misclassified.csv", MISCLASSIFIED_SHEET)


def run_base(run_dir: Path, config: TrainConfig, base: BaseNetwork | None = None) -> BaseNetwork:
    """The network a run's head reads: the frozen base, with the run's fine-tuned blocks or network if it has some,
    mirror-averaged if the run uses mirror test-time augmentation."""
    from training_job.mirror_tta import MirrorAveragedBase, plain_base

    base = tuned_base(run_dir, plain_base(base or BaseNetwork(config.architecture, config.weights_file)))
    return MirrorAveragedBase(base) if config.mirror_tta else base


def tuned_base(run_dir: Path, base: BaseNetwork) -> BaseNetwork:
    """The plain ``base`` with the run's fine-tuned blocks or whole fine-tuned network, if it has some."""
    from training_job.fine_tune import FineTunedBase, load_tail
    from training_job.whole_fine_tune import TUNED_NETWORK_FILE, WholeTunedBase

    if (Path(run_dir) / TUNED_NETWORK_FILE).exists():
        return WholeTunedBase.load(base, Path(run_dir) / TUNED_NETWORK_FILE)
    tuned = Path(run_dir) / TUNED_BLOCKS_FILE
    if not tuned.exists():
        return base
    blocks, weights = load_tail(tuned)
    return FineTunedBase(base, blocks, weights)


def train_run(rows, config: TrainConfig, run_dir: Path | None = None, *, base: BaseNetwork | None = None,
              tensorboard_root: Path | None = None, not_mushrooms: Path | None = None,
              open_set_method: str = DEFAULT_METHOD, reject_rate: float = DEFAULT_REJECT_RATE,
              cache_root=None, progress: bool = True) -> tuple[Path, dict]:
    """Train, calibrate the open-set check, evaluate on test; write the run folder. Returns (run_dir, metrics).
    The run works on ``rows`` in its manifest's order, whatever order they come in."""
    from training_job.mirror_tta import plain_base

    rows = manifest_order(rows)
    if run_dir is not None:  # a folder trained again is not a finished run until this training ends
        for name in RUN_OUTPUTS:
            (Path(run_dir) / name).unlink(missing_ok=True)
    base = plain_base(base or BaseNetwork(config.architecture, config.weights_file))
    run_name = run_dir.name if run_dir else None
    result = train_head(rows, config, tensorboard_root or tensorboard_dir(), run_name, base=base,
                        progress=progress, cache_root=cache_root)
    run_dir = Path(run_dir or runs_dir() / result.run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    head, split_bottlenecks = result.head, result.split_bottlenecks
    summary = {}
    (run_dir / TUNED_BLOCKS_FILE).unlink(missing_ok=True)  # a re-used run folder must not keep an older run's blocks
    if config.fine_tune_whole:
        import shutil

        from training_job.whole_fine_tune import (CHECKPOINT_FOLDER, TUNED_NETWORK_FILE, epochs_asked,
                                                 fine_tune_whole, frozen_blocks_asked, peak_learning_rate)

        (run_dir / TUNED_NETWORK_FILE).unlink(missing_ok=True)
        try:
            whole = fine_tune_whole(rows, config, base, head, result.tensorboard_dir,
                                    run_dir / CHECKPOINT_FOLDER, progress=progress)
        except KeyboardInterrupt:
            print(f"\nfine-tuning stopped; its checkpoint is in {run_dir / CHECKPOINT_FOLDER}: "
                  f"`python -m training_job train --run_dir {run_dir}` (with the same flags) goes on from it",
                  file=sys.stderr)
            raise
        whole.base.save(run_dir / TUNED_NETWORK_FILE)
        shutil.rmtree(run_dir / CHECKPOINT_FOLDER, ignore_errors=True)
        head, split_bottlenecks = whole.head, whole.split_bottlenecks
        summary["fine_tune_whole"] = {"learning_rate": peak_learning_rate(config),
                                      "frozen_blocks": frozen_blocks_asked(config),
                                      "epochs_asked": epochs_asked(config),
                                      "epochs_planned": whole.planned_epochs,
                                      "epochs_run": whole.epochs_run, "best_epoch": whole.best_epoch,
                                      "seconds": whole.seconds, "stopped_by": whole.stopped_by,
                                      "validation_accuracy_before": result.validation_accuracy,
                                      "validation_accuracy": whole.validation_accuracy,
                                      "runs": whole.runs, "soup": whole.soup}
    else:
        from training_job.whole_fine_tune import TUNED_NETWORK_FILE

        (run_dir / TUNED_NETWORK_FILE).unlink(missing_ok=True)
    if config.fine_tune_blocks:
        from training_job.fine_tune import fine_tune, learning_rate, save_tail

        tuned = fine_tune(rows, config, base, head, split_bottlenecks, result.tensorboard_dir,
                          cache_root=cache_root, progress=progress)
        save_tail(run_dir / TUNED_BLOCKS_FILE, config.fine_tune_blocks, tuned.base.tail_weights)
        head, split_bottlenecks = tuned.head, tuned.split_bottlenecks
        summary["fine_tune"] = {"blocks": config.fine_tune_blocks,
                                "learning_rate": learning_rate(config),
                                "epochs_run": tuned.epochs_run,
                                "best_epoch": tuned.best_epoch, "seconds": tuned.seconds,
                                "validation_accuracy_before": result.validation_accuracy,
                                "validation_accuracy": tuned.validation_accuracy}
    if config.mirror_tta:  # everything after training reads what will be served: mirror-averaged features
        from training_job.mirror_tta import MirrorAveragedBase

        served = tuned.base if config.fine_tune_blocks else whole.base if config.fine_tune_whole else base
        split_bottlenecks, _ = plain_bottlenecks(rows, MirrorAveragedBase(served), progress=progress,
                                                 cache_root=cache_root)
        summary["mirror_tta"] = True
    labels = head.labels
    index = {l: i for i, l in enumerate(labels)}
    train_idx = np.array([index[r.label] for r in split_rows(rows, "train")])
    val = split_bottlenecks["validation"]
    # Temperature scaling on validation (folded into the head's last layer), before anything reads the head's
    # probabilities; the open-set threshold below is then set on the served model's outputs.
    val_idx = np.array([index[r.label] for r in split_rows(rows, "validation")])
    temperature = fit_temperature(head.logits(val.features), val_idx)
    summary["calibration"] = {"temperature": temperature,
                              "validation": calibration_report(head.logits(val.features), val_idx, temperature)}
    head = head.with_temperature(temperature)
    # what the served network (fine-tuned, mirror-averaged, as the run asked) scores on validation: the figure a sweep
    # picks by and the summary pairs with the test accuracy (the temperature does not change a top-1)
    summary["served_validation_accuracy"] = float(np.mean(head.logits(val.features).argmax(1) == val_idx))
    open_set = calibrate(open_set_method, split_bottlenecks["train"], train_idx, len(labels), val, reject_rate)
    write_manifest(rows, run_dir / "manifest.csv")
    save_config(config, run_dir / "config.json")
    head.save(run_dir / "head.npz")
    open_set.save(run_dir / "open_set.npz")
    (run_dir / "train_summary.json").write_text(json.dumps({
        "run_name": result.run_name, "architecture": base.architecture, "tensorboard": result.tensorboard_dir,
        "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        "validation_accuracy": result.validation_accuracy,
        "validation_cross_entropy": result.validation_cross_entropy,
        "bottlenecks_computed": result.bottlenecks_computed, "train_seconds": result.seconds,
        "train_photos": len(train_idx), "validation_photos": len(val.features), **summary,
    }, indent=2))
    metrics = evaluate_run(run_dir, base, not_mushrooms=not_mushrooms, cache_root=cache_root, progress=progress,
                           split_bottlenecks=split_bottlenecks)
    return run_dir, metrics


def load_run(run_dir: Path):
    run_dir = Path(run_dir)
    for name in ("manifest.csv", "config.json", "head.npz", "open_set.npz"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a training run folder (no {name}); run `train` first")
    return (read_manifest(run_dir / "manifest.csv"), load_config(run_dir / "config.json"),
            Head.load(run_dir / "head.npz"), OpenSet.load(run_dir / "open_set.npz"))


def evaluate_run(run_dir: Path, base: BaseNetwork | None = None, *, not_mushrooms: Path | None = None,
                 cache_root=None, progress: bool = True, split_bottlenecks=None) -> dict:
    rows, config, head, open_set = load_run(run_dir)
    base = run_base(run_dir, config, base)
    if split_bottlenecks is None:
        split_bottlenecks, _ = plain_bottlenecks(rows, base, progress=progress, cache_root=cache_root)
    test_rows = split_rows(rows, "test")
    if not test_rows:
        raise ValueError("the test split is empty: prepare with a non-zero --testing_percentage")
    index = {l: i for i, l in enumerate(head.labels)}
    y_test = np.array([index[r.label] for r in test_rows])
    test = split_bottlenecks["test"]
    ood = None
    if not_mushrooms is None:
        not_mushrooms = default_not_mushrooms()
    if not_mushrooms is not None:
        ood_rows = photo_rows(Path(not_mushrooms))
        ood = get_bottlenecks(ood_rows, base, progress=progress, root=cache_root) if ood_rows else None
    report = open_set_metrics(open_set, test.features, test.imagenet,
                              ood.features if ood else None, ood.imagenet if ood else None)
    if not_mushrooms is not None:
        report["not_mushrooms_folder"] = str(not_mushrooms)
    train_idx = np.array([index[r.label] for r in split_rows(rows, "train")])
    report["candidates_at_same_reject_rate"] = candidate_report(
        split_bottlenecks["train"], train_idx, len(head.labels), split_bottlenecks["validation"], test, ood,
        open_set.reject_rate_target)
    raw = head.uncalibrated()
    y_val = np.array([index[r.label] for r in split_rows(rows, "validation")])
    calibration = {
        "method": "temperature scaling on the validation split",
        "temperature": head.temperature,
        "bins": DEFAULT_BINS,
        "validation": calibration_report(raw.logits(split_bottlenecks["validation"].features), y_val,
                                         head.temperature),
        "test": calibration_report(raw.logits(test.features), y_test, head.temperature),
    }
    probs = head.predict(test.features)
    metrics = write_evaluation(Path(run_dir), head.labels, test_rows, y_test, probs, report, calibration)
    write_misclassified_sheet(Path(run_dir) / MISCLASSIFIED_SHEET, base, head, test_rows, y_test, probs)
    return metrics


def model_card(run_dir: Path, base: BaseNetwork, config: TrainConfig, open_set: OpenSet, rows) -> dict:
    from training_job.base_weights import weights_source
    from training_job.preprocessing import PREPROCESSING_VERSION

    summary_file = Path(run_dir) / "train_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return {
        "architecture": base.architecture,
        "image_size": base.image_size,
        "preprocessing_version": PREPROCESSING_VERSION,
        "base_weights_source": (weights_source(config.architecture) if not config.weights_file
                                else f"weights file {config.weights_file}"),
        "hyper_parameters": asdict(config),
        "training": summary,
        "code_revision": code_revision(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "manifest_fingerprint": manifest_fingerprint(rows),
        "labels": labels_of(rows),
        "split_counts": {s: len(split_rows(rows, s)) for s in ("train", "validation", "test", "demo")},
        "open_set": open_set.to_json(),
    }


def export_run(run_dir: Path, target: Path, base: BaseNetwork | None = None, *, model_name: str = "mushrooms",
               tflite: bool = True, progress: bool = True) -> dict:
    """Write the SavedModel and ``assets.extra/`` of ``run_dir`` into ``target``; returns the metrics written."""
    import shutil

    from training_job.explain import grad_cam_problem
    from training_job.export import build_serving_module, save_model, write_warmup_requests
    from training_job.preprocessing import load_image_file

    rows, config, head, open_set = load_run(run_dir)
    base = run_base(run_dir, config, base)
    target = Path(target)
    save_model(build_serving_module(base, head, open_set), target)
    extra = target / "assets.extra"
    extra.mkdir(exist_ok=True)
    (extra / "labels.json").write_text(json.dumps(
        {"labels": head.labels, "display_names": {l: display_name(l) for l in head.labels}}, indent=2))
    metrics_file = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else evaluate_run(run_dir, base)
    if tflite:
        from training_job.tflite_export import export_tflite, int8_model_name

        metrics["tflite"] = export_tflite(target, rows, head.labels, base.image_size, progress=progress)
        metrics["tflite"]["savedmodel_test_accuracy"] = metrics["test_accuracy"]
        metrics["tflite"]["int8_model_name"] = int8_model_name(model_name)
    (extra / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (extra / "model_card.json").write_text(json.dumps(model_card(run_dir, base, config, open_set, rows), indent=2))
    for name in ("confusion_matrix.png", "misclassified.csv", "manifest.csv", MISCLASSIFIED_SHEET):
        if name != MISCLASSIFIED_SHEET or (Path(run_dir) / name).exists():  # runs evaluated before it existed
            shutil.copyfile(Path(run_dir) / name, extra / name)
    sample = (split_rows(rows, "test") or rows)[:4]
    write_warmup_requests(target, np.stack([load_image_file(r.path, base.image_size) for r in sample]),
                          [Path(r.path).read_bytes() for r in sample[:1]], model_name,
                          explain=grad_cam_problem(base.model) is None, tflite=tflite)
    return metrics


def publish_run(run_dir: Path, registry: Path, model_name: str = "mushrooms", *, base: BaseNetwork | None = None,
                min_test_accuracy: float | None = None, tflite: bool = True, progress: bool = True):
    """Export ``run_dir`` into the next version folder of ``registry/model_name``; returns (N, version_dir, metrics)."""
    from training_job.publish import PublishError, publish_dir

    metrics_file = Path(run_dir) / "metrics.json"
    if min_test_accuracy is not None:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else evaluate_run(run_dir, base)
        if metrics["test_accuracy"] < min_test_accuracy:
            raise PublishError(f"test accuracy {metrics['test_accuracy']:.4f} is below --min_test_accuracy "
                               f"{min_test_accuracy}; not publishing")
    out = {}

    def build(staging: Path) -> None:
        out["metrics"] = export_run(run_dir, staging, base, model_name=model_name, tflite=tflite, progress=progress)

    n, version_dir = publish_dir(build, Path(registry), model_name)
    if tflite:
        publish_variants(version_dir, Path(registry), model_name, progress)
    return n, version_dir, out["metrics"]


def publish_variants(version_dir: Path, registry: Path, model_name: str, progress: bool = True) -> Path | None:
    """After a version with TFLite files is published: its int8 variant, as the model ``<model_name>_int8``
    (training_job/tflite_export.py); its folder, or None when that version number is taken there (the float
    version stays published: the job does not fail, it says so)."""
    import sys

    from training_job.publish import PublishError
    from training_job.tflite_export import publish_int8_variant

    try:
        n, variant_dir = publish_int8_variant(version_dir, registry, model_name)
    except PublishError as exc:
        print(f"warning: the int8 variant of {model_name} version {version_dir.name} is not published: {exc}",
              file=sys.stderr)
        return None
    if progress:
        print(f"published the int8 variant as {variant_dir.parent.name} version {n}: {variant_dir}")
    return variant_dir


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
