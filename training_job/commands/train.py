"""`train`: train the classification head on a prepared manifest (flags mirror retrain.py), calibrate the
"not a mushroom" check and evaluate on the test split, into a run folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from training_job.commands import add_flag
from training_job.errors import UserError
from training_job.fine_tune import EPOCHS as BLOCKS_EPOCHS, LEARNING_RATE as BLOCKS_LEARNING_RATE
from training_job.open_set import DEFAULT_REJECT_RATE
from training_job.train import TrainConfig
from training_job.whole_fine_tune import EPOCHS as WHOLE_EPOCHS, FROZEN_BLOCKS as WHOLE_FROZEN_BLOCKS
from training_job.whole_fine_tune import LEARNING_RATE as WHOLE_LEARNING_RATE, SOUP_SIZE as WHOLE_SOUP_SIZE

_DEFAULTS = TrainConfig()


def not_positive(value: float | None) -> bool:
    """A rate or count the user set to zero or less (None = the method's default)."""
    return value is not None and value <= 0


def default_manifest() -> Path:
    from training_job.paths import var_dir

    return var_dir() / "dataset" / "manifest.csv"


def add_training_arguments(parser: argparse.ArgumentParser, architecture: bool = True) -> None:
    g = parser.add_argument_group("training (names as in retrain.py)")
    if architecture:
        g.add_argument("--architecture", default=_DEFAULTS.architecture,
                       help="efficientnet_lite0 (the default), efficientnet_lite1/2 or mobilenet_1.0_224 (built in, "
                       "offline; Lite inputs are 224, 240, 260), or mobilenet_<alpha>_<size>, "
                       "mobilenet_v2_<alpha>_<size>, inception_v3 (these need --weights_file or internet)")
        g.add_argument("--learning_rate", type=float, default=_DEFAULTS.learning_rate, help="Adam learning rate")
    add_flag(g, "--weights_file", default=None, help="Keras ImageNet weights (include_top=True) for --architecture")
    g.add_argument("--how_many_training_steps", type=int, default=None,
                   help="upper bound on training steps (batches); early stopping usually ends sooner")
    g.add_argument("--epochs", type=int, default=None, help="upper bound on epochs instead (default 200)")
    g.add_argument("--train_batch_size", type=int, default=_DEFAULTS.train_batch_size)
    g.add_argument("--validation_batch_size", type=int, default=_DEFAULTS.validation_batch_size)
    g.add_argument("--flip_left_right", action="store_true", help="randomly mirror training photos")
    g.add_argument("--random_crop", type=int, default=0, help="percentage margin randomly cropped")
    g.add_argument("--random_scale", type=int, default=0, help="percentage of random scaling up")
    g.add_argument("--random_brightness", type=int, default=0, help="percentage of random brightness change")
    g.add_argument("--augmented_variants", type=int, default=_DEFAULTS.augmented_variants,
                   help="distorted copies of each training photo (each cached on its own)")
    g.add_argument("--hidden_units", type=int, default=_DEFAULTS.hidden_units,
                   help="ReLU hidden layer size of the head (0 = one softmax layer, as retrain.py)")
    g.add_argument("--label_smoothing", type=float, default=_DEFAULTS.label_smoothing)
    g.add_argument("--dropout", type=float, default=_DEFAULTS.dropout)
    g.add_argument("--l2", type=float, default=_DEFAULTS.l2, help="L2 weight penalty of the head")
    g.add_argument("--patience", type=int, default=_DEFAULTS.patience,
                   help="epochs without validation improvement before early stopping")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--fine_tune_blocks", type=int, default=_DEFAULTS.fine_tune_blocks,
                   help="after the head converges, also train the last N MobileNet blocks with it (0 = frozen base; "
                        "what it gains and costs: bench/REPORT.md, accuracy_cv)")
    g.add_argument("--fine_tune_learning_rate", type=float, default=_DEFAULTS.fine_tune_learning_rate,
                   help=f"fine-tuning's (peak) learning rate: default {WHOLE_LEARNING_RATE:g} for the whole network, "
                        f"{BLOCKS_LEARNING_RATE:g} for --fine_tune_blocks")
    g.add_argument("--fine_tune_epochs", type=int, default=_DEFAULTS.fine_tune_epochs,
                   help="fine-tuning epochs: where the whole network's cosine decay ends (default "
                        f"{WHOLE_EPOCHS}), or the upper bound of --fine_tune_blocks (default {BLOCKS_EPOCHS}); early "
                        "stopping on validation may end either sooner")
    g.add_argument("--fine_tune_whole", dest="fine_tune_whole", action="store_true", default=None,
                   help="the default (unless --fine_tune_blocks): after the head converges, train the whole base "
                        "network with it (augmentation on the fly, BatchNorm frozen, warm-up + cosine learning rate, "
                        "early stopping; resumable with the same --run_dir); uses --fine_tune_learning_rate, "
                        "--fine_tune_epochs and --fine_tune_max_minutes")
    g.add_argument("--no_fine_tune_whole", dest="fine_tune_whole", action="store_false",
                   help="train the head alone on the frozen base's features: minutes faster, less accurate (what "
                        "each recipe gains and costs: README, bench/REPORT.md)")
    g.add_argument("--fine_tune_warmup_epochs", type=int, default=_DEFAULTS.fine_tune_warmup_epochs)
    g.add_argument("--fine_tune_crop_min", type=float, default=_DEFAULTS.fine_tune_crop_min,
                   help="whole fine-tuning's augmentation: the random square crops keep this fraction of the side "
                        "or more (0 < x <= 1)")
    g.add_argument("--fine_tune_frozen_blocks", type=int, default=_DEFAULTS.fine_tune_frozen_blocks,
                   help="whole fine-tuning keeps the stem and this many first blocks of the base as ImageNet trained: "
                        "each step is cheaper, as backpropagation stops where training starts (0 = train them all; "
                        f"default {WHOLE_FROZEN_BLOCKS} for efficientnet_lite<N> and mobilenet_<alpha>_<size>)")
    g.add_argument("--fine_tune_max_minutes", type=float, default=_DEFAULTS.fine_tune_max_minutes,
                   help="wall-clock budget of whole-network fine-tuning, all its runs together (checked after each "
                        "epoch)")
    g.add_argument("--fine_tune_soup", type=int, default=_DEFAULTS.fine_tune_soup,
                   help="whole fine-tuning runs from the same start with other seeds, their weights averaged into "
                        f"the one served network (default {WHOLE_SOUP_SIZE}; they share --fine_tune_max_minutes; 1 = a "
                        "single run)")
    g.add_argument("--mirror_tta", action="store_true",
                   help="mirror test-time augmentation: the served model averages the base's features of each photo "
                        "and its mirror image (two passes per photo); calibration, open set and evaluation use them")
    g.add_argument("--open_set_reject_rate", type=float, default=DEFAULT_REJECT_RATE,
                   help="share of the labelled mushroom photos (training and validation splits) the 'not a "
                        "mushroom' threshold may reject")
    g.add_argument("--not_mushrooms", default=None,
                   help="folder of non-mushroom photos to REPORT open-set rates on (never calibrated on); "
                   "default ../shared/data/not-mushrooms when present")


