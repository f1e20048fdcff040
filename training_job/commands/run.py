"""`run`: the main job — (gather ->) prepare -> train -> evaluate -> publish, printing where the model went."""
from __future__ import annotations

import argparse
from pathlib import Path

from training_job.errors import UserError


def default_data() -> Path | None:
    from training_job.paths import shared_data_dir

    folder = shared_data_dir() / "mushrooms"
    return folder if folder.is_dir() else None


def register(subparsers) -> None:
    from training_job import prepare as p
    from training_job.commands.publish import add_publish_arguments
    from training_job.commands.train import add_training_arguments

    parser = subparsers.add_parser(
        "run", help="the whole job: (gather ->) prepare -> train -> evaluate -> publish",
        description="Prepare a dataset from --data (one sub-folder per class; default ../shared/data/mushrooms, "
        "else a loudly-flagged synthetic stand-in), train, evaluate on the test split and publish the model "
        "atomically into the registry. With --urls, first download the photos listed in URL-list files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", default=None,
                        help="photo folder with one sub-folder per class (default ../shared/data/mushrooms)")
    parser.add_argument("--urls", default=None, help="folder of URL-list files (one per class) to gather first")
    parser.add_argument("--work_dir", default=None, help="where dataset/, runs/ and tensorboard/ go (default var/)")
    parser.add_argument("--per_class", type=int, default=p.DEFAULT_PER_CLASS,
                        help="photos kept per class, to balance them (0 or unset = all)")
    parser.add_argument("--validation_percentage", type=float, default=p.DEFAULT_VALIDATION_PCT)
    parser.add_argument("--testing_percentage", type=float, default=p.DEFAULT_TEST_PCT)
    parser.add_argument("--demo_percentage", type=float, default=p.DEFAULT_DEMO_PCT)
    add_training_arguments(parser)
    add_publish_arguments(parser)
    g = parser.add_argument_group("champion/challenger (training_job/challenge.py)")
    g.add_argument("--challenge", action="store_true",
                   help="publish only if the new model is not worse than the champion (the newest published version, "
                   "or --champion_version) on the test split: paired bootstrap interval of the accuracy difference "
                   "at or above -margin; both scores go to assets.extra/challenge.json")
    g.add_argument("--champion_version", type=int, default=None, help="the version to beat (default: the newest)")
    g.add_argument("--challenge_margin", type=float, default=0.01,
                   help="non-inferiority margin: how much lower the interval's bound may go")
    g.add_argument("--corrections", default=None,
                   help="provenance.csv of `collect`: its photos' scores are also reported on their own")
    parser.set_defaults(func=run)


def run(args) -> int:
    import os
    import time

    from training_job.commands.publish import publish
    from training_job.commands.train import config_from_args, train_and_report
    from training_job.prepare import format_summary, prepare_dataset, read_report

    if args.work_dir:
        os.environ["MUSHROOM_VAR"] = str(Path(args.work_dir).resolve())
    from training_job.paths import var_dir

    config = config_from_args(args)  # bad flags fail before any slow step
    work = var_dir()
    if args.urls:
        from training_job.gather import gather_photos

        source = Path(args.data).expanduser() if args.data else work / "photos"
        result = gather_photos(args.urls, source)
        print(f"gathered {result.downloaded} new photos into {source} ({result.already_present} already there, "
              f"{len(result.failures)} failed; see {source / 'gather_failures.csv'})")
    elif args.data:
        source = Path(args.data).expanduser()
        if not source.is_dir():
            raise UserError(f"--data {source} is not a folder (expected one sub-folder of photos per class)")
    elif default_data() is not None:
        source = default_data()
    else:
        from training_job.synthetic import SYNTHETIC_WARNING, generate_synthetic_dataset

        print("=" * 100 + f"\n{SYNTHETIC_WARNING}\n" + "=" * 100)
        source = generate_synthetic_dataset(work / "synthetic-photos", per_class=40, seed=0)
    took, started = {}, time.monotonic()

    def step_done(name: str) -> None:
        nonlocal started
        took[name], started = time.monotonic() - started, time.monotonic()

    print(f"[1/4] prepare {source}")
    rows = prepare_dataset(source, work / "dataset", per_class=args.per_class,
                           validation_pct=args.validation_percentage, test_pct=args.testing_percentage,
                           demo_pct=args.demo_percentage)
    print(format_summary(read_report(work / "dataset")))
    step_done("prepare")
    print("[2/4] train + [3/4] evaluate")
    run_dir, metrics = train_and_report(rows, config, args)
    step_done("train + evaluate")
    if args.challenge:
        print("[4/4] challenge the champion, then publish")
        published = publish_challenger(run_dir, args)
        if published is None:
            return 0
        n, version_dir = published
    else:
        print("[4/4] publish")
        n, version_dir, _ = publish(run_dir, args)
    step_done("publish")
    print("steps took: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in took.items()))
    print(f"\nmodel published: {version_dir}  (registry {version_dir.parent.parent}, model {args.model_name}, version {n})")
    print(f"headline: test accuracy {metrics['test_accuracy']:.4f}; not-a-mushroom rejects "
          f"{metrics['open_set']['test_mushrooms_rejected']:.1%} of test mushrooms"
          + (f" and {metrics['open_set']['not_mushrooms_rejected']:.1%} of non-mushroom photos"
             if "not_mushrooms_rejected" in metrics["open_set"] else ""))
    return 0


def publish_challenger(run_dir: Path, args) -> tuple[int, Path] | None:
    """Export the run into a staging version, judge it against the champion there, and commit it only when it is
    not worse; None (and the report in the run folder) when it is refused."""
    from training_job.challenge import ChallengeRefused, challenge, champion_dir, correction_hashes, write_report
    from training_job.commands.publish import registry_of
    from training_job.pipeline import export_run, load_run
    from training_job.publish import publish_dir

    registry = registry_of(args)
    try:
        champion = champion_dir(registry, args.model_name, args.champion_version)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    rows = load_run(run_dir)[0]
    corrections = correction_hashes(args.corrections)
    reports = {}

    def build(staging: Path) -> None:
        export_run(run_dir, staging, model_name=args.model_name, tflite=not args.no_tflite)
        if champion is None:
            report = {"publish": True, "champion": None, "reason": "no champion yet: the first version is published"}
        else:
            report = challenge(staging, champion, rows, corrections, args.challenge_margin)
        write_report(report, Path(run_dir))
        reports["last"] = report
        if not report["publish"]:
            raise ChallengeRefused(report)
        write_report(report, staging / "assets.extra")

    try:
        n, version_dir = publish_dir(build, registry, args.model_name)
    except ChallengeRefused as refused:
        r = refused.report
        print(f"NOT PUBLISHED: {r['reason']} (challenger {r['challenger_accuracy']:.4f}, champion "
              f"{r['champion_accuracy']:.4f} on {r['test_photos']} test photos; report in "
              f"{run_dir / 'challenge.json'})")
        return None
    r = reports["last"]
    if r.get("champion"):
        print(f"challenge passed: {r['reason']} (challenger {r['challenger_accuracy']:.4f}, champion "
              f"{r['champion_accuracy']:.4f} on {r['test_photos']} test photos)")
    else:
        print(r["reason"])
    if not args.no_tflite:
        from training_job.pipeline import publish_variants

        publish_variants(version_dir, registry, args.model_name)
    return n, version_dir
