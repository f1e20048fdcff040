"""Atomic publishing into the registry: ``<registry>/<model_name>/<N>/``.

A version is built in ``<registry>/<model_name>/.tmp-<host>-<pid>-<uuid>/`` (same file system), every file and
folder is fsynced, then — holding an exclusive ``flock`` on ``<model_name>/.publish.lock`` so two publishers cannot pick
the same N — it is renamed to the next free integer and the parent folder is fsynced. A reader never sees a
half-written numeric folder; a publisher killed at any point leaves at most a ``.tmp-*`` folder, which a later
publish removes once it is stale. The lock is released by the kernel when its holder dies.

Staleness works across pods sharing the registry volume, where a pid means nothing: while it builds, a publisher
touches ``.heartbeat`` in its staging folder every ``HEARTBEAT_SECONDS``; a staging folder is stale when its
newest heartbeat (or the folder itself) is older than ``LEASE_SECONDS``, or, on the host that made it, when its
process is gone.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from training_job import registry
from training_job.errors import UserError

TMP_PREFIX = ".tmp-"
LOCK_NAME = ".publish.lock"
# The highest version number ever committed in a model's folder: a number is never given twice, even after its
# folder was removed, since serving keys answers, caches and states by version number.
LAST_VERSION_NAME = ".last_version"
HEARTBEAT_NAME = ".heartbeat"
HEARTBEAT_SECONDS = 30.0
LEASE_SECONDS = 15 * 60.0  # many heartbeats: a folder this quiet has no living publisher on any host


class PublishError(UserError):
    """Nothing was published, for the reason said."""


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused for want of space: an OSError, or TensorFlow's ResourceExhaustedError,
    which carries the system's message only."""
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        any(words in str(exc) for words in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)))


def _megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


def no_space_message(registry_dir: Path, model_name: str) -> str:
    """What to tell the user when a publish ran out of space, once its staging folder is removed."""
    newest = registry.latest_version_dir(Path(registry_dir) / model_name)
    needs = f"; its newest version, {newest.name}, takes {_megabytes(newest):.0f} MB" if newest else ""
    free = shutil.disk_usage(registry_dir).free / 1e6
    return (f"no space left on the device of {registry_dir}: nothing was published (the half-written version is "
            f"removed: {free:.0f} MB free there now{needs}); free some space and publish again")


def versions(model_dir: Path) -> list[int]:
    """The published version numbers under ``model_dir``, ascending (training_job/registry.py says which folders)."""
    return registry.versions(model_dir)


def fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host_tag() -> str:
    """This host's name as it appears in staging folder names (no '-' inside, so the name splits cleanly)."""
    return socket.gethostname().replace("-", "_") or "unknown"


def _last_sign_of_life(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    try:
        times.append((folder / HEARTBEAT_NAME).stat().st_mtime)
    except FileNotFoundError:
        pass
    return max(times)


def _is_stale(folder: Path, now: float) -> bool:
    try:
        if now - _last_sign_of_life(folder) > LEASE_SECONDS:
            return True
    except FileNotFoundError:
        return False  # renamed or removed meanwhile
    host, _, rest = folder.name[len(TMP_PREFIX):].partition("-")
    pid_text = rest.split("-", 1)[0]
    if host != _host_tag() or not pid_text.isdigit():
        return False  # another host's publisher: only its lease tells
    pid = int(pid_text)
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale_tmp(model_dir: Path) -> list[str]:
    """Remove the ``.tmp-*`` staging folders that are stale (see the module docstring)."""
    removed = []
    now = time.time()
    for p in sorted(model_dir.glob(TMP_PREFIX + "*")):
        if p.is_dir() and _is_stale(p, now):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


@contextmanager
def _heartbeat(staging: Path):
    """Touch ``staging/.heartbeat`` every HEARTBEAT_SECONDS while the block runs; the file is removed after."""
    beat = staging / HEARTBEAT_NAME
    beat.touch()
    stop = threading.Event()

    def run():
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                beat.touch()
            except OSError:
                return  # the folder was renamed (committed) or removed

    thread = threading.Thread(target=run, name="publish-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        beat.unlink(missing_ok=True)


@contextmanager
def _locked(model_dir: Path):
    fd = os.open(model_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def new_staging_dir(registry: Path, model_name: str) -> Path:
    model_dir = Path(registry) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f"{TMP_PREFIX}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex}"
    staging.mkdir()
    return staging


def _last_version(model_dir: Path) -> int:
    try:
        return int((model_dir / LAST_VERSION_NAME).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _record_last_version(model_dir: Path, n: int) -> None:
    if n <= _last_version(model_dir):
        return
    tmp = model_dir / f"{LAST_VERSION_NAME}.{uuid.uuid4().hex}"
    tmp.write_text(f"{n}\n")
    os.replace(tmp, model_dir / LAST_VERSION_NAME)


def commit_version(staging: Path, version: int | None = None) -> tuple[int, Path]:
    """fsync ``staging`` and rename it to the next version number of its folder: above every version there and
    every number committed there before (``LAST_VERSION_NAME``), or to ``version`` (a variant published under
    another model name with its source's number: PublishError when it exists); returns (N, path)."""
    model_dir = staging.parent
    fsync_tree(staging)
    with _locked(model_dir):
        remove_stale_tmp(model_dir)
        if version is not None:
            target = model_dir / str(version)
            if os.path.lexists(target):
                raise PublishError(f"{target} exists: a version is never overwritten")
            n = version
        else:
            n = max((versions(model_dir) or [0])[-1], _last_version(model_dir)) + 1
            target = model_dir / str(n)
            while os.path.lexists(target):  # a stray file, link or hand-made entry: never overwrite it
                n += 1
                target = model_dir / str(n)
        os.rename(staging, target)
        _record_last_version(model_dir, n)
        fsync_dir(model_dir)
    return n, target


def publish_dir(build, registry: Path, model_name: str, version: int | None = None) -> tuple[int, Path]:
    """Call ``build(staging_dir)`` to fill a fresh staging folder, then commit it as the next version (or as
    ``version``: ``commit_version``).
    On any failure the staging folder is removed and no version appears; a full disk is a PublishError saying so."""
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise PublishError(f"invalid model name {model_name!r}: use a plain folder name like 'mushrooms'")
    staging = None
    try:
        staging = new_staging_dir(Path(registry), model_name)
        with _heartbeat(staging):
            build(staging)
        return commit_version(staging, version)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if out_of_space(exc):
            raise PublishError(no_space_message(Path(registry), model_name)) from exc
        raise
