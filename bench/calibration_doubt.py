"""Does the temperature fit's doubt (training_job/calibration.py: one error's worth, 1 / (n + 2), spread over the
classes) calibrate the test folds better than the plain likelihood fit? Read on the logits that
``bench/accuracy_cv.py --save-logits DIR`` wrote (no retraining): per method and fold, the test fold's expected
calibration error with the temperature fitted on the fold's validation photos plainly and with the doubt, and with
the temperature fitted on the test fold itself (the oracle: the lowest any single temperature reaches there).

Usage: python -m bench.calibration_doubt DIR [--result calibration_doubt]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from bench.accuracy_cv import paired_difference
from bench.common import write_result
from training_job.calibration import expected_calibration_error, fit_temperature, softmax

FILE = re.compile(r"(?P<method>.+)-fold(?P<fold>\d+)\.npz")


def fold_figures(saved) -> dict:
    """Temperatures and test-fold ECE of the three fits on one fold's saved logits."""
    validation, y_val = saved["validation"], saved["validation_labels"]
    test, y_test = saved["test"], saved["test_labels"]
    temperatures = {"plain": fit_temperature(validation, y_val, doubt=0.0),
                    "doubt": fit_temperature(validation, y_val),
                    "oracle": fit_temperature(test, y_test, doubt=0.0)}
    figures = {"validation_errors": int(np.sum(validation.argmax(1) != y_val)),
               "validation_photos": int(len(y_val)), "test_photos": int(len(y_test))}
    for fit, temperature in temperatures.items():
        figures[f"temperature_{fit}"] = round(temperature, 3)
        figures[f"ece_{fit}"] = round(expected_calibration_error(softmax(test / temperature), y_test), 4)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logits", help="the DIR of bench/accuracy_cv.py --save-logits")
    parser.add_argument("--result", default="calibration_doubt", help="bench/results/<NAME>.json")
    args = parser.parse_args(argv)
    by_method: dict[str, dict[int, dict]] = {}
    for path in sorted(Path(args.logits).glob("*.npz")):
        match = FILE.fullmatch(path.name)
        if match:
            with np.load(path) as saved:
                by_method.setdefault(match["method"], {})[int(match["fold"])] = fold_figures(saved)
    if not by_method:
        sys.exit(f"no <method>-fold<k>.npz in {args.logits}")
    result = {"methods": {}}
    for method, folds in sorted(by_method.items()):
        per_fold = [{"fold": k, **folds[k]} for k in sorted(folds)]
        summary = {f"ece_{fit}": round(float(np.mean([f[f"ece_{fit}"] for f in per_fold])), 4)
                   for fit in ("plain", "doubt", "oracle")}
        summary["doubt_minus_plain"] = paired_difference([f["ece_doubt"] for f in per_fold],
                                                         [f["ece_plain"] for f in per_fold])
        result["methods"][method] = {"folds": len(per_fold), **summary, "per_fold": per_fold}
        print(method, summary)
        for f in per_fold:
            print("  ", f)
    write_result(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
