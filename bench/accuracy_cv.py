"""Accuracy with less noise than one test split: k-fold cross-validation over all the shared photos, several
methods paired fold by fold (same folds, same seeds), each difference to the first method with a 95 % interval.

A test split of ~150 photos moves by 0.7 points per photo, so one split cannot tell two methods 1-2 points apart;
five folds that each hold out a fifth of the photos can, roughly. Each fold: validation = 80 photos of the other
four fifths (early stopping and the calibration temperature), train = the rest; the bottleneck and activation caches
are the user's own.

Methods (``--methods``, comma-separated; the first is the reference of the paired differences):
- ``frozen``: MobileNet v1 1.0/224 frozen, head on bottlenecks (the default recipe);
- ``fine_tuned_1_block``: the same, then ``--fine_tune_blocks 1``;
- ``lite0_frozen``, ``lite1_frozen``, ``lite2_frozen``: EfficientNet-Lite0/1/2 frozen;
- ``lite0_fine_tuned_whole``: Lite0 frozen, then ``--fine_tune_whole`` (slow: minutes per fold on 2 cores);
  ``lite1_fine_tuned_whole`` the same with Lite1 (240 pixels);
- ``<method>_mirror`` (``frozen``, ``lite0_frozen``, ``lite2_frozen``, ``lite0_fine_tuned_whole``): the same trained
  network and head (reused from the plain method in the same run) reading mirror-averaged features (``--mirror_tta``);
- ``<method>_at<S>`` (a whole fine-tuned or frozen Lite or MobileNet method): the same trained network and head
  (reused from the plain method in the same run) reading photos resized to S pixels, not the size it trained at
  (``training_job.fixres``); the soup's runs alone are not scored again at S;
- ``<method>@N``: the same, trained on N of the fold's training photos only (the same N in every method, nested: a
  smaller N keeps a subset of a larger one's), the learning curve that tells what more photos would buy;
- ``<method>:E`` (for the fine-tuned ones): at most E fine-tuning epochs (``--fine_tune_epochs E``: the cosine
  decay ends there) instead of the training job's default; ``lite0_fine_tuned_whole:6@400`` combines both;
- ``<method>+FIELD=VALUE`` (repeatable, last): the same with that ``TrainConfig`` field changed, e.g.
  ``lite0_fine_tuned_whole:6+fine_tune_learning_rate=3e-4``. A whole fine-tuned method averaging several runs (the
  default's 2, or ``+fine_tune_soup=N``) is also paired with each of its runs alone on the same folds, and the
  ensemble of those runs (their answers averaged, N times the served cost) with it; a ``_mirror`` method reuses its
  plain method's runs, scored without mirroring.
Per method and fold: top-1 accuracy, balanced accuracy, expected calibration error before/after temperature scaling
and the training seconds (head, plus fine-tuning; bottlenecks excluded, as they are cached across runs); for whole
fine-tuning also its epochs run, best epoch and what stopped it. And the "not a mushroom" check as the training job
calibrates it (``training_job.open_set.calibrate``: centroids from the fold's training photos, threshold at a quantile
of its training and validation photos' scores) at each of ``OPEN_SET_RATES``: the share of the fold's test mushrooms
and of the not-mushroom photos (``--not_mushrooms``) it rejects, and how many folds meet both of issue 14's targets.
Per method, every misclassified test photo (its path under ``--data``, label, prediction and both probabilities), to
look at what the method gets wrong.

Usage: python -m bench.accuracy_cv [--data DIR] [--folds 5] [--methods frozen,lite0_frozen] [--result NAME]
       [--compare-to RESULT:METHOD] [--save-logits DIR] [--not_mushrooms DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import (
    MUSHROOMS_REJECTED_AT_MOST, NOT_MUSHROOMS_REJECTED_AT_LEAST, OPEN_SET_RATES, write_result,
)
from training_job.paths import shared_data_dir

VALIDATION_PHOTOS = 80
DEFAULT_METHODS = "frozen,fine_tuned_1_block,lite0_frozen"
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
METHOD_ARCHITECTURES = {
    "frozen": "mobilenet_1.0_224",
    "fine_tuned_1_block": "mobilenet_1.0_224",
    "lite0_frozen": "efficientnet_lite0",
    "lite1_frozen": "efficientnet_lite1",
    "lite2_frozen": "efficientnet_lite2",
    "lite0_fine_tuned_whole": "efficientnet_lite0",
    "lite1_fine_tuned_whole": "efficientnet_lite1",
    "frozen_mirror": "mobilenet_1.0_224",
    "lite0_frozen_mirror": "efficientnet_lite0",
    "lite2_frozen_mirror": "efficientnet_lite2",
    "lite0_fine_tuned_whole_mirror": "efficientnet_lite0",
}
MIRROR = "_mirror"
AT_SIZE = re.compile(r"^(.+)_at(\d+)$")  # <method>_at<S>: the plain method's network read at S pixels
SOUP_RUNS_SCORED = ("fine_tune_runs_test_accuracy", "fine_tune_runs_ensemble_test_accuracy")
UNUSED_SPLIT = "unused"  # a split training never reads (as bench/calibration_cv.py marks them)


def parse_method(method: str) -> tuple[str, int | None, int | None]:
    """``lite0_fine_tuned_whole:6@600`` -> ("lite0_fine_tuned_whole", 600, 6): (name, training photos, fine-tuning
    epochs); without ``@`` every training photo, without ``:`` the training job's default epochs. ``+`` overrides
    (``config_overrides``) are not part of these."""
    spec, _, photos = method.split("+", 1)[0].partition("@")
    name, _, epochs = spec.partition(":")
    return name, int(photos) if photos else None, int(epochs) if epochs else None


def method_architecture(name: str) -> str | None:
    """The base architecture of a method's ``parse_method`` name (``_at<S>`` read as its plain method), or None for
    an unknown method; ``_at<S>`` of a method whose network ``fixres.ResizedBase`` cannot rebuild (mirror-averaged,
    last blocks fine-tuned) is unknown."""
    at_size = AT_SIZE.match(name)
    if at_size and (at_size.group(1).endswith(MIRROR) or at_size.group(1) == "fine_tuned_1_block"):
        return None
    return METHOD_ARCHITECTURES.get(at_size.group(1) if at_size else name)


def config_overrides(method: str) -> dict:
    """``lite0_fine_tuned_whole+fine_tune_learning_rate=3e-4+dropout=0.5`` -> the TrainConfig fields it changes,
    each value converted to the field's declared type (``int | None`` -> int)."""
    from training_job.train import TrainConfig

    declared = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    overrides = {}
    for part in method.split("+")[1:]:
        field, equals, text = part.partition("=")
        if not equals or field not in declared:
            raise ValueError(f"{part!r} in {method!r} is not FIELD=VALUE for a TrainConfig field")
        kind = kinds[declared[field].split("|")[0].strip()]
        overrides[field] = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
    return overrides