def whole_fine_tuning(args) -> bool:
    """--fine_tune_whole or --no_fine_tune_whole as given; unset, the default recipe unless --fine_tune_blocks asks
    for the other kind of fine-tuning."""
    if args.fine_tune_whole is not None:
        return args.fine_tune_whole
    return _DEFAULTS.fine_tune_whole and not args.fine_tune_blocks


def config_from_args(args, **override) -> TrainConfig:
    values = dict(
        architecture=getattr(args, "architecture", _DEFAULTS.architecture), weights_file=args.weights_file,
        learning_rate=getattr(args, "learning_rate", _DEFAULTS.learning_rate), epochs=args.epochs,
        how_many_training_steps=args.how_many_training_steps, train_batch_size=args.train_batch_size,
        validation_batch_size=args.validation_batch_size, flip_left_right=args.flip_left_right,
        random_crop=args.random_crop, random_scale=args.random_scale, random_brightness=args.random_brightness,
        augmented_variants=args.augmented_variants, hidden_units=args.hidden_units,
        label_smoothing=args.label_smoothing, dropout=args.dropout,
        l2=args.l2, patience=args.patience, seed=args.seed, fine_tune_blocks=args.fine_tune_blocks,
        fine_tune_learning_rate=args.fine_tune_learning_rate, fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_whole=whole_fine_tuning(args), fine_tune_warmup_epochs=args.fine_tune_warmup_epochs,
        fine_tune_crop_min=args.fine_tune_crop_min, fine_tune_frozen_blocks=args.fine_tune_frozen_blocks,
        fine_tune_max_minutes=args.fine_tune_max_minutes, fine_tune_soup=args.fine_tune_soup,
        mirror_tta=args.mirror_tta,
    )
    values.update(override)
    config = TrainConfig(**values)
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    from training_job.base_weights import parse_architecture

    try:
        parse_architecture(config.architecture)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    problems = []
    if config.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0 (got {config.learning_rate})")
    for name in ("train_batch_size", "validation_batch_size"):
        if getattr(config, name) < 1:
            problems.append(f"--{name} must be at least 1 (got {getattr(config, name)})")
    for name in ("epochs", "how_many_training_steps"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            problems.append(f"--{name} must be at least 1 (got {getattr(config, name)})")
    for name in ("random_crop", "random_scale", "random_brightness"):
        if not 0 <= getattr(config, name) < 100:
            problems.append(f"--{name} is a percentage in [0, 100) (got {getattr(config, name)})")
    if config.hidden_units < 0:
        problems.append(f"--hidden_units must be >= 0 (got {config.hidden_units})")
    if not 0 <= config.dropout < 1:
        problems.append(f"--dropout must be in [0, 1) (got {config.dropout})")
    if not 0 <= config.label_smoothing < 1:
        problems.append(f"--label_smoothing must be in [0, 1) (got {config.label_smoothing})")
    if config.fine_tune_soup is not None and config.fine_tune_soup < 1:
        problems.append(f"--fine_tune_soup must be at least 1 (got {config.fine_tune_soup})")
    if config.fine_tune_blocks:
        from training_job.fine_tune import cut_layer_name
        from training_job.train import TrainingError

        try:
            cut_layer_name(config.architecture, config.fine_tune_blocks)
        except TrainingError as exc:
            problems.append(str(exc))
        if not_positive(config.fine_tune_learning_rate) or not_positive(config.fine_tune_epochs):
            problems.append("--fine_tune_learning_rate must be > 0 and --fine_tune_epochs at least 1")
    if config.fine_tune_whole:
        if config.fine_tune_blocks:
            problems.append("--fine_tune_whole and --fine_tune_blocks exclude each other")
        if (not_positive(config.fine_tune_learning_rate) or not_positive(config.fine_tune_epochs)
                or config.fine_tune_warmup_epochs < 0):
            problems.append("--fine_tune_learning_rate must be > 0, --fine_tune_epochs at least 1 and "
                            "--fine_tune_warmup_epochs at least 0")
        if not 0 < config.fine_tune_crop_min <= 1:
            problems.append(f"--fine_tune_crop_min must be in (0, 1] (got {config.fine_tune_crop_min})")
        if config.fine_tune_frozen_blocks:  # None: the recipe's default, which fits any base
            from training_job.whole_fine_tune import block_count

            blocks = block_count(config.architecture)
            if not blocks:
                problems.append(f"--fine_tune_frozen_blocks works with efficientnet_lite<N> and "
                                f"mobilenet_<alpha>_<size> (named blocks), not {config.architecture}")
            elif not 0 <= config.fine_tune_frozen_blocks < blocks:
                problems.append(f"--fine_tune_frozen_blocks must be between 0 and {blocks - 1} for "
                                f"{config.architecture} (got {config.fine_tune_frozen_blocks})")
    if config.weights_file and not Path(config.weights_file).is_file():
        problems.append(f"--weights_file {config.weights_file} does not exist")
    if problems:
        raise UserError("; ".join(problems))


def load_rows(manifest: str | Path):
    from training_job.dataset import read_manifest

    manifest = Path(manifest)
    if not manifest.is_file():
        raise UserError(f"no manifest at {manifest}: run `python -m training_job prepare` first "
                        "(or `run`, which prepares, trains, evaluates and publishes)")
    try:
        rows = read_manifest(manifest)
    except (KeyError, ValueError) as exc:
        raise UserError(f"{manifest} is not a dataset manifest ({exc})") from None
    if not rows:
        raise UserError(f"{manifest} lists no photos")
    return rows


def train_and_report(rows, config: TrainConfig, args, run_dir: Path | None = None, base=None) -> tuple[Path, dict]:
    from training_job.pipeline import train_run
    from training_job.train import TrainingError

    if args.open_set_reject_rate is not None and not 0 <= args.open_set_reject_rate < 0.5:
        raise UserError(f"--open_set_reject_rate must be in [0, 0.5) (got {args.open_set_reject_rate})")
    not_mushrooms = Path(args.not_mushrooms) if args.not_mushrooms else None
    if not_mushrooms is not None and not not_mushrooms.is_dir():
        raise UserError(f"--not_mushrooms {not_mushrooms} is not a folder")
    try:
        run_dir, metrics = train_run(rows, config, run_dir, base=base, not_mushrooms=not_mushrooms,
                                     reject_rate=args.open_set_reject_rate)
    except (TrainingError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print_summary(run_dir, metrics)
    return run_dir, metrics


def print_summary(run_dir: Path, metrics: dict) -> None:
    import json

    from training_job.sweep import served_validation
    from training_job.whole_fine_tune import TIME_BUDGET

    summary = json.loads((run_dir / "train_summary.json").read_text())
    o = metrics["open_set"]
    print(f"run folder: {run_dir}")
    print(f"tensorboard: {summary['tensorboard']}  (tensorboard --logdir {Path(summary['tensorboard']).parent})")
    print(f"head: trained {summary['epochs_run']} epochs (best {summary['best_epoch']}) in "
          f"{summary['train_seconds']:.1f} s, validation accuracy {summary['validation_accuracy']:.4f}; "
          f"{summary['bottlenecks_computed']} bottlenecks computed, the rest from the cache")
    if "fine_tune_whole" in summary:
        w = summary["fine_tune_whole"]
        frozen = f" (stem and first {w['frozen_blocks']} blocks frozen)" if w.get("frozen_blocks") else ""
        runs = w.get("runs") or [{**w, "planned_epochs": w["epochs_planned"]}]
        each = "; ".join(f"{r['epochs_run']} epochs (best {r['best_epoch']}, stopped by "
                         f"{r['stopped_by'] or 'the epoch limit'}"
                         + (f": it ended the learning rate's decay after {r['planned_epochs']} of {w['epochs_asked']} "
                            "epochs" if r["stopped_by"] == TIME_BUDGET else "") + ")" for r in runs)
        soup = w.get("soup")
        averaged = ""
        if soup:
            averaged = f", {len(runs)} runs averaged"
            if soup["kept"] != "soup":
                averaged += f" (their average did worse on validation: {soup['kept']} kept)"
        print(f"whole-network fine-tuning{frozen}{averaged}: {each} in "
              f"{w['seconds']:.0f} s; validation accuracy {w['validation_accuracy_before']:.4f} -> "
              f"{w['validation_accuracy']:.4f}")
    print(f"served model: validation accuracy {served_validation(summary)[0]:.4f}; test accuracy "
          f"{metrics['test_accuracy']:.4f} on {metrics['test_photos']} photos ({metrics['misclassified']} "
          "misclassified)")
    if "calibration" in metrics:
        c = metrics["calibration"]
        print(f"calibration: temperature {c['temperature']:.3f}; expected calibration error on test "
              f"{c['test']['ece_before']:.3f} before, {c['test']['ece_after']:.3f} after")
    line = f"not-a-mushroom ({o['method']}): rejects {o['test_mushrooms_rejected']:.1%} of test mushrooms"
    if "not_mushrooms_rejected" in o:
        line += f", {o['not_mushrooms_rejected']:.1%} of {o['not_mushroom_photos']} non-mushroom photos"
    print(line)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train (head, then the whole network fine-tuned by default), then evaluate on the test split",
        description="Train a classification head on the frozen ImageNet base's bottlenecks (cached by photo hash, "
        "architecture and preprocessing version) with early stopping on validation, then fine-tune the whole "
        "network with it (--no_fine_tune_whole: the head alone; resumable: run again with the same --run_dir); "
        "fit the calibration temperature on validation; set the 'not a mushroom' threshold on the training and "
        "validation photos' scores; evaluate on test. Writes a run folder (default var/runs/<run name>) and "
        "TensorBoard summaries (var/tensorboard/<run name>).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--manifest", default=str(default_manifest()), help="manifest.csv written by `prepare`")
    parser.add_argument("--run_dir", default=None, help="run folder (default var/runs/<timestamp-arch-lr>)")
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    config = config_from_args(args)
    rows = load_rows(args.manifest)
    train_and_report(rows, config, args, Path(args.run_dir) if args.run_dir else None)
    return 0
