"""Publishing is atomic: concurrent publishers get distinct versions, a killed publish leaves no numeric folder,
a full disk publishes nothing and says so, and the accuracy gate refuses a weak model."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from training_job.publish import PublishError, publish_dir, versions

PUBLISHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from training_job.publish import publish_dir

    registry, tag, pause = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])

    def build(staging):
        for i in range(20):
            (staging / f"part{i}").write_text(tag * 1000)
        (staging / "tag").write_text(tag)
        print("BUILT", flush=True)
        time.sleep(pause)

    n, path = publish_dir(build, registry, "mushrooms")
    print(n, flush=True)
""")


def _publisher(registry, tag, pause):
    return subprocess.Popen([sys.executable, "-c", PUBLISHER, str(registry), tag, str(pause)],
                            stdout=subprocess.PIPE, text=True)


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    publishers = [_publisher(tmp_path, tag, 0.2) for tag in "abcd"]
    numbers = [int(p.communicate(timeout=60)[0].split()[-1]) for p in publishers]
    assert all(p.returncode == 0 for p in publishers)
    assert sorted(numbers) == [1, 2, 3, 4]
    model_dir = tmp_path / "mushrooms"
    assert versions(model_dir) == [1, 2, 3, 4]
    assert sorted((model_dir / str(n) / "tag").read_text() for n in numbers) == list("abcd")
    assert all(len(list((model_dir / str(n)).iterdir())) == 21 for n in numbers)
    assert not list(model_dir.glob(".tmp-*"))


def test_killed_publish_leaves_no_numeric_folder(tmp_path):
    publisher = _publisher(tmp_path, "k", 60)
    assert publisher.stdout.readline().strip() == "BUILT"
    publisher.send_signal(signal.SIGKILL)
    publisher.wait(timeout=10)
    model_dir = tmp_path / "mushrooms"
    assert versions(model_dir) == []
    assert [p.name for p in model_dir.iterdir() if p.name.isdigit()] == []
    # the next publish gets version 1 and removes the dead publisher's staging folder
    n, path = publish_dir(lambda d: (d / "tag").write_text("next"), tmp_path, "mushrooms")
    assert n == 1 and (path / "tag").read_text() == "next"
    assert not list(model_dir.glob(".tmp-*"))


def test_failed_build_leaves_nothing(tmp_path):
    def build(staging):
        (staging / "half").write_text("x")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        publish_dir(build, tmp_path, "mushrooms")
    assert [p.name for p in (tmp_path / "mushrooms").iterdir() if p.name != ".publish.lock"] == []


def _tensorflow_out_of_space():
    import tensorflow as tf

    return tf.errors.ResourceExhaustedError(None, None, "{{function_node __wrapped__SaveV2}} variables/variables_temp/"
                                            f"part-00000-of-00001; {os.strerror(errno.ENOSPC)} [Op:SaveV2]")


@pytest.mark.parametrize("failure", [
    lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.tflite"),  # Python's writes
    _tensorflow_out_of_space,  # the SavedModel's variables, written by TensorFlow
])
def test_a_full_disk_publishes_nothing_and_says_so_without_a_traceback(tmp_path, failure):
    """Found publishing onto a 3 MB tmpfs: a version needs tens of MB, and the job ended with TensorFlow's traceback
    (and, with room for the float version but not its int8 variant, a traceback after the float one was published).
    The user is told what happened, what was left and what to do; the CLI prints it (a UserError)."""
    from training_job.errors import UserError

    publish_dir(lambda d: (d / "saved_model.pb").write_bytes(b"x" * 2_000_000), tmp_path, "mushrooms")

    def build(staging):
        (staging / "half").write_bytes(b"x" * 1000)
        raise failure()

    with pytest.raises(PublishError) as refused:
        publish_dir(build, tmp_path, "mushrooms")
    assert isinstance(refused.value, UserError)
    assert str(refused.value).startswith(f"no space left on the device of {tmp_path}: nothing was published (the "
                                         "half-written version is removed: ")
    assert "its newest version, 1, takes 2 MB); free some space and publish again" in str(refused.value)
    assert sorted(p.name for p in (tmp_path / "mushrooms").iterdir() if p.name.isdigit() or
                  p.name.startswith(".tmp-")) == ["1"]


def test_versions_continue_after_gaps_and_ignore_non_numeric(tmp_path):
    model_dir = tmp_path / "mushrooms"
    (model_dir / "7").mkdir(parents=True)
    (model_dir / "notes").mkdir()
    n, _ = publish_dir(lambda d: (d / "f").write_text("x"), tmp_path, "mushrooms")
    assert n == 8
    with pytest.raises(PublishError):
        publish_dir(lambda d: None, tmp_path, "../escape")


def test_accuracy_gate_refuses_to_publish(trained_run, tmp_path, capsys):
    from training_job.cli import main

    run_dir, metrics = trained_run
    code = main(["publish", "--run_dir", str(run_dir), "--registry", str(tmp_path),
                 "--min_test_accuracy", "1.01"])
    assert code == 2
    code = main(["publish", "--run_dir", str(run_dir), "--registry", str(tmp_path), "--no_tflite",
                 "--min_test_accuracy", str(min(1.0, metrics["test_accuracy"] + 0.001))])
    err = capsys.readouterr().err
    assert code == 2 and "below --min_test_accuracy" in err and "Traceback" not in err
    assert versions(tmp_path / "mushrooms") == []


def test_a_version_number_is_never_given_twice_even_after_its_folder_is_removed(tmp_path):
    """Serving keys everything by version number (the gateway's cache, its class lists, TF Serving's version
    states): a removed version's number handed to another model would serve the old model's cached answers."""
    import shutil

    def publish(tag):
        return publish_dir(lambda d: (d / "tag").write_text(tag), tmp_path, "mushrooms")

    assert publish("a")[0] == 1 and publish("b")[0] == 2
    shutil.rmtree(tmp_path / "mushrooms" / "2")  # a bad version taken away by hand
    assert publish("c")[0] == 3
    assert publish_dir(lambda d: None, tmp_path, "mushrooms", version=9)[0] == 9  # a variant's own number
    shutil.rmtree(tmp_path / "mushrooms" / "9")
    assert publish("d")[0] == 10


def test_a_dangling_link_where_the_next_version_would_go_is_never_overwritten(tmp_path):
    """A broken symlink named like the next version is a hand-made entry: publishing goes past it, as past a file."""
    model_dir = tmp_path / "mushrooms"
    model_dir.mkdir()
    (model_dir / "1").symlink_to(tmp_path / "nowhere")
    n, path = publish_dir(lambda d: (d / "tag").write_text("x"), tmp_path, "mushrooms")
    assert n == 2 and (path / "tag").read_text() == "x"
    assert (model_dir / "1").is_symlink()


def test_publishing_a_run_whose_photos_moved_says_so(trained_run, tmp_path, capsys):
    """publish re-reads the run's test photos (its warm-up requests): if they moved since training, it says which
    and why instead of a traceback."""
    import csv
    import shutil

    from training_job.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    manifest = run_dir / "manifest.csv"
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["split"] == "test":
            row["path"] = str(tmp_path / "moved-away" / "photo.jpg")
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code = main(["publish", "--run_dir", str(run_dir), "--registry", str(tmp_path / "registry"), "--no_tflite"])
    err = capsys.readouterr().err
    assert code == 2 and "moved-away/photo.jpg" in err and "Traceback" not in err
    assert versions(tmp_path / "registry" / "mushrooms") == []
