"""What each training recipe of bench/accuracy_cv.py costs to serve: the served graph a version of that recipe would
publish (``export.build_serving_module``: base, head, "not a mushroom" check), converted to the ``model.tflite``
the model server runs under ``--prefer_tflite_model``, timed with LiteRT (XNNPACK) in this process.

The head and the open-set centroids are random (serving cost does not depend on their values); the bases carry their
ImageNet weights. Recipes: MobileNet v1, EfficientNet-Lite0/1/2 frozen, Lite2 mirror averaged (two passes), Lite0
whole fine-tuned (its tuned network, which gives the features and the ImageNet scores). Per recipe:
single-photo p50 with one thread and with every core (a lone request), and batch-32 throughput on every core. Phases
alternate over --rounds so a burst of other work hits all recipes alike.

Usage: python -m bench.served_latency [--recipes mobilenet,lite0,...] [--seconds 3] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import alternating_rounds, median, percentiles_ms, time_calls, throughput, write_result
from training_job.tflite_signatures import TFLITE_FILE

RECIPES = {  # name -> (architecture, how the base is wrapped)
    "mobilenet_frozen": ("mobilenet_1.0_224", "plain"),
    "lite0_frozen": ("efficientnet_lite0", "plain"),
    "lite1_frozen": ("efficientnet_lite1", "plain"),
    "lite2_frozen": ("efficientnet_lite2", "plain"),
    "lite2_frozen_mirror": ("efficientnet_lite2", "mirror"),
    "lite0_fine_tuned_whole": ("efficientnet_lite0", "whole"),
}
CLASSES = 4
BATCH = 32


def served_base(architecture: str, wrapping: str):
    from training_job.bottlenecks import BaseNetwork

    base = BaseNetwork(architecture)
    if wrapping == "mirror":
        from training_job.mirror_tta import MirrorAveragedBase

        return MirrorAveragedBase(base)
    if wrapping == "whole":
        from training_job.whole_fine_tune import WholeTunedBase, tuned_copy

        # weights moved as fine-tuning moves them, so the file holds what a tuned version's does
        tuned, rng = tuned_copy(base), np.random.default_rng(2)
        tuned.set_weights([w * (1 + 1e-3 * rng.standard_normal(w.shape)).astype(w.dtype) for w in tuned.get_weights()])
        return WholeTunedBase(base, tuned)
    return base


def tflite_of(base, work: Path) -> Path:
    """The recipe's model.tflite, made as the training job makes it (SavedModel, then its serving_default)."""
    from training_job.export import build_serving_module, save_model
    from training_job.open_set import DEFAULT_METHOD, OpenSet
    from training_job.tflite_export import convert_serving_default
    from training_job.train import Head

    rng = np.random.default_rng(0)
    head = Head([f"class_{i}" for i in range(CLASSES)],
                [rng.normal(0, 0.01, (base.feature_size, CLASSES)).astype(np.float32)], [np.zeros(CLASSES, np.float32)])
    centroids = rng.normal(size=(CLASSES, base.feature_size)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    open_set = OpenSet(DEFAULT_METHOD, 0.5, centroids, 0.03, 0.03)
    save_model(build_serving_module(base, head, open_set), work)
    path = work / TFLITE_FILE
    path.write_bytes(convert_serving_default(work))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {list(RECIPES)}")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time of each phase")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")

    from services.model_server.tflite_servable import usable_cores
    from training_job.tflite_export import tflite_interpreter, tflite_predict

    cores = usable_cores()  # as many as the model server gives a lone call
    work = Path(tempfile.mkdtemp(prefix="served-latency-"))
    phases, sizes, file_mb = {}, {}, {}
    for name in recipes:
        base = served_base(*RECIPES[name])
        path = tflite_of(base, work / name)
        sizes[name], file_mb[name] = base.image_size, path.stat().st_size / 1e6
        photos = np.random.default_rng(1).integers(0, 256, (BATCH, base.image_size, base.image_size, 3), np.uint8)
        engines = {"one_thread": tflite_interpreter(path, threads=1),
                   "every_core": tflite_interpreter(path, threads=cores),
                   "batch": tflite_interpreter(path, batch=BATCH, threads=cores)}

        def single(interpreter, photo=photos[:1]) -> dict:
            return percentiles_ms(time_calls(lambda: tflite_predict(interpreter, photo), args.seconds))

        phases[f"{name}/one_thread"] = lambda e=engines["one_thread"], f=single: f(e)
        phases[f"{name}/every_core"] = lambda e=engines["every_core"], f=single: f(e)
        phases[f"{name}/batch"] = lambda e=engines["batch"], p=photos: throughput(
            time_calls(lambda: tflite_predict(e, p), args.seconds), BATCH)
        print(f"{name}: {path.stat().st_size / 1e6:.1f} MB at {base.image_size} px", flush=True)
    figures = alternating_rounds(phases, args.rounds)

    result = {"cores": cores, "batch": BATCH, "rounds": args.rounds, "seconds_per_phase": args.seconds, "recipes": {}}
    for name in recipes:
        row = {"image_size": sizes[name], "tflite_mb": round(file_mb[name], 1),
               "p50_ms_one_thread": median([f["p50_ms"] for f in figures[f"{name}/one_thread"]]),
               "p50_ms_every_core": median([f["p50_ms"] for f in figures[f"{name}/every_core"]]),
               "batch_images_per_s": median([f["images_per_s"] for f in figures[f"{name}/batch"]])}
        result["recipes"][name] = row
        print(f"{name}: single photo p50 {row['p50_ms_one_thread']:.1f} ms (1 thread), "
              f"{row['p50_ms_every_core']:.1f} ms ({cores} threads); batch {BATCH}: "
              f"{row['batch_images_per_s']:.1f} img/s", flush=True)
    write_result("served_latency", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
