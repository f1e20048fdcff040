"""Training on real photos with the real base network: cache reuse, a short run's accuracy, evaluation outputs,
the open-set check, TensorBoard summaries, the sweep and clear CLI errors."""
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.support import MUSHROOMS
from training_job.augmentation import Augmentation
from training_job.bottlenecks import atomic_save, get_bottlenecks
from training_job.cli import main
from training_job.dataset import ManifestRow, read_manifest, write_manifest
from training_job.errors import UserError


def test_bottleneck_cache_is_reused_and_augmented_variants_are_kept_apart(small_dataset, base_network, tmp_path):
    _, rows = small_dataset
    some = rows[:6]
    first = get_bottlenecks(some, base_network, root=tmp_path, progress=False)
    second = get_bottlenecks(some, base_network, root=tmp_path, progress=False)
    assert (first.computed, second.computed) == (6, 0)
    np.testing.assert_array_equal(first.features, second.features)
    assert first.features.shape == (6, 1024) and first.imagenet.shape == (6, 1000)
    np.testing.assert_allclose(first.imagenet.sum(axis=1), 1.0, atol=1e-4)

    aug = Augmentation(flip_left_right=True, random_crop=10, random_brightness=10)
    augmented = get_bottlenecks(some, base_network, augmentation=aug, root=tmp_path, progress=False)
    assert augmented.computed == 6
    assert not np.allclose(augmented.features, first.features)
    assert get_bottlenecks(some, base_network, root=tmp_path, progress=False).computed == 0
    assert get_bottlenecks(some, base_network, augmentation=aug, root=tmp_path, progress=False).computed == 0