def earlier_folds(spec: str, folds: int) -> tuple[int, list[float]]:
    """``RESULT:METHOD`` -> (photos, METHOD's top-1 per fold) of bench/results/RESULT.json, which must have ``folds``
    folds."""
    import json

    from bench.common import RESULTS_DIR

    name, _, method = spec.partition(":")
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        sys.exit(f"--compare-to {spec}: no {path}")
    earlier = json.loads(path.read_text())
    if earlier["folds"] != folds:
        sys.exit(f"--compare-to {spec}: {path.name} has {earlier['folds']} folds, this run {folds}")
    if not all(method in f for f in earlier["per_fold"]):
        sys.exit(f"--compare-to {spec}: {path.name} has no method {method!r}")
    return earlier["photos"], [f[method] for f in earlier["per_fold"]]


def fold_rows(rows, folds: list[np.ndarray], k: int, train_photos: int | None = None):
    """Fold ``k`` as test, 80 of the rest as validation, the others (or the first ``train_photos`` of them, in the
    same fixed order for every method) as train."""
    rest = np.concatenate([folds[j] for j in range(len(folds)) if j != k])
    train = rest[VALIDATION_PHOTOS:]
    split = {int(i): "test" for i in folds[k]}
    split.update({int(i): "validation" for i in rest[:VALIDATION_PHOTOS]})
    split.update({int(i): "train" if train_photos is None or n < train_photos else UNUSED_SPLIT
                  for n, i in enumerate(train)})
    return [dataclasses.replace(row, split=split[i]) for i, row in enumerate(rows)]


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in np.unique(truth)]))


