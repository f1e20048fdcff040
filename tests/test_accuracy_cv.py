"""The cross-validation bench's arithmetic: folds partition the photos, paired differences carry a t interval."""
import numpy as np
import pytest

from bench.accuracy_cv import balanced_accuracy, config_overrides, fold_rows, paired_difference, parse_method
from training_job.dataset import ManifestRow


def test_folds_partition_the_photos_and_validation_comes_from_the_rest():
    rows = [ManifestRow(f"p{i}.jpg", "a", f"{i:064x}", "train", 10, 10, 100) for i in range(200)]
    folds = np.array_split(np.random.default_rng(0).permutation(len(rows)), 5)
    tests = []
    for k in range(5):
        split = [r.split for r in fold_rows(rows, folds, k)]
        assert split.count("test") == 40 and split.count("validation") == 80 and split.count("train") == 80
        tests.append({i for i, s in enumerate(split) if s == "test"})
    assert set().union(*tests) == set(range(200)) and sum(len(t) for t in tests) == 200


def test_fewer_training_photos_are_nested_subsets_with_the_same_validation_and_test():
    rows = [ManifestRow(f"p{i}.jpg", "a", f"{i:064x}", "train", 10, 10, 100) for i in range(200)]
    folds = np.array_split(np.random.default_rng(0).permutation(len(rows)), 5)
    assert parse_method("lite0_frozen_mirror@50") == ("lite0_frozen_mirror", 50, None)
    assert parse_method("frozen") == ("frozen", None, None)
    assert parse_method("lite0_fine_tuned_whole:6@400") == ("lite0_fine_tuned_whole", 400, 6)
    assert parse_method("lite0_fine_tuned_whole:6") == ("lite0_fine_tuned_whole", None, 6)
    every = fold_rows(rows, folds, 2)
    train = {n: {i for i, r in enumerate(fold_rows(rows, folds, 2, n)) if r.split == "train"} for n in (25, 50)}
    assert len(train[25]) == 25 and len(train[50]) == 50 and train[25] < train[50]
    assert train[50] < {i for i, r in enumerate(every) if r.split == "train"}
    for n in (25, 50):
        fewer = fold_rows(rows, folds, 2, n)
        assert all(a.split == b.split for a, b in zip(fewer, every) if b.split in ("test", "validation"))
        assert [r.split for r in fewer].count("unused") == 80 - n


def test_paired_difference_uses_the_t_quantile_of_the_fold_count():
    diff = paired_difference([0.93, 0.92, 0.94, 0.95, 0.91], [0.91, 0.90, 0.93, 0.92, 0.90])
    se = np.std([0.02, 0.02, 0.01, 0.03, 0.01], ddof=1) / np.sqrt(5)
    assert diff["mean"] == pytest.approx(0.018) and diff["standard_error"] == pytest.approx(se, abs=1e-4)
    assert diff["ci95"] == pytest.approx([0.018 - 2.776 * se, 0.018 + 2.776 * se], abs=1e-4)
    assert balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx((2 / 3 + 1) / 2)


