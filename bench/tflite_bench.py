"""TFLite vs SavedModel on the CPU, in one run, on the same preprocessed photos: the published version's SavedModel
(serving signature, in-process) against its TFLite float and int8 files (LiteRT's interpreter with XNNPACK,
num_threads=2), and the float file's batch split as the model server splits one (``tflite_float_split``:
bench/common.SplitRows, one single-thread interpreter per core, rows one at a time). The float file at batch 32, the
faster of its two ways, is the fastest engine for the same answers: bench/run_all.py's speed targets are ratios to
it.

Measures single-image latency (p50) and batch-32 throughput of each, each TFLite figure also as a ratio to the
SavedModel's from this run, and puts next to them the test accuracies the training job stored in the version's
assets.extra/metrics.json. Phases alternate (SavedModel, float, int8, SavedModel, ...) over --rounds so a burst
of other work on the machine hits all three alike.

Usage: python -m bench.tflite_bench [--registry DIR] [--seconds 8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import (
    FASTEST_ENGINE_THREADS, SplitRows, batch_of, load_serving_signature, published_version_or_exit, sample_photos,
    throughput, time_calls, write_result,
)
from training_job.paths import default_registry
from training_job.preprocessing import load_image_file
from training_job.tflite_export import tflite_interpreter, tflite_predict

BATCH = 32
THREADS = FASTEST_ENGINE_THREADS  # the reference's threads: this bench measures it


class TFLiteModel:
    """One exported .tflite file; ``classify(pixels)`` takes uint8 [N, S, S, 3] like the SavedModel.

    A batch runs as one invoke when the interpreter accepts a resized batch dimension, else photo by photo
    (``batched`` says which)."""

    def __init__(self, path: Path, batch: int):
        self.single = tflite_interpreter(path, threads=THREADS)
        try:
            self.multi, self.batched = tflite_interpreter(path, batch=batch, threads=THREADS), True
        except (ValueError, RuntimeError):
            self.multi, self.batched = None, False

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 1:
            return tflite_predict(self.single, pixels)
        if self.batched:
            return tflite_predict(self.multi, pixels)
        return np.concatenate([tflite_predict(self.single, p[None]) for p in pixels])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--model_name", default="mushrooms")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per model and mode (all rounds)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the three models")
    args = parser.parse_args(argv)

    version_dir = published_version_or_exit(args.registry, args.model_name)
    stored = json.loads((version_dir / "assets.extra" / "metrics.json").read_text())
    tflite_metrics = stored.get("tflite")
    if not tflite_metrics:
        print(f"{version_dir} has no TFLite export (published with --no_tflite?)", file=sys.stderr)
        return 2
    import tensorflow as tf

    signature = load_serving_signature(version_dir)
    tflite = {kind: TFLiteModel(version_dir / tflite_metrics[f"{kind}_file"], BATCH) for kind in ("float", "int8")}
    pixels = np.stack([load_image_file(p) for p in sample_photos(BATCH)])
    one, many = pixels[:1], batch_of(pixels, BATCH)
    one_tf, many_tf = tf.constant(one), tf.constant(many)
    calls = {
        "savedmodel": {1: lambda: signature(images=one_tf)["probabilities"].numpy(),
                       BATCH: lambda: signature(images=many_tf)["probabilities"].numpy()},
        **{f"tflite_{kind}": {1: (lambda m=model: m.classify(one)), BATCH: (lambda m=model: m.classify(many))}
           for kind, model in tflite.items()},
    }
    split = SplitRows(version_dir / tflite_metrics["float_file"])  # the float file's batch as the model server runs it
    calls["tflite_float_split"] = {1: calls["tflite_float"][1], BATCH: lambda: split.classify(many)}
    # the three must agree on the photos before their speed means anything
    reference = calls["savedmodel"][BATCH]().argmax(1)
    agreement = {name: float(np.mean(c[BATCH]().argmax(1) == reference)) for name, c in calls.items()}

    times = {name: {1: [], BATCH: []} for name in calls}
    for _ in range(args.rounds):
        for batch in (1, BATCH):
            for name, by_batch in calls.items():
                times[name][batch] += time_calls(by_batch[batch], args.seconds / args.rounds)
    accuracy = {"savedmodel": tflite_metrics.get("savedmodel_test_accuracy", stored.get("test_accuracy")),
                "tflite_float": tflite_metrics["float_test_accuracy"],
                "tflite_int8": tflite_metrics["int8_test_accuracy"]}
    accuracy["tflite_float_split"] = accuracy["tflite_float"]
    models = {}
    for name in calls:
        single, batched = throughput(times[name][1], 1), throughput(times[name][BATCH], BATCH)
        models[name] = {"single_image": single, f"batch_{BATCH}": batched,
                        "test_accuracy": accuracy[name], "top1_agreement_with_savedmodel": agreement[name],
                        "file_bytes": tflite_metrics.get(f"{name.removeprefix('tflite_')}_bytes")}
    for kind, model in tflite.items():
        models[f"tflite_{kind}"]["batch_as_one_invoke"] = model.batched
    base = models["savedmodel"]
    for row in models.values():
        row["p50_vs_savedmodel"] = row["single_image"]["p50_ms"] / base["single_image"]["p50_ms"]
        row["throughput_vs_savedmodel"] = row[f"batch_{BATCH}"]["images_per_s"] / base[f"batch_{BATCH}"]["images_per_s"]
    from importlib.metadata import version

    result = {"model": str(version_dir), "threads": THREADS, "photos": len(pixels), "batch": BATCH,
              "engine": f"LiteRT {version('ai-edge-litert')} (XNNPACK)",
              "seconds_per_phase": args.seconds, "rounds": args.rounds,
              "test_photos": stored.get("test_photos"), "models": models}
    for name, row in models.items():
        print(f"{name:13s} single p50 {row['single_image']['p50_ms']:6.1f} ms ({row['p50_vs_savedmodel']:.2f}x)  "
              f"batch {BATCH} {row[f'batch_{BATCH}']['images_per_s']:6.1f} img/s ({row['throughput_vs_savedmodel']:.2f}x)"
              f"  test accuracy {row['test_accuracy']:.3f}  agreement {row['top1_agreement_with_savedmodel']:.2f}")
    write_result("tflite", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
