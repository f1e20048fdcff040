"""Wall time of publishing one training run: ``python -m training_job publish --run_dir RUN`` into a fresh temporary
registry, as `make run`'s last training step runs it (SavedModel with its warm-up records, model.tflite, the int8
file and the int8 variant), whole commands including their start-up.

--compare-to DIR runs the same command from another checkout's code (DIR, e.g. a `git archive` of the commit before
a change) on the same run, rounds alternating ABBA, and adds its figures and the paired ratios.

Usage: python -m bench.publish_bench [--run_dir RUN] [--rounds 2] [--compare-to DIR [--compare-label TEXT]]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import alternating_rounds, median, write_result
from training_job.paths import PROJECT_ROOT, var_dir


def newest_run(runs: Path) -> Path | None:
    """The newest run folder under ``runs`` that finished training (it has a train_summary.json)."""
    done = sorted((summary.parent for summary in runs.glob("*/train_summary.json")), key=lambda p: p.name)
    return done[-1] if done else None


def publish_seconds(code: Path, run_dir: Path, registry: Path) -> float:
    """One publish of ``run_dir`` into ``registry`` by the code in ``code``: wall seconds; raises on failure."""
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONSAFEPATH": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "training_job", "publish", f"--run_dir={run_dir}",
                    f"--registry={registry}"], cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, default=None, help="default: the newest finished run in var/runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare-to", type=Path, default=None)
    parser.add_argument("--compare-label", default=None, help="what the compared checkout is, for the report "
                        "(e.g. the commit it was archived from); default: its path")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or newest_run(var_dir() / "runs")
    if run_dir is None:
        raise SystemExit("no finished training run in var/runs: train first (make run), or pass --run_dir")
    checkouts = {"this": PROJECT_ROOT}
    if args.compare_to:
        checkouts["compared"] = args.compare_to.resolve()
    with tempfile.TemporaryDirectory(prefix="publish-bench-") as work:

        def publish_with(name: str):
            def one_round() -> float:
                registry = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))  # empty, as a first publish finds it
                took = publish_seconds(checkouts[name], run_dir.resolve(), registry)
                print(f"{name}: {took:.1f} s", flush=True)
                return took
            return one_round

        seconds = alternating_rounds({name: publish_with(name) for name in checkouts}, args.rounds, abba=True)
    result = {"run_dir": str(run_dir), "rounds": args.rounds,
              "publish_seconds": {"rounds": seconds["this"], "median": median(seconds["this"])}}
    if args.compare_to:
        ratios = [a / b for a, b in zip(seconds["this"], seconds["compared"])]
        result["compared_to"] = {"checkout": str(args.compare_to), "label": args.compare_label or str(args.compare_to),
                                 "publish_seconds": {"rounds": seconds["compared"],
                                                     "median": median(seconds["compared"])},
                                 "this_over_compared": {"rounds": ratios, "median": median(ratios)}}
    write_result("publish", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
