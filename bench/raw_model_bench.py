"""The reference everything else is divided by: the published SavedModel called in-process (no server).

Measures throughput at batch 1, 8 and 32 and the tutorial's way of classifying one photo (a fresh process loads the
model and classifies it, like label_image.py's 0.237 s). Usage: python -m bench.raw_model_bench [--registry DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import (
    load_serving_signature, published_version_or_exit, raw_throughput, sample_photos, write_result,
)
from training_job.paths import default_registry
from training_job.preprocessing import load_image_file

TUTORIAL_SCRIPT = """
import sys, time
t0 = time.perf_counter()
import numpy as np, tensorflow as tf
from training_job.preprocessing import load_image_file
model = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
t1 = time.perf_counter()
pixels = load_image_file(sys.argv[2])[None]
out = model(images=tf.constant(pixels))
best = int(np.argmax(out["probabilities"].numpy()[0]))
t2 = time.perf_counter()
print(f"{t1 - t0:.4f} {t2 - t1:.4f} {out['classes'].numpy()[0][best].decode()}")
"""


def tutorial_way(version_dir: Path, photo: Path, runs: int) -> dict:
    loads, classifies, totals = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", TUTORIAL_SCRIPT, str(version_dir), str(photo)],
                             capture_output=True, text=True, check=True).stdout.split()
        totals.append(time.perf_counter() - start)
        loads.append(float(out[0]))
        classifies.append(float(out[1]))
    return {"process_total_s": float(np.median(totals)), "model_load_s": float(np.median(loads)),
            "classify_one_photo_s": float(np.median(classifies)), "runs": runs,
            "tutorial_label_image_s": 0.237}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--model_name", default="mushrooms")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per batch size")
    parser.add_argument("--tutorial_runs", type=int, default=3)
    args = parser.parse_args(argv)

    version_dir = published_version_or_exit(args.registry, args.model_name)
    signature = load_serving_signature(version_dir)
    photos = sample_photos(32)
    pixels = np.stack([load_image_file(p) for p in photos])
    result = {"model": str(version_dir), "raw_model": [raw_throughput(signature, pixels, b, args.seconds) for b in (1, 8, 32)],
              "tutorial_way": tutorial_way(version_dir, photos[0], args.tutorial_runs)}
    for row in result["raw_model"]:
        print(f"raw model batch {row['batch']:>2}: {row['images_per_s']:7.1f} img/s  p50 {row['p50_ms']:.1f} ms")
    tw = result["tutorial_way"]
    print(f"tutorial's way: {tw['process_total_s']:.2f} s per process, {tw['classify_one_photo_s'] * 1000:.0f} ms to "
          f"classify the photo once loaded (label_image.py: 237 ms)")
    write_result("raw_model", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