def test_main_pairs_methods_fold_by_fold(monkeypatch, tmp_path):
    """The bench's bookkeeping with the training replaced by fixed heads (no network, no photos decoded)."""
    import bench.accuracy_cv as cv
    import training_job.bottlenecks as bottlenecks
    import training_job.prepare as prepare
    from training_job.bottlenecks import Bottlenecks
    from training_job.train import Head

    labels = ["a", "b"]
    rows = [ManifestRow(f"p{i}.jpg", labels[i % 2], f"{i:064x}", "train", 10, 10, 100) for i in range(150)]
    monkeypatch.setattr(prepare, "prepare_dataset", lambda *a, **k: rows)
    monkeypatch.setattr(bottlenecks, "BaseNetwork", lambda architecture: architecture)

    def fake_run(method, rows_k, k, base, work, done):
        def features(split):  # one-hot of the true class, except that "worse" confuses every 4th photo
            out = []
            for j, r in enumerate(x for x in rows_k if x.split == split):
                c = labels.index(r.label)
                out.append(np.eye(2)[1 - c if method == "lite0_frozen" and j % 4 == 0 else c])
            return Bottlenecks(np.array(out, np.float32), np.zeros((len(out), 1000), np.float32), 0)

        head = Head(labels, [np.eye(2, dtype=np.float32) * 4], [np.zeros(2, np.float32)])
        # "frozen" stands for a soup here: its two runs alone scored 0.75 and 1.0 on the fold's test photos
        runs = {"fine_tune_runs_test_accuracy": [0.75, 1.0], "fine_tune_runs_ensemble_test_accuracy": 1.0} \
            if method == "frozen" else {}
        return cv.MethodRun(head, features("test"), features("validation"), 1.0,
                            {"fine_tune_epochs_run": k, **runs}, base, features("train"))

    monkeypatch.setattr(cv, "run_method", fake_run)
    written = {}
    monkeypatch.setattr(cv, "write_result", lambda name, result: written.update(result))
    assert cv.main(["--folds", "3", "--methods", "frozen,lite0_frozen", "--not_mushrooms", "/nonexistent",
                    "--save-logits", str(tmp_path)]) == 0
    assert written["frozen"]["mean"] == 1.0 and written["lite0_frozen"]["mean"] == pytest.approx(0.75, abs=0.02)
    diff = written["paired_differences"]["lite0_frozen - frozen"]
    assert diff["mean"] == pytest.approx(-0.25, abs=0.02) and diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    assert "fine_tune_gain" not in written and written["frozen"]["train_seconds"] == 1.0
    assert 0 <= written["frozen"]["ece_after"] <= written["frozen"]["ece_before"] + 1e-9
    assert [f["frozen_details"]["fine_tune_epochs_run"] for f in written["per_fold"]] == [0, 1, 2]
    # a soup is paired with each of its runs alone, on the same folds
    assert written["frozen"]["runs_alone"] == [0.75, 1.0] and "runs_alone" not in written["lite0_frozen"]
    assert written["paired_differences"]["frozen - its run 1 alone"]["mean"] == pytest.approx(0.25)
    assert written["paired_differences"]["frozen - its run 2 alone"]["mean"] == 0.0
    assert written["frozen"]["runs_ensemble"] == 1.0
    assert written["paired_differences"]["its runs' ensemble - frozen"]["mean"] == 0.0
    # every misclassified test photo, once, with its label and prediction (to look at what a method gets wrong)
    wrong = written["lite0_frozen"]["misclassified"]
    assert len(wrong) == sum(round((1 - f["lite0_frozen"]) * f["test_photos"]) for f in written["per_fold"]) > 0
    assert all(m["label"] != m["predicted"] and m["p_predicted"] > m["p_label"] for m in wrong)
    assert len({m["photo"] for m in wrong}) == len(wrong) and written["frozen"]["misclassified"] == []
    # the open-set check on each fold: without not-mushroom photos, only the test mushrooms' share is measured
    from training_job.open_set import DEFAULT_REJECT_RATE

    default = written["frozen"]["open_set"][str(DEFAULT_REJECT_RATE)]
    assert default["test_rejected"] == 0.0 and default["not_mushrooms_rejected"] is None
    assert set(written["frozen"]["open_set"]) == {str(r) for r in cv.OPEN_SET_RATES}
    with np.load(tmp_path / "frozen-fold1-open_set.npz") as saved:  # what a threshold study reads
        assert set(saved.files) == {"train_labels", *(f"{split}_{what}" for split in ("train", "validation", "test")
                                                      for what in ("scores", "features", "imagenet"))}
        assert len(saved["train_labels"]) == len(saved["train_features"]) == written["per_fold"][1]["train_photos"]


def test_cross_fitting_holds_every_training_photo_out_once_and_never_touches_the_test_fold():
    from bench.calibration_cv import held_out_parts

    splits = ["train"] * 90 + ["validation"] * 20 + ["test"] * 30
    rows = [ManifestRow(f"p{i}.jpg", "ab"[i % 2], f"{i:064x}", s, 10, 10, 100) for i, s in enumerate(splits)]
    parts = held_out_parts(rows, 4, seed=3)
    held = [{i for i, r in enumerate(part) if r.split == "test"} for part in parts]
    assert sorted(len(h) for h in held) == [22, 22, 23, 23]
    assert set().union(*held) == set(range(90)) and sum(map(len, held)) == 90  # each training photo once
    for part, out in zip(parts, held):
        assert [r.split for r in part[90:110]] == ["validation"] * 20  # validation as it was
        assert [r.split for r in part[110:]] == ["unused"] * 30  # the fold's test photos: never read
        assert {i for i, r in enumerate(part) if r.split == "train"} == set(range(90)) - out
    assert held_out_parts(rows, 0, seed=3) == []  # --parts 0: no cross-fitting


