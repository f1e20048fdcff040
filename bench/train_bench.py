"""Training time on all the shared photos and test accuracy: the head alone (--no_fine_tune_whole) cold (empty
bottleneck cache) and warm (cached), then the default recipe (whole-network fine-tuning) and --fine_tune_blocks 1.

    .venv/bin/python bench/train_bench.py [--data DIR] [--out bench/results/train.json]

Each phase builds the base network afresh and runs the real job step (bottlenecks -> head training with early
stopping -> [fine-tuning] -> open-set calibration -> test evaluation). Targets: the head alone cold <= 180 s, warm
<= 30 s on 2 cores; test accuracy >= 0.97 (read from the default recipe, which `make run` publishes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training_job.paths import shared_data_dir  # noqa: E402


MOBILENET = "mobilenet_1.0_224"


def timed_training(rows, work: Path, cache_root: Path, name: str, architecture: str | None = None, **config) -> dict:
    """One run of the job's training step on ``architecture`` (default: the job's default)."""
    from training_job.bottlenecks import BaseNetwork
    from training_job.pipeline import train_run
    from training_job.train import DEFAULT_ARCHITECTURE, TrainConfig

    started = time.monotonic()
    base = BaseNetwork(architecture or DEFAULT_ARCHITECTURE)
    run_dir, metrics = train_run(rows, TrainConfig(architecture=base.architecture, **config), work / "runs" / name,
                                 base=base, tensorboard_root=work / "tensorboard", cache_root=cache_root,
                                 progress=False)
    seconds = time.monotonic() - started
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {
        "architecture": base.architecture,
        "seconds": round(seconds, 2),
        "bottlenecks_computed": summary["bottlenecks_computed"],
        "head_training_seconds": round(summary["train_seconds"], 2),
        "epochs_run": summary["epochs_run"],
        "validation_accuracy": summary["validation_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "test_photos": metrics["test_photos"],
        "open_set": {k: v for k, v in metrics["open_set"].items() if k != "candidates_at_same_reject_rate"},
        **({"fine_tune": summary["fine_tune"]} if "fine_tune" in summary else {}),
        **({"fine_tune_whole": summary["fine_tune_whole"]} if "fine_tune_whole" in summary else {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "mushrooms"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    args = parser.parse_args()

    from training_job.prepare import prepare_dataset

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        work = Path(tmp)
        rows = prepare_dataset(args.data, work / "dataset", per_class=0, progress=False)
        photos = sum(1 for p in Path(args.data).rglob("*") if p.is_file())
        cache_root = work / "bottleneck-cache"  # empty: the cold run computes every bottleneck
        cold = timed_training(rows, work, cache_root, "cold", fine_tune_whole=False)
        warm = timed_training(rows, work, cache_root, "warm", fine_tune_whole=False)
        default_recipe = timed_training(rows, work, cache_root, "default_recipe")
        # --fine_tune_blocks works on MobileNet only: its bottlenecks made warm first (not reported), then the
        # block-13 activations cold, which is what --fine_tune_blocks 1 adds the first time
        timed_training(rows, work, cache_root, "mobilenet_warm", architecture=MOBILENET, fine_tune_whole=False)
        fine_tuned = timed_training(rows, work, cache_root, "fine_tuned", architecture=MOBILENET, fine_tune_blocks=1,
                                    fine_tune_whole=False)
    result = {
        "photos_in_folder": photos,
        "photos_after_prepare": len(rows),
        "splits": {s: sum(1 for r in rows if r.split == s) for s in ("train", "validation", "test", "demo")},
        "cold": cold,
        "warm": warm,
        "default_recipe": default_recipe,
        "fine_tuned_1_block": fine_tuned,
        "targets": {"cold_seconds": 180, "warm_seconds": 30, "test_accuracy": 0.97},
        "met": {"cold": cold["seconds"] <= 180, "warm": warm["seconds"] <= 30,
                "test_accuracy": default_recipe["test_accuracy"] >= 0.97},
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
