"""Evaluation on the test split: accuracy, per-class precision/recall, confusion matrix (numbers and PNG),
the misclassified photos, and the open-set rates on the test split and on a folder of non-mushroom photos."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from training_job.dataset import ManifestRow, open_photo_csv
from training_job.open_set import METHODS, OpenSet


def classification_metrics(labels: list[str], y_true: np.ndarray, probs: np.ndarray) -> dict:
    C = len(labels)
    y_pred = probs.argmax(axis=1)
    cm = np.zeros((C, C), dtype=int)
    for t, p in zip(y_true, y_pred):
        cm[t, p] += 1
    per_class = {}
    for c, label in enumerate(labels):
        tp = int(cm[c, c])
        predicted, actual = int(cm[:, c].sum()), int(cm[c, :].sum())
        per_class[label] = {  # None where undefined: a class never predicted, a class with no test photos
            "precision": tp / predicted if predicted else None,
            "recall": tp / actual if actual else None,
            "support": actual,
        }
    return {
        "test_accuracy": float(np.mean(y_pred == y_true)) if len(y_true) else 0.0,
        "test_photos": int(len(y_true)),
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "rows_true_columns_predicted": cm.tolist()},
    }


def misclassified(rows: list[ManifestRow], labels: list[str], y_true, probs) -> list[dict]:
    out = []
    for row, t, p in zip(rows, y_true, probs):
        pred = int(p.argmax())
        if pred != t:
            out.append({"path": row.path, "true": labels[t], "predicted": labels[pred],
                        "confidence": round(float(p[pred]), 4)})
    return out


def write_misclassified(items: list[dict], path: Path) -> None:
    with open_photo_csv(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "true", "predicted", "confidence"])
        writer.writeheader()
        writer.writerows(items)


MISCLASSIFIED_SHEET = "misclassified_heatmaps.png"
SHEET_LIMIT = 60  # photos on the contact sheet at most (the first ones in test-split order)


def write_misclassified_sheet(path: Path, base, head, rows: list[ManifestRow], y_true, probs) -> int:
    """A contact sheet (PNG) of the misclassified photos, each as the model saw it beside its Grad-CAM heatmaps
    for the predicted and for the true class (training_job/explain.py's in-process Grad-CAM). Returns how many
    photos it shows."""
    from PIL import Image

    from training_job.explain import grad_cam_problem, in_process_grad_cam
    from training_job.heatmaps import contact_sheet
    from training_job.preprocessing import load_image_file

    problem = grad_cam_problem(base.model)
    if problem is not None:
        print(f"no misclassified heatmap sheet: {problem}")
        return 0
    probs = np.asarray(probs)
    wrong = [i for i, (t, p) in enumerate(zip(y_true, probs)) if int(p.argmax()) != int(t)][:SHEET_LIMIT]
    entries = []
    if wrong:
        pixels = np.stack([load_image_file(rows[i].path, base.image_size) for i in wrong])
        predicted = probs[wrong].argmax(axis=1)
        truth = np.asarray(y_true)[wrong]
        predicted_maps, _ = in_process_grad_cam(base, head, pixels, predicted)
        true_maps, _ = in_process_grad_cam(base, head, pixels, truth)
        for k, i in enumerate(wrong):
            entries.append({
                "photo": Image.fromarray(pixels[k]),
                "caption": f"{Path(rows[i].path).name[:28]}: {head.labels[truth[k]]} taken for "
                           f"{head.labels[predicted[k]]} ({probs[i, predicted[k]]:.2f})",
                "panels": [(f"why {head.labels[predicted[k]]}", predicted_maps[k]),
                           (f"why {head.labels[truth[k]]}", true_maps[k])]})
    contact_sheet(entries).save(path)
    return len(entries)


def plot_confusion_matrix(labels: list[str], cm: list[list[int]], path: Path, title: str = "test split") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(labels), 1.2 + 1.0 * len(labels)), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({title})")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def photo_rows(folder: Path, label: str = "not_a_mushroom", split: str = "ood") -> list[ManifestRow]:
    """Manifest-like rows for every readable photo in ``folder`` (for the not-mushroom check)."""
    from training_job.preprocessing import FILE_LIMITS, InvalidImage, open_image

    rows = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        data = path.read_bytes()
        try:
            w, h = open_image(data, FILE_LIMITS).size
        except InvalidImage:
            continue
        rows.append(ManifestRow(str(path), label, hashlib.sha256(data).hexdigest(), split, w, h, len(data)))
    return rows


def open_set_metrics(open_set: OpenSet, test_features, test_imagenet, ood_features=None, ood_imagenet=None) -> dict:
    """Rates of the chosen method, plus what each candidate would have done calibrated at the same quantile, for the
    record (never used to choose the threshold)."""
    out = {
        "method": open_set.method,
        "threshold": open_set.threshold,
        "validation_mushrooms_rejected": open_set.validation_rejected,
        "test_mushrooms_rejected": float(np.mean(open_set.not_a_mushroom(test_features, test_imagenet))),
    }
    if ood_features is not None and len(ood_features):
        out["not_mushrooms_rejected"] = float(np.mean(open_set.not_a_mushroom(ood_features, ood_imagenet)))
        out["not_mushroom_photos"] = int(len(ood_features))
    return out


def candidate_report(train, train_index, n_classes, val, test, ood, reject_rate) -> dict:
    from training_job.open_set import calibrate

    report = {}
    for method in METHODS:
        os_ = calibrate(method, train, train_index, n_classes, val, reject_rate)
        report[method] = open_set_metrics(os_, test.features, test.imagenet,
                                          ood.features if ood else None, ood.imagenet if ood else None)
    return report


def write_evaluation(out_dir: Path, labels, rows, y_true, probs, open_set_report: dict,
                     calibration: dict | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(labels, y_true, probs)
    metrics["open_set"] = open_set_report
    if calibration is not None:
        metrics["calibration"] = calibration
    wrong = misclassified(rows, labels, y_true, probs)
    metrics["misclassified"] = len(wrong)
    write_misclassified(wrong, out_dir / "misclassified.csv")
    plot_confusion_matrix(labels, metrics["confusion_matrix"]["rows_true_columns_predicted"],
                          out_dir / "confusion_matrix.png")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