def test_a_perfectly_calibrated_models_ece_is_the_sampling_noise_of_its_photo_count():
    from bench.calibration_cv import calibrated_model_ece

    rng = np.random.default_rng(1)
    assert calibrated_model_ece(np.ones(50), 4, 100, rng, draws=20) == 0.0  # always right, always sure
    # one confidence c in one bin: E|mean of n Bernoulli(c) - c| ~ sqrt(c (1 - c) / n) sqrt(2 / pi)
    for photos in (100, 400):
        expected = np.sqrt(0.9 * 0.1 / photos) * np.sqrt(2 / np.pi)
        assert calibrated_model_ece(np.full(10, 0.9), 4, photos, rng) == pytest.approx(expected, rel=0.15)
    spread = rng.uniform(0.3, 1.0, 1000)  # a confidence under 1/2 is still the 4-way answer
    assert calibrated_model_ece(spread, 4, 5000, rng, draws=20) < calibrated_model_ece(spread, 4, 200, rng, draws=20)


def test_a_method_can_change_any_train_config_field_for_itself():
    method = "lite0_fine_tuned_whole:6@400+fine_tune_learning_rate=3e-4+fine_tune_whole=false+fine_tune_blocks=2"
    assert parse_method(method) == ("lite0_fine_tuned_whole", 400, 6)
    assert config_overrides(method) == {"fine_tune_learning_rate": 3e-4, "fine_tune_whole": False,
                                        "fine_tune_blocks": 2}
    assert config_overrides("lite0_frozen") == {}
    # a field whose default is None takes its declared type: a soup of 2 runs, not of 2.0
    soup = config_overrides("lite0_fine_tuned_whole+fine_tune_soup=2+fine_tune_max_minutes=7.5")
    assert soup == {"fine_tune_soup": 2, "fine_tune_max_minutes": 7.5} and type(soup["fine_tune_soup"]) is int
    with pytest.raises(ValueError, match="not_a_field"):
        config_overrides("lite0_frozen+not_a_field=1")
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        config_overrides("lite0_frozen+dropout")


def test_a_mirror_method_reads_its_plain_methods_own_trained_network(monkeypatch, tmp_path):
    """``lite0_fine_tuned_whole_mirror``: the mirror-averaged features come from the network the plain method
    fine-tuned on that fold, with its head; not from the untouched base."""
    import bench.accuracy_cv as cv
    import training_job.bottlenecks as bottlenecks
    import training_job.mirror_tta as mirror_tta

    monkeypatch.setattr(mirror_tta, "MirrorAveragedBase", lambda network: ("mirrored", network))
    cached_in = []
    monkeypatch.setattr(bottlenecks, "get_bottlenecks",
                        lambda rows, network, progress, root: cached_in.append(root) or (network, len(rows)))
    rows = [ManifestRow(f"p{i}.jpg", "ab"[i % 2], f"{i:064x}", s, 10, 10, 100)
            for i, s in enumerate(["train"] * 6 + ["validation"] * 3 + ["test"] * 2)]
    plain = cv.MethodRun("tuned head", "test", "validation", 5.0, {"fine_tune_epochs_run": 6}, "tuned network",
                         "train")
    done = {("lite0_fine_tuned_whole:6+fine_tune_frozen_blocks=3", 0): plain}
    run = cv.run_method("lite0_fine_tuned_whole_mirror:6+fine_tune_frozen_blocks=3", rows, 0, "untouched base",
                        tmp_path, done)
    assert run.head == "tuned head" and run.seconds == 5.0 and run.details == {"fine_tune_epochs_run": 6}
    assert run.test == (("mirrored", "tuned network"), 2) and run.validation == (("mirrored", "tuned network"), 3)
    assert run.train == (("mirrored", "tuned network"), 6)  # the open-set centroids read what is served
    # a fold's fine-tuned network is never seen again: its features stay out of the user's cache
    assert cached_in == [tmp_path / "bottlenecks"] * 3
    base_run = cv.MethodRun("head", "test", "validation", 1.0, {}, "untouched base", "train")
    cv.run_method("lite0_frozen_mirror", rows, 0, "untouched base", tmp_path, {("lite0_frozen", 0): base_run})
    assert cached_in[3:] == [None] * 3  # the untouched base's are the user's to keep
    assert cv.METHOD_ARCHITECTURES["lite0_fine_tuned_whole_mirror"] == "efficientnet_lite0"


