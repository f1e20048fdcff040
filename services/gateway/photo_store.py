"""Opt-in (``--photo-store DIR``): classified photos kept by content hash, so feedback that corrects an answer
becomes training data (``python -m training_job collect`` reads it).

Layout of DIR (any number of gateway replicas may share it, e.g. a ReadWriteMany volume):
- ``pending/<sha256>``: every photo classified while the store is on, newest kept; when the folder passes
  ``max_bytes`` the oldest (by modification time) are deleted down to 90 % of it;
- ``corrected/<sha256>``: a photo whose answer got a correction is moved here (its own ``max_bytes`` bound, same
  eviction), so corrections outlive the stream of plain classifications;
- ``corrections.jsonl``: one JSON line per correction, appended: ``sha256``, ``true_label``, ``predicted``, ``model``,
  ``version``, ``request_id``, ``answered_at`` and ``corrected_at`` (unix seconds): which answer, which version,
  when. Never the request log: only photos and the labels users sent back.

The answer's feedback token carries the photo's hash (signed, feedback.py), so feedback can only attach a label to
the photo that was classified. A correction is feedback whose ``true_label`` differs from the answer's top label.

The store is a side benefit of classifying, never a condition of it: a photo that cannot be stored (a full or
read-only volume, a folder gone) is answered all the same, its token naming no photo, and the failure is counted
(``mushroom_gateway_photo_store_failures_total``) and logged once until the store works again. A correction whose
line cannot be logged is a 503 with Retry-After: the feedback is recorded, and the same feedback sent again (which
stats.py answers as recorded) logs it then.

A volume that stops answering (a network file system whose server is away) blocks each file operation for as long
as it is away. So each operation runs on a daemon thread of its own (``services.daemon_thread``), a request waits
for it at most STORE_WAIT_S and then goes on as if it had failed, and at most MAX_OPERATIONS run at once: past
that, the store is skipped as failing at once, without a thread, until blocked ones return. A correction that timed
out may still be logged when its thread returns: the same one sent again is then logged twice, which ``training_job
collect`` reads as one.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from services.daemon_thread import in_daemon_thread
from services.gateway import metrics
from services.gateway.errors import GatewayError
from services.gateway.feedback import FeedbackClaim, FeedbackTokens

log = logging.getLogger("gateway.photo_store")
HASH_LENGTH = 64
RETRY_AFTER_S = 5  # a correction that could not be logged: the store's volume needs a person, not a moment
STORE_WAIT_S = 2.0  # how long an answer waits for its photo to be stored, a correction for its line to be logged
MAX_OPERATIONS = 4  # store operations running at once (blocked ones included): each holds a thread and its photo


class StoreUnavailable(OSError):
    """A store operation that did not end within STORE_WAIT_S, or was not started: MAX_OPERATIONS are running."""


class BoundedFolder:
    """Files named by sha256 in one folder, at most ``max_bytes`` (oldest deleted first), written atomically."""

    def __init__(self, path: Path, max_bytes: int):
        self.path = path
        self.max_bytes = max_bytes
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._bytes = sum(self._sizes().values())

    def _sizes(self) -> dict[Path, int]:
        sizes = {}
        for entry in self.path.iterdir():
            if len(entry.name) == HASH_LENGTH:
                try:
                    sizes[entry] = entry.stat().st_size
                except FileNotFoundError:  # another replica evicted it meanwhile
                    pass
        return sizes

    def file(self, sha256: str) -> Path:
        if len(sha256) != HASH_LENGTH or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.path / sha256

    def put(self, sha256: str, data: bytes) -> None:
        target = self.file(sha256)
        if target.exists():
            os.utime(target)  # recently seen: evicted last
            return
        tmp = self.path / f".tmp-{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):  # a part written before the volume filled up is not left behind
                tmp.unlink()
            raise
        self._added(len(data))

    def adopt(self, source: Path, sha256: str) -> bool:
        """Moves ``source`` in (same file system); False when it is gone."""
        try:
            size = source.stat().st_size
            os.replace(source, self.file(sha256))
        except FileNotFoundError:
            return False
        self._added(size)
        return True

    def _added(self, size: int) -> None:
        with self._lock:
            self._bytes += size
            if self._bytes <= self.max_bytes:
                return
            sizes = self._sizes()  # the truth on disk (other replicas write here too)
            total = sum(sizes.values())
            for path in sorted(sizes, key=lambda p: _mtime(p)):
                if total <= 0.9 * self.max_bytes:
                    break
                try:
                    path.unlink()
                    total -= sizes[path]
                except FileNotFoundError:
                    pass
            self._bytes = total

    @property
    def bytes(self) -> int:
        return self._bytes


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class PhotoStore:
    def __init__(self, root: str | Path, tokens: FeedbackTokens, max_bytes: int, clock=time.time):
        self.root = Path(root)
        self.tokens = tokens
        self.pending = BoundedFolder(self.root / "pending", max_bytes)
        self.corrected = BoundedFolder(self.root / "corrected", max_bytes)
        self.log_path = self.root / "corrections.jsonl"
        self.clock = clock
        self._failing = False  # the last store operation failed: logged once, until one succeeds again
        self._running = 0  # operations on their threads, blocked ones included
        self._running_lock = threading.Lock()

    async def _run(self, operation: str, work, *args):
        """``work(*args)`` on a thread of its own, waited for at most STORE_WAIT_S (the module's docstring says why);
        an OSError (StoreUnavailable for a timeout, or when MAX_OPERATIONS are running) is counted by ``operation``
        (keep, record), logged once per spell of failures, and raised."""
        try:
            result = await self._in_thread(work, *args)
        except OSError as exc:
            metrics.child(metrics.PHOTO_STORE_FAILURES, operation=operation).inc()
            if not self._failing:
                log.warning("the photo store %s cannot %s: %s (classify goes on without it; corrections are 503 "
                            "until it works)", self.root, operation, exc)
            self._failing = True
            raise
        if self._failing:
            log.info("the photo store %s works again", self.root)
            self._failing = False
        return result

    async def _in_thread(self, work, *args):
        with self._running_lock:
            if self._running >= MAX_OPERATIONS:
                raise StoreUnavailable(f"{MAX_OPERATIONS} operations of the store are still running (its volume "
                                       "does not answer)")
            self._running += 1

        def counted():
            try:
                return work(*args)
            finally:
                with self._running_lock:
                    self._running -= 1

        try:
            return await asyncio.wait_for(in_daemon_thread(counted, name="photo-store"), STORE_WAIT_S)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"a file operation did not end within {STORE_WAIT_S:g} s (its volume does not "
                                   "answer)") from None

    def _keep(self, photo: bytes) -> str:
        sha256 = hashlib.sha256(photo).hexdigest()
        self.pending.put(sha256, photo)
        return sha256

    async def keep(self, photo: bytes, answer: dict) -> dict:
        """Stores the photo and gives the answer a feedback token that names it; ``answer`` as it is (its token
        naming no photo) when the photo cannot be stored."""
        try:
            sha256 = await self._run("keep", self._keep, photo)
        except OSError:
            return answer
        return {**answer, "feedback_token": self.tokens.naming_photo(answer["feedback_token"], sha256)}

    def _record(self, claim: FeedbackClaim, true_label: str) -> bool:
        sha256 = claim.photo_sha256
        kept = self.corrected.file(sha256).exists() or self.corrected.adopt(self.pending.file(sha256), sha256)
        line = json.dumps({"sha256": sha256, "true_label": true_label, "predicted": claim.predicted,
                           "model": self.tokens.model_name, "version": claim.version, "identity": claim.identity,
                           "request_id": claim.request_id, "answered_at": claim.issued_at,
                           "corrected_at": round(self.clock(), 3), "photo_kept": kept})
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (line + "\n").encode())  # one write per line: replicas appending never interleave
        finally:
            os.close(fd)
        return kept

    async def record(self, claim: FeedbackClaim, true_label: str) -> bool | None:
        """For feedback already recorded: a correction (``true_label`` differs from the answer) of a kept photo is
        logged; returns whether its photo is kept, None when this is no correction or the answer named no photo."""
        if claim.photo_sha256 is None or true_label == claim.predicted:
            return None
        try:
            kept = await self._run("record", self._record, claim, true_label)
        except OSError as exc:
            raise GatewayError(503, "photo_store_unavailable", f"the feedback is recorded, but the correction cannot "
                               f"be logged in the photo store ({exc}): send the same feedback again later",
                               retry_after=RETRY_AFTER_S) from None
        if not kept:
            log.warning("correction of %s logged without its photo (evicted, or kept by a replica with another "
                        "store)", claim.request_id)
        return kept