def paired_difference(values: list[float], reference: list[float]) -> dict:
    diff = np.array(values) - np.array(reference)
    n = len(diff)
    se = float(np.std(diff, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    t = T_95.get(n - 1, 1.96)
    mean = float(diff.mean())
    return {"mean": round(mean, 4), "standard_error": round(se, 4),
            "ci95": [round(mean - t * se, 4), round(mean + t * se, 4)]}


@dataclasses.dataclass
class MethodRun:
    """One method trained on one fold: its head, the test and validation features it reads, the training seconds,
    details for the result, the network that made the features (a fine-tuned copy, or the base itself) and its
    features of the training photos (the open-set centroids')."""
    head: object
    test: object
    validation: object
    seconds: float
    details: dict
    network: object
    train: object


def open_set_rates(run: MethodRun, train_index: np.ndarray, n_classes: int, not_mushrooms=None) -> dict:
    """``{rate: {"test_rejected", "not_mushrooms_rejected"}}``: the open-set check calibrated as the training job
    does at each of ``OPEN_SET_RATES``, and the shares of the test photos and of ``not_mushrooms`` (Bottlenecks read
    by the run's network; None: not measured) it rejects."""
    from training_job.open_set import DEFAULT_METHOD, calibrate

    out = {}
    for rate in OPEN_SET_RATES:
        check = calibrate(DEFAULT_METHOD, run.train, train_index, n_classes, run.validation, rate)
        out[str(rate)] = {
            "test_rejected": round(float(np.mean(check.not_a_mushroom(run.test.features, run.test.imagenet))), 4),
            "not_mushrooms_rejected": None if not_mushrooms is None else round(float(np.mean(
                check.not_a_mushroom(not_mushrooms.features, not_mushrooms.imagenet))), 4)}
    return out


def open_set_summary(per_fold_rates: list[dict]) -> dict:
    """Per rate, over the folds: the mean shares rejected, and the folds meeting both targets."""
    summary = {}
    for rate in per_fold_rates[0]:
        folds = [f[rate] for f in per_fold_rates]
        measured_ood = all(f["not_mushrooms_rejected"] is not None for f in folds)
        summary[rate] = {
            "test_rejected": round(float(np.mean([f["test_rejected"] for f in folds])), 4),
            "test_rejected_max": max(f["test_rejected"] for f in folds),
            "not_mushrooms_rejected": round(float(np.mean([f["not_mushrooms_rejected"] for f in folds])), 4)
            if measured_ood else None,
            "not_mushrooms_rejected_min": min(f["not_mushrooms_rejected"] for f in folds) if measured_ood else None,
            "folds_meeting_both": sum(f["test_rejected"] <= MUSHROOMS_REJECTED_AT_MOST
                                      and f["not_mushrooms_rejected"] >= NOT_MUSHROOMS_REJECTED_AT_LEAST
                                      for f in folds) if measured_ood else None}
    return summary


def _plain_run(plain: str, rows_k, k: int, base, work: Path, done: dict) -> MethodRun:
    """Method ``plain`` on fold ``k``: its run in ``done``, made first if it has none (a mirror or ``_at<S>`` method
    reads its plain method's network)."""
    if (plain, k) not in done:
        done[(plain, k)] = run_method(plain, rows_k, k, base, work, done)
    return done[(plain, k)]


def _read_by(run: MethodRun, network, rows_k, root: Path | None) -> MethodRun:
    """``run`` with its training, test and validation features read by ``network`` (cached under ``root``; None: the
    user's cache)."""
    from training_job.bottlenecks import get_bottlenecks

    train, test, validation = (get_bottlenecks([r for r in rows_k if r.split == s], network, progress=False,
                                               root=root)
                               for s in ("train", "test", "validation"))
    return dataclasses.replace(run, test=test, validation=validation, network=network, train=train)


def run_method(method: str, rows_k, k: int, base, work: Path, done: dict) -> MethodRun:
    """One method on one fold; ``done`` holds the runs so far by (method, fold), so a mirror or ``_at<S>`` method
    reuses its plain method's network and head."""
    from training_job.fine_tune import fine_tune
    from training_job.train import TrainConfig, train_head
    from training_job.whole_fine_tune import fine_tune_whole

    if parse_method(method)[0].endswith(MIRROR):
        from training_job.mirror_tta import MirrorAveragedBase

        run = _plain_run(method.replace(MIRROR, "", 1), rows_k, k, base, work, done)
        # a fold's fine-tuned network is never seen again: its features are cached for this run only, the base's in
        # the user's cache
        return _read_by(run, MirrorAveragedBase(run.network), rows_k,
                        None if run.network is base else work / "bottlenecks")

    at_size = AT_SIZE.match(parse_method(method)[0])
    if at_size:
        from training_job.fixres import ResizedBase

        run = _plain_run(method.replace(f"_at{at_size.group(2)}", "", 1), rows_k, k, base, work, done)
        details = {key: value for key, value in run.details.items() if key not in SOUP_RUNS_SCORED}
        return _read_by(dataclasses.replace(run, details=details), ResizedBase(run.network, int(at_size.group(2))),
                        rows_k, work / "bottlenecks")

    name, _, fine_tune_epochs = parse_method(method)
    architecture = METHOD_ARCHITECTURES[name]
    config = TrainConfig(architecture=architecture, seed=k,
                         fine_tune_blocks=1 if name == "fine_tuned_1_block" else 0,
                         fine_tune_whole=name.endswith("whole"))
    if fine_tune_epochs is not None:
        config = dataclasses.replace(config, fine_tune_epochs=fine_tune_epochs)
    config = dataclasses.replace(config, **config_overrides(method))
    details = {}
    frozen = train_head(rows_k, config, work / "tensorboard", f"{method}-fold{k}", base=base, progress=False)
    seconds = frozen.seconds
    head, splits, network = frozen.head, frozen.split_bottlenecks, base
    if config.fine_tune_blocks:
        tuned = fine_tune(rows_k, config, base, head, splits, work / "tensorboard" / f"{method}-fold{k}",
                          progress=False)
        head, splits, network, seconds = tuned.head, tuned.split_bottlenecks, tuned.base, seconds + tuned.seconds
    elif config.fine_tune_whole:
        started = time.monotonic()
        tuned = fine_tune_whole(rows_k, config, base, head, work / "tensorboard" / f"{method}-fold{k}",
                                work / f"checkpoint-{method}-fold{k}", progress=False)
        head, splits, network = tuned.head, tuned.split_bottlenecks, tuned.base
        seconds += time.monotonic() - started
        details = {"fine_tune_epochs_run": tuned.epochs_run, "fine_tune_best_epoch": tuned.best_epoch,
                   "fine_tune_stopped_by": tuned.stopped_by}
        if tuned.run_models:  # a soup: each run alone on the same test photos, paired with their average
            from training_job.bottlenecks import load_pixels

            index = {label: i for i, label in enumerate(head.labels)}
            test_rows = [r for r in rows_k if r.split == "test"]
            pixels = np.stack([load_pixels(r.path, base.image_size) for r in test_rows]).astype(np.float32)
            truth = np.array([index[r.label] for r in test_rows])
            probabilities = [model.predict(pixels, batch_size=32, verbose=0) for model in tuned.run_models]
            details["fine_tune_runs_test_accuracy"] = [float(np.mean(p.argmax(1) == truth)) for p in probabilities]
            # what serving every run and averaging their answers would score (at as many times the served cost)
            details["fine_tune_runs_ensemble_test_accuracy"] = float(
                np.mean(np.mean(probabilities, axis=0).argmax(1) == truth))
            details["fine_tune_soup"] = tuned.soup
            details["fine_tune_runs"] = tuned.runs
    return MethodRun(head, splits["test"], splits["validation"], seconds, details, network, splits["train"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "mushrooms"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, from {list(METHOD_ARCHITECTURES)}, each optionally :E, @N and "
                             "+FIELD=VALUE")
    parser.add_argument("--result", default="accuracy_cv", help="bench/results/<NAME>.json")
    parser.add_argument("--compare-to", metavar="RESULT:METHOD", action="append", default=[],
                        help="also pair each method with METHOD of an earlier run's bench/results/RESULT.json (the "
                             "same folds: same photos and --folds; checked), e.g. accuracy_cv_whole_short:"
                             "lite0_fine_tuned_whole:6")
    parser.add_argument("--save-logits", metavar="DIR",
                        help="also write each method's and fold's validation and test logits and labels to "
                             "DIR/<method>-fold<k>.npz (to study calibration without retraining), and the "
                             "open-set scores, features and ImageNet probabilities of the training, validation, test "
                             "and not-mushroom photos to DIR/<method>-fold<k>-open_set.npz")
    parser.add_argument("--not_mushrooms", type=Path, default=shared_data_dir() / "not-mushrooms",
                        help="photos the open-set check should reject (absent: only the test mushrooms' rate)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if method_architecture(parse_method(m)[0]) is None]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHOD_ARCHITECTURES)}")
    for method in methods:
        try:
            config_overrides(method)
        except ValueError as exc:
            parser.error(str(exc))

    earlier = {spec: earlier_folds(spec, args.folds) for spec in args.compare_to}

    from training_job.bottlenecks import BaseNetwork, get_bottlenecks
    from training_job.calibration import calibration_report, fit_temperature
    from training_job.evaluate import photo_rows
    from training_job.open_set import DEFAULT_METHOD, class_centroids, method_scores
    from training_job.prepare import prepare_dataset

    work = Path(tempfile.mkdtemp(prefix="accuracy-cv-"))
    rows = prepare_dataset(args.data, work / "dataset", per_class=0, progress=False)
    for spec, (photos, _) in earlier.items():  # checked before hours of training, not after
        if photos != len(rows):
            sys.exit(f"--compare-to {spec}: that run had {photos} photos, this one {len(rows)}: not the same folds")
    labels = sorted({r.label for r in rows})
    index = {label: i for i, label in enumerate(labels)}
    not_mushroom_rows = photo_rows(args.not_mushrooms) if args.not_mushrooms.is_dir() else []
    folds = np.array_split(np.random.default_rng(0).permutation(len(rows)), args.folds)
    bases = {}
    done: dict = {}
    per_fold = []
    for k in range(args.folds):
        rows_k = fold_rows(rows, folds, k)
        truth = np.array([index[r.label] for r in rows_k if r.split == "test"])
        y_val = np.array([index[r.label] for r in rows_k if r.split == "validation"])
        entry = {"fold": k, "test_photos": len(truth), "train_photos": sum(r.split == "train" for r in rows_k)}
        for method in methods:
            name, train_photos, _ = parse_method(method)
            architecture = method_architecture(name)
            if architecture not in bases:
                bases[architecture] = BaseNetwork(architecture)
            rows_method = fold_rows(rows, folds, k, train_photos)
            y_train = np.array([index[r.label] for r in rows_method if r.split == "train"])
            if (method, k) not in done:
                done[(method, k)] = run_method(method, rows_method, k, bases[architecture], work, done)
            run = done[(method, k)]
            head, test, validation = run.head, run.test, run.validation
            validation_logits, test_logits = head.logits(validation.features), head.logits(test.features)
            temperature = fit_temperature(validation_logits, y_val)
            # read by the fold's own network, cached only for this run (a fine-tuned network is never seen again)
            not_mushrooms = get_bottlenecks(not_mushroom_rows, run.network, root=work / "not-mushrooms",
                                            progress=False) if not_mushroom_rows else None
            if args.save_logits:
                Path(args.save_logits).mkdir(parents=True, exist_ok=True)
                np.savez(Path(args.save_logits) / f"{method}-fold{k}.npz", validation=validation_logits,
                         validation_labels=y_val, test=test_logits, test_labels=truth)
                centroids = class_centroids(run.train.features, y_train, len(labels))
                splits = {"train": run.train, "validation": validation, "test": test, "not_mushrooms": not_mushrooms}
                np.savez(Path(args.save_logits) / f"{method}-fold{k}-open_set.npz", train_labels=y_train, **{
                    f"{split}_{what}": value for split, b in splits.items() if b is not None
                    for what, value in (("scores", method_scores(DEFAULT_METHOD, b.features, b.imagenet, centroids)),
                                        ("features", b.features), ("imagenet", b.imagenet))})
            calibration = calibration_report(test_logits, truth, temperature)
            probabilities = head.predict(test.features)
            predicted = probabilities.argmax(1)
            entry[method] = float(np.mean(predicted == truth))
            test_rows = [r for r in rows_k if r.split == "test"]
            entry[f"{method}_misclassified"] = [
                {"photo": os.path.relpath(test_rows[i].path, args.data), "label": labels[truth[i]],
                 "predicted": labels[predicted[i]], "p_predicted": round(float(probabilities[i, predicted[i]]), 3),
                 "p_label": round(float(probabilities[i, truth[i]]), 3)}
                for i in np.flatnonzero(predicted != truth)]
            entry[f"{method}_details"] = {
                "balanced_accuracy": round(balanced_accuracy(truth, predicted), 4),
                "ece_before": round(calibration["ece_before"], 4), "ece_after": round(calibration["ece_after"], 4),
                "temperature": round(temperature, 3), "train_seconds": round(run.seconds, 1),
                "open_set": open_set_rates(run, y_train, len(labels), not_mushrooms),
                **run.details}
        per_fold.append(entry)
        print({key: value for key, value in entry.items() if not key.endswith("_misclassified")}, flush=True)
    result = {"photos": len(rows), "folds": args.folds, "methods": methods, "reference": methods[0],
              "per_fold": per_fold}
    for method in methods:
        values = [f[method] for f in per_fold]
        details = [f[f"{method}_details"] for f in per_fold]
        result[method] = {"mean": round(float(np.mean(values)), 4), "min": min(values), "max": max(values),
                          **{key: round(float(np.mean([d[key] for d in details])), 4)
                             for key in ("balanced_accuracy", "ece_before", "ece_after", "train_seconds")},
                          "open_set": open_set_summary([d["open_set"] for d in details]),
                          "misclassified": sorted((m for f in per_fold for m in f.pop(f"{method}_misclassified")),
                                                  key=lambda m: m["photo"])}
        if method != methods[0]:
            result.setdefault("paired_differences", {})[f"{method} - {methods[0]}"] = paired_difference(
                values, [f[methods[0]] for f in per_fold])
        if all("fine_tune_runs_test_accuracy" in d for d in details):  # a soup against each of its runs alone
            alone = list(zip(*(d["fine_tune_runs_test_accuracy"] for d in details)))
            result[method]["runs_alone"] = [round(float(np.mean(run)), 4) for run in alone]
            for i, run in enumerate(alone):
                result.setdefault("paired_differences", {})[f"{method} - its run {i + 1} alone"] = \
                    paired_difference(values, list(run))
            ensemble = [d["fine_tune_runs_ensemble_test_accuracy"] for d in details]
            result[method]["runs_ensemble"] = round(float(np.mean(ensemble)), 4)
            result["paired_differences"][f"its runs' ensemble - {method}"] = paired_difference(ensemble, values)
    for spec, (_, values) in earlier.items():
        for method in methods:
            result.setdefault("paired_differences", {})[f"{method} - {spec}"] = paired_difference(
                [f[method] for f in per_fold], values)
    if "frozen" in methods and "fine_tuned_1_block" in methods:  # the key bench/run_all.py reports
        gain = paired_difference([f["fine_tuned_1_block"] for f in per_fold], [f["frozen"] for f in per_fold])
        result["fine_tune_gain"] = {"mean": gain["mean"], "standard_error": gain["standard_error"]}
    for method in methods:
        print(method, result[method])
    for name, diff in result.get("paired_differences", {}).items():
        print(name, diff)
    write_result(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