def test_processes_sharing_the_bottleneck_cache_never_write_through_one_temporary_file(tmp_path, monkeypatch):
    """The cache is shared by every process of a user (``make test``'s pytest workers, a CV run beside ``make run``):
    two processes saving the same photo's vector, even from an object at the same address, stage it in files of
    their own before the atomic rename."""
    import builtins

    vec, target, staged = np.arange(4, dtype=np.float32), tmp_path / "photo.npy", []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open",
                        lambda path, *a, **k: staged.append(Path(path).name) or real_open(path, *a, **k))
    for pid in (101, 102):
        monkeypatch.setattr("os.getpid", lambda pid=pid: pid)
        atomic_save(target, vec)
    assert len(set(staged)) == 2 and np.array_equal(np.load(target), vec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.npy"]


def test_short_training_run_reaches_meaningful_accuracy(trained_run):
    run_dir, metrics = trained_run
    # chance is 0.25; on this 60-per-class subset seeds 0-3 measured 0.84-0.86 (57 test photos), so 0.75 is a
    # real bar that a broken cache, head or label order cannot pass, with room for run-to-run noise
    assert metrics["test_accuracy"] >= 0.75, metrics
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["validation_accuracy"] >= 0.75


def test_evaluation_writes_matrix_png_and_misclassified_list(trained_run):
    run_dir, metrics = trained_run
    cm = np.array(metrics["confusion_matrix"]["rows_true_columns_predicted"])
    assert cm.sum() == metrics["test_photos"]
    assert np.trace(cm) / cm.sum() == pytest.approx(metrics["test_accuracy"])
    assert set(metrics["per_class"]) == set(metrics["confusion_matrix"]["labels"])
    assert (run_dir / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(run_dir / "misclassified.csv") as f:
        wrong = list(csv.DictReader(f))
    assert len(wrong) == metrics["misclassified"] == cm.sum() - np.trace(cm)
    for row in wrong:
        assert row["true"] != row["predicted"] and Path(row["path"]).exists() and 0 < float(row["confidence"]) <= 1


def test_misclassified_list_names_the_photos_the_run_gets_wrong(trained_run, base_network):
    """Each listed photo, run through the run's own network and head, gets the listed answer: the list pairs each
    answer with its own photo even when training was handed the rows in another order than its manifest's (as
    ``prepare`` hands them to ``training_job run``)."""
    from training_job.pipeline import load_run, run_base

    run_dir, _ = trained_run
    _, config, head, _ = load_run(run_dir)
    with open(run_dir / "misclassified.csv") as f:
        wrong = list(csv.DictReader(f))
    assert wrong, "the short run got every test photo right: nothing to check"
    by_path = {r.path: r for r in read_manifest(run_dir / "manifest.csv")}
    rows = [by_path[w["path"]] for w in wrong]
    probs = head.predict(get_bottlenecks(rows, run_base(run_dir, config, base_network), progress=False).features)
    assert [(head.labels[int(p.argmax())], round(float(p.max()), 4)) for p in probs] \
        == [(w["predicted"], float(w["confidence"])) for w in wrong]


def test_open_set_rejects_non_mushrooms_and_keeps_mushrooms(trained_run):
    _, metrics = trained_run
    o = metrics["open_set"]
    assert o["not_mushroom_photos"] >= 50
    assert o["not_mushrooms_rejected"] >= 0.9, o
    assert o["test_mushrooms_rejected"] <= 0.1, o
    assert set(o["candidates_at_same_reject_rate"]) == {"combined", "fungus_mass", "centroid_cosine"}


def test_tensorboard_has_train_and_validation_runs(trained_run):
    run_dir, _ = trained_run
    tb = Path(json.loads((run_dir / "train_summary.json").read_text())["tensorboard"])
    for side in ("train", "validation"):
        assert list((tb / side).glob("events.out.tfevents.*")), f"no {side} summaries in {tb}"


def test_sweep_picks_best_on_validation(small_dataset, base_network, tmp_path):
    from training_job.sweep import run_sweep
    from training_job.train import TrainConfig

    _, rows = small_dataset
    report = run_sweep(rows, TrainConfig(epochs=15, patience=5, fine_tune_whole=False), [0.001, 0.01],
                       ["mobilenet_1.0_224"], tmp_path / "sweep", tensorboard_root=tmp_path / "tb", progress=False)
    assert len(report["runs"]) == 2
    assert report["best"]["validation_accuracy"] == max(r["validation_accuracy"] for r in report["runs"])
    assert len(list((tmp_path / "tb" / "sweep").iterdir())) == 2


def _run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


def test_cli_bad_input_gives_clear_messages(tmp_path, capsys):
    code, err = _run_cli(["train", "--manifest", str(tmp_path / "missing.csv")], capsys)
    assert code == 2 and "no manifest" in err
    code, err = _run_cli(["train", "--learning_rate", "-1"], capsys)
    assert code == 2 and "--learning_rate must be > 0" in err
    code, err = _run_cli(["train", "--architecture", "resnet_50"], capsys)
    assert code == 2 and "unknown architecture" in err
    code, err = _run_cli(["evaluate", "--run_dir", str(tmp_path)], capsys)
    assert code == 2 and "not a training run folder" in err
    code, err = _run_cli(["publish", "--run_dir", str(tmp_path)], capsys)
    assert code == 2 and "not a training run folder" in err
    code, err = _run_cli(["run", "--data", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not a folder" in err


def test_run_fine_tunes_the_whole_network_unless_told_otherwise():
    """The default recipe (README, "The default recipe fine-tunes the whole of Lite0"): whole-network fine-tuning;
    --no_fine_tune_whole trains the head alone; --fine_tune_blocks alone asks for the other kind of fine-tuning."""
    from training_job.cli import build_parser
    from training_job.commands.train import config_from_args
    from training_job.whole_fine_tune import EPOCHS, soup_size

    def config(*argv):
        return config_from_args(build_parser().parse_args(["run", *argv]))

    default = config()
    assert default.architecture == "efficientnet_lite0" and default.fine_tune_whole
    assert default.fine_tune_max_minutes == 5 and (default.fine_tune_epochs or EPOCHS) == 6
    assert soup_size(default) == 2 and soup_size(config("--fine_tune_soup", "1")) == 1  # two runs averaged
    assert not config("--no_fine_tune_whole").fine_tune_whole
    blocks = config("--architecture", "mobilenet_1.0_224", "--fine_tune_blocks", "1")
    assert blocks.fine_tune_blocks == 1 and not blocks.fine_tune_whole
    with pytest.raises(UserError, match="exclude each other"):
        config("--architecture", "mobilenet_1.0_224", "--fine_tune_blocks", "1", "--fine_tune_whole")


def test_the_not_a_mushroom_threshold_is_the_1_5_percent_quantile_unless_told_otherwise():
    """README ("The check's threshold is a low quantile"): 1.5 % of the training and validation photos' scores
    (bench/results/accuracy_cv_open_set.json), one default that the train and run commands and the sweep all take."""
    import inspect

    from training_job.cli import build_parser
    from training_job.open_set import DEFAULT_REJECT_RATE
    from training_job.sweep import run_sweep

    assert DEFAULT_REJECT_RATE == 0.015
    for command in ("run", "train"):
        assert build_parser().parse_args([command]).open_set_reject_rate == DEFAULT_REJECT_RATE
    assert inspect.signature(run_sweep).parameters["reject_rate"].default == DEFAULT_REJECT_RATE


def test_whole_fine_tuning_peaks_at_its_own_learning_rate_unless_told_otherwise():
    """The default recipe's peak learning rate (README, "The default recipe fine-tunes the whole of Lite0") is
    whole_fine_tune.LEARNING_RATE, --fine_tune_blocks keeps its own, and a rate or epoch count of 0 is refused rather
    than silently replaced by the default."""
    from training_job.cli import build_parser
    from training_job.commands.train import config_from_args
    from training_job.whole_fine_tune import LEARNING_RATE, learning_rate_schedule

    def config(*argv):
        return config_from_args(build_parser().parse_args(["run", *argv]))

    def peak(train_config):
        schedule = learning_rate_schedule(train_config, 320)  # 10 steps per epoch: the warm-up ends at step 10
        return max(float(schedule(step)) for step in range(70))

    assert LEARNING_RATE == 3e-4 and config().fine_tune_learning_rate is None
    assert peak(config()) == pytest.approx(3e-4)
    assert peak(config("--fine_tune_learning_rate", "5e-5")) == pytest.approx(5e-5)
    for flag in ("--fine_tune_learning_rate", "--fine_tune_epochs"):
        with pytest.raises(UserError, match=flag):
            config(flag, "0")
        with pytest.raises(UserError, match=flag):
            config("--architecture", "mobilenet_1.0_224", "--fine_tune_blocks", "1", flag, "0")


def test_training_refuses_a_single_class_manifest(tmp_path, capsys):
    photos = sorted((MUSHROOMS / "boletus_edulis").iterdir())[:4]
    rows = [ManifestRow(str(p), "boletus_edulis", f"{i:064x}", split, 1, 1, 1)
            for i, (p, split) in enumerate(zip(photos, ["train", "train", "validation", "test"]))]
    write_manifest(rows, tmp_path / "manifest.csv")
    assert len(read_manifest(tmp_path / "manifest.csv")) == 4
    code, err = _run_cli(["train", "--manifest", str(tmp_path / "manifest.csv")], capsys)
    assert code == 2 and "at least 2 classes" in err


def test_training_refuses_a_manifest_without_test_photos_before_it_trains(tmp_path, capsys):
    """A handful of photos can all hash outside the test split: that is refused before minutes of training, in
    words that say why, and no run folder is left for publish to trip over."""
    photos = sorted((MUSHROOMS / "boletus_edulis").iterdir())[:3] + sorted((MUSHROOMS / "amanita_muscaria").iterdir())[:3]
    rows = [ManifestRow(str(p), p.parent.name, f"{i:064x}", split, 1, 1, 1)
            for i, (p, split) in enumerate(zip(photos, ["train", "train", "validation"] * 2))]
    write_manifest(rows, tmp_path / "manifest.csv")
    code, err = _run_cli(["train", "--manifest", str(tmp_path / "manifest.csv"), "--run_dir", str(tmp_path / "run")],
                         capsys)
    assert code == 2 and "no test photos" in err and "6 photos" in err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_trained_again_is_not_a_finished_run_until_training_ends(tmp_path, monkeypatch):
    """Training again into a finished run's folder and stopping it (Ctrl-C) must not leave the old run's head,
    threshold and metrics beside a half-trained network: evaluate and publish would serve that mix as the run."""
    from training_job import pipeline
    from training_job.commands.evaluate import latest_run, resolve_run
    from training_job.train import TrainConfig

    monkeypatch.setenv("MUSHROOM_VAR", str(tmp_path / "var"))
    older, reused = pipeline.runs_dir() / "older", pipeline.runs_dir() / "reused"
    for run in (older, reused):
        run.mkdir(parents=True)
        for name in ("head.npz", "open_set.npz", "train_summary.json", "metrics.json", "config.json"):
            (run / name).write_text("a finished run's file")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_head", stopped)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_run([], TrainConfig(), reused, base=object())
    assert not [p.name for p in reused.iterdir() if p.name in ("head.npz", "open_set.npz", "metrics.json")]
    assert latest_run() == older
    with pytest.raises(UserError, match="not a training run folder"):
        resolve_run(str(reused))


def test_a_class_without_test_photos_has_no_recall_rather_than_zero():
    """0 photos of a class in the test split say nothing about it: its recall is unknown (null, "n/a"), not 0, and a
    class never predicted has no precision."""
    from training_job.evaluate import classification_metrics

    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0]])
    per_class = classification_metrics(["a", "b", "c"], np.array([0, 1, 1]), probs)["per_class"]
    assert per_class["a"] == {"precision": 0.5, "recall": 1.0, "support": 1}
    assert per_class["c"] == {"precision": None, "recall": None, "support": 0}


def test_sweep_picks_the_run_whose_served_model_is_best_on_validation(tmp_path, monkeypatch):
    """With fine-tuning, the model a run serves is the fine-tuned one: the sweep ranks runs by its validation
    accuracy (then cross-entropy), not by the head's before fine-tuning."""
    from training_job import sweep
    from training_job.train import TrainConfig

    served = {0.001: (0.95, 0.90, 0.30), 0.01: (0.97, 0.85, 0.40)}  # lr: head's accuracy, served accuracy, NLL

    def fake_train_run(rows, config, run_dir, **kwargs):
        head, tuned, nll = served[config.learning_rate]
        run_dir.mkdir(parents=True)
        (run_dir / "train_summary.json").write_text(json.dumps({
            "validation_accuracy": head, "validation_cross_entropy": 0.1, "epochs_run": 3,
            "fine_tune_whole": {"validation_accuracy_before": head, "validation_accuracy": tuned},
            "calibration": {"validation": {"nll_before": nll}}}))
        return run_dir, {"test_accuracy": tuned}

    monkeypatch.setattr(sweep, "train_run", fake_train_run)
    monkeypatch.setattr(sweep, "BaseNetwork", lambda architecture, weights: SimpleNamespace(architecture=architecture))
    report = sweep.run_sweep([], TrainConfig(), [0.001, 0.01], ["efficientnet_lite0"], tmp_path / "sweep",
                             tensorboard_root=tmp_path / "tb", progress=False)
    assert report["best"]["learning_rate"] == 0.001
    assert [r["validation_accuracy"] for r in report["runs"]] == [0.90, 0.85]


def test_run_reads_a_photo_folder_given_from_the_home_folder(tmp_path, monkeypatch, capsys):
    """`make run DATA=~/photos` quotes the folder for the shell, which then leaves the ~ to `run`: it is the user's
    home folder there, as in `prepare --source`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    code, err = _run_cli(["run", "--data", "~/no-such-photos"], capsys)
    assert code == 2 and f"{tmp_path}/no-such-photos is not a folder" in err


def test_a_fine_tuning_stopped_by_ctrl_c_says_how_to_resume_it(tmp_path, monkeypatch, capsys):
    """Whole fine-tuning checkpoints every epoch; stopping it must say where and how to go on."""
    from training_job import pipeline
    from training_job.train import TrainConfig
    from training_job import whole_fine_tune

    monkeypatch.setenv("MUSHROOM_VAR", str(tmp_path / "var"))
    trained = SimpleNamespace(run_name="the-run", head=None, split_bottlenecks={}, tensorboard_dir=tmp_path / "tb")
    monkeypatch.setattr(pipeline, "train_head", lambda *args, **kwargs: trained)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(whole_fine_tune, "fine_tune_whole", stopped)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_run([], TrainConfig(), base=object())
    run_dir = pipeline.runs_dir() / "the-run"
    assert f"train --run_dir {run_dir}" in capsys.readouterr().err


def test_the_summary_pairs_the_served_models_validation_and_test_accuracy(tmp_path, capsys):
    """After fine-tuning, the head's validation accuracy is not the served model's: the line with the test accuracy
    gives the validation accuracy of the network that answered it, and the head's stays on the head's line."""
    from training_job.commands.train import print_summary

    runs = [{"seed": s, "epochs_run": 6, "best_epoch": 5, "seconds": 100.0, "stopped_by": None,
             "planned_epochs": 6, "validation_cross_entropy": 0.2} for s in (0, 1000)]
    summary = {"tensorboard": str(tmp_path / "tb" / "run"), "epochs_run": 36, "best_epoch": 16,
               "train_seconds": 5.8, "bottlenecks_computed": 0, "validation_accuracy": 0.9573,
               "calibration": {"validation": {"nll_before": 0.2}},
               "fine_tune_whole": {"frozen_blocks": 3, "epochs_asked": 6, "seconds": 200.0,
                                   "validation_accuracy_before": 0.9573, "validation_accuracy": 0.9487,
                                   "runs": runs, "soup": {"runs": 2, "kept": "soup"}}}
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    metrics = {"test_accuracy": 0.9831, "test_photos": 118, "misclassified": 2,
               "open_set": {"method": "combined", "test_mushrooms_rejected": 0.008}}
    print_summary(tmp_path, metrics)
    lines = capsys.readouterr().out.splitlines()
    (tested,) = [line for line in lines if "test accuracy 0.9831" in line]
    assert "validation accuracy 0.9487" in tested and "0.9573" not in tested
    (head,) = [line for line in lines if "36 epochs" in line]
    assert head.startswith("head:") and "validation accuracy 0.9573" in head


def test_the_misclassified_list_keeps_a_photo_path_that_is_not_utf8(tmp_path):
    """A photo named on another system (bytes that are not UTF-8) is listed by the path that opens it."""
    import csv
    import os

    from training_job.dataset import open_photo_csv
    from training_job.evaluate import write_misclassified

    path = os.fsdecode(b"/photos/boletus/c\xe8pe.jpg")
    write_misclassified([{"path": path, "true": "a", "predicted": "b", "confidence": 0.6}], tmp_path / "wrong.csv")
    with open_photo_csv(tmp_path / "wrong.csv") as f:
        assert next(csv.DictReader(f))["path"] == path
