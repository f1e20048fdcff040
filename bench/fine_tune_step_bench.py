"""Wall and CPU time of one whole fine-tuning step by the number of frozen first blocks (``--fine_tune_frozen_blocks``),
the settings alternating in one process so that each sees the same minutes of a shared machine.

Each setting is the network whole fine-tuning trains (``whole_fine_tune.tuned_on_pixels``) under a softmax layer,
compiled with Adam, fed by the training job's own pipeline (``whole_fine_tune.augmented_batches``: shuffle, augment on
the fly, batch, prefetch) over --photos of the shared photos. After two untimed steps each (tracing), every round
times --steps steps of each setting in turn, the order reversed every other round; a setting's figure is the median
over the rounds, and its ratio is to the first setting's.

Usage: python -m bench.fine_tune_step_bench [--architecture efficientnet_lite0] [--frozen 0,3,5] [--rounds 6]
       [--steps 4] [--photos 320]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import alternating_rounds, median, sample_photos, write_result


def step_times(steps: dict, rounds: int, steps_per_round: int, clocks=(time.perf_counter, time.process_time)) -> dict:
    """``steps``: setting -> a call running one training step. Each setting's (wall, CPU) seconds per step, one pair a
    round, the settings in turn and their order reversed every other round."""
    def timed(step):
        def one_round() -> tuple:
            before = [clock() for clock in clocks]
            for _ in range(steps_per_round):
                step()
            return tuple((clock() - start) / steps_per_round for clock, start in zip(clocks, before))
        return one_round

    return alternating_rounds({name: timed(step) for name, step in steps.items()}, rounds, abba=True)


def summary(times: dict) -> dict:
    """Per setting: the median wall and CPU seconds per step and their ratios to the first setting's."""
    medians = {name: (median([t[0] for t in rows]), median([t[1] for t in rows])) for name, rows in times.items()}
    first_wall, first_cpu = next(iter(medians.values()))
    return {name: {"wall_s": wall, "cpu_s": cpu, "wall_ratio": wall / first_wall, "cpu_ratio": cpu / first_cpu,
                   "rounds": [list(t) for t in times[name]]}
            for name, (wall, cpu) in medians.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="efficientnet_lite0")
    parser.add_argument("--frozen", default="0,3,5", help="frozen first blocks of each setting; the first is the "
                        "reference of the ratios")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting and round")
    parser.add_argument("--photos", type=int, default=320)
    args = parser.parse_args(argv)
    frozen = [int(n) for n in args.frozen.split(",")]

    import keras

    from training_job.bottlenecks import BaseNetwork
    from training_job.preprocessing import load_image_file
    from training_job.train import TrainConfig
    from training_job.whole_fine_tune import augmented_batches, tuned_copy, tuned_on_pixels

    base = BaseNetwork(args.architecture)
    size = base.image_size
    config = TrainConfig(architecture=args.architecture)
    photos = sample_photos(args.photos)
    pixels = np.stack([load_image_file(p, size) for p in photos])
    labels = np.array([sorted({p.parent.name for p in photos}).index(p.parent.name) for p in photos])
    classes = int(labels.max()) + 1
    batches = iter(augmented_batches(pixels, labels, classes, config, size).repeat())

    def setting(blocks: int):
        inputs, features = tuned_on_pixels(base, tuned_copy(base, frozen_blocks=blocks))
        model = keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(features))
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")

        def step():
            model.train_on_batch(*next(batches))

        step(), step()  # tracing, untimed
        return step

    steps = {f"frozen_{blocks}": setting(blocks) for blocks in frozen}
    settings = summary(step_times(steps, args.rounds, args.steps))
    for name, row in settings.items():
        print(f"{name}: {row['wall_s']:.2f} s wall ({row['wall_ratio']:.2f}x), {row['cpu_s']:.2f} s CPU "
              f"({row['cpu_ratio']:.2f}x) per step of {config.train_batch_size}", flush=True)
    write_result("fine_tune_step", {"architecture": args.architecture, "batch": config.train_batch_size,
                                    "photos": len(photos), "rounds": args.rounds, "steps_per_round": args.steps,
                                    "settings": settings})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
