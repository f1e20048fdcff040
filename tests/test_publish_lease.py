"""Publish's staging folders on a volume shared by several pods: a folder is stale only when its owner is known
to be gone (same host, process gone) or its heartbeat is older than the lease; a pid means nothing on another host."""
import os
import time

from training_job.publish import LEASE_SECONDS, TMP_PREFIX, _host_tag, publish_dir, remove_stale_tmp


def staging(model_dir, host: str, pid: int, age_seconds: float = 0.0):
    folder = model_dir / f"{TMP_PREFIX}{host}-{pid}-0123abcd"
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"half")
    if age_seconds:
        then = time.time() - age_seconds
        for path in (folder / "saved_model.pb", folder):
            os.utime(path, (then, then))
    return folder


def dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_another_hosts_fresh_staging_folder_is_kept_even_if_its_pid_is_dead_here(tmp_path):
    model_dir = tmp_path / "mushrooms"
    other = staging(model_dir, "other-pod-7f9c", dead_pid())
    publish_dir(lambda d: (d / "f").write_text("x"), tmp_path, "mushrooms")
    assert other.is_dir(), "a publisher on another pod lost its staging folder"


def test_a_staging_folder_whose_heartbeat_is_older_than_the_lease_is_removed(tmp_path):
    model_dir = tmp_path / "mushrooms"
    old = staging(model_dir, "other-pod-7f9c", 1, age_seconds=LEASE_SECONDS + 60)
    assert remove_stale_tmp(model_dir) == [old.name]


def test_this_hosts_staging_folder_of_a_dead_process_is_removed_at_once(tmp_path):
    model_dir = tmp_path / "mushrooms"
    mine = staging(model_dir, _host_tag(), dead_pid())
    alive = staging(model_dir, _host_tag(), os.getppid())
    assert remove_stale_tmp(model_dir) == [mine.name]
    assert alive.is_dir()


def test_a_long_build_keeps_its_lease_fresh(tmp_path, monkeypatch):
    import training_job.publish as publish

    monkeypatch.setattr(publish, "HEARTBEAT_SECONDS", 0.05)
    seen = []

    def build(folder):
        start = os.stat(folder / publish.HEARTBEAT_NAME).st_mtime
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.stat(folder / publish.HEARTBEAT_NAME).st_mtime == start:
            time.sleep(0.02)
        seen.append(os.stat(folder / publish.HEARTBEAT_NAME).st_mtime > start)

    n, path = publish_dir(build, tmp_path, "mushrooms")
    assert seen == [True]
    assert not (path / publish.HEARTBEAT_NAME).exists()