def test_an_at_size_method_reads_its_plain_methods_network_at_that_size(monkeypatch, tmp_path):
    """``lite0_fine_tuned_whole_at256``: the fold's fine-tuned network and head, reading photos at 256 pixels; the
    soup's runs alone (scored at the trained size) are not carried over as if scored at 256."""
    import bench.accuracy_cv as cv
    import training_job.bottlenecks as bottlenecks
    import training_job.fixres as fixres

    monkeypatch.setattr(fixres, "ResizedBase", lambda network, size: ("resized", network, size))
    cached_in = []
    monkeypatch.setattr(bottlenecks, "get_bottlenecks",
                        lambda rows, network, progress, root: cached_in.append(root) or (network, len(rows)))
    rows = [ManifestRow(f"p{i}.jpg", "ab"[i % 2], f"{i:064x}", s, 10, 10, 100)
            for i, s in enumerate(["train"] * 6 + ["validation"] * 3 + ["test"] * 2)]
    soup = {"fine_tune_epochs_run": 6, "fine_tune_runs_test_accuracy": [0.9, 0.8],
            "fine_tune_runs_ensemble_test_accuracy": 0.9}
    plain = cv.MethodRun("tuned head", "test", "validation", 5.0, soup, "tuned network", "train")
    done = {("lite0_fine_tuned_whole+fine_tune_learning_rate=6e-4", 1): plain}
    run = cv.run_method("lite0_fine_tuned_whole_at256+fine_tune_learning_rate=6e-4", rows, 1, "untouched base",
                        tmp_path, done)
    assert run.head == "tuned head" and run.details == {"fine_tune_epochs_run": 6}
    assert (run.test, run.validation, run.train) == tuple((("resized", "tuned network", 256), n) for n in (2, 3, 6))
    assert cached_in == [tmp_path / "bottlenecks"] * 3
    assert cv.method_architecture(cv.parse_method("lite0_fine_tuned_whole_at288:6@400")[0]) == "efficientnet_lite0"
    assert cv.method_architecture("lite0_fine_tuned_whole_at") is None
    assert cv.method_architecture("no_such_method_at256") is None
    # refused before any training: these networks cannot be rebuilt at another size
    assert cv.method_architecture("lite0_fine_tuned_whole_mirror_at256") is None
    assert cv.method_architecture("fine_tuned_1_block_at256") is None


def test_open_set_rates_calibrate_on_validation_and_count_each_sets_rejections():
    """The check as the training job calibrates it: a quantile of the training and validation photos' scores; the
    test mushrooms and the not-mushroom photos are only counted."""
    import bench.accuracy_cv as cv
    from training_job.base_weights import FUNGUS_CLASS_IDS
    from training_job.bottlenecks import Bottlenecks

    def photos(n, fungus, direction):
        features = np.tile(direction, (n, 1))
        imagenet = np.zeros((n, 1000), np.float32)
        imagenet[:, FUNGUS_CLASS_IDS[0]] = fungus
        return Bottlenecks(features.astype(np.float32), imagenet, 0)

    a, b, elsewhere = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
    train = Bottlenecks(*(np.concatenate(x) for x in zip(
        (photos(20, 0.5, a).features, photos(20, 0.5, a).imagenet),
        (photos(20, 0.5, b).features, photos(20, 0.5, b).imagenet))), 0)
    validation = photos(200, np.linspace(0.0, 1.0, 200), a)  # scores spread evenly: the quantile is a rank
    test = photos(100, np.linspace(0.0, 1.0, 100), b)
    run = cv.MethodRun(None, test, validation, 0.0, {}, None, train)
    rates = cv.open_set_rates(run, np.repeat([0, 1], 20), 2, photos(10, 0.0, elsewhere))
    for rate in cv.OPEN_SET_RATES:
        assert rates[str(rate)]["test_rejected"] == pytest.approx(rate, abs=0.011)
        assert rates[str(rate)]["not_mushrooms_rejected"] == 1.0
    assert cv.open_set_rates(run, np.repeat([0, 1], 20), 2)["0.01"]["not_mushrooms_rejected"] is None

    folds = [{"0.01": {"test_rejected": t, "not_mushrooms_rejected": n}}
             for t, n in ((0.02, 0.95), (0.06, 1.0), (0.05, 0.90), (0.01, 0.85))]
    summary = cv.open_set_summary(folds)["0.01"]
    assert summary["folds_meeting_both"] == 2  # the second rejects too many mushrooms, the fourth too few others
    assert summary["test_rejected_max"] == 0.06 and summary["not_mushrooms_rejected_min"] == 0.85
    assert summary["test_rejected"] == pytest.approx(0.035) and summary["not_mushrooms_rejected"] == pytest.approx(0.925)
