"""Load under faults: a steady classify load against a real local stack while its dependencies fail.

The stack is the local one's (`make run`) on free loopback ports: Redis as the local stack starts it, the model server
with the local stack's model config (the two newest versions loaded) over a registry of our own holding versions 1
and 2 (copies of the newest published version, or the tests' tiny model when nothing is published or with --tiny),
and one gateway with an admin token. The routing table pins all traffic to version 1, the older one, so a lost table
or an unloaded version shows as answers from another version.

The load: --concurrency clients (8) POST /v1/classify back to back, every other request a repeated photo (16 of them,
cached after their first answer) and every other one a photo never sent before (a shared photo, downsized, with a
unique JPEG comment so its bytes are new; drawn photos when the shared ones are absent). A client answered anything
but 200 waits 50 ms before its next request (it does not honour Retry-After, so recovery is seen to within 50 ms).

Each scenario: steady load, the fault, the dependency back, load kept up, then every request still in flight waited
for (a client gives up after 30 s). The faults:
  redis_sigkill         Redis SIGKILL, restarted on the same port after --down seconds
  redis_sigstop         Redis SIGSTOP, SIGCONT after --down seconds
  model_server_sigkill  model server SIGKILL, restarted on the same ports after --down seconds
  model_server_sigstop  model server SIGSTOP, SIGCONT after --down seconds
  model_server_crash_loop  a crash loop: the model server SIGKILLed, restarted after --down seconds, SIGKILLed again
                        1 s after it listens (its model still loading), 3 crashes in all; then restarted for good
  publish_non_atomic    `cp -r` of version 2 into a new numeric folder, slow enough for the server to see half of it:
                        saved_model.pb first, the rest once the server lists the new version (or 3 polls passed)
  publish_corrupt       a new numeric folder holding a garbage saved_model.pb
  unload_under_load     version 1's folder removed while the routing table pins all traffic to it
  gateway_rolling_update  the gateway replaced as a Kubernetes rolling update replaces a pod: a new one started and
                        balanced to, then the old one SIGTERMed, still balanced to for 0.5 s (a refused connect
                        retried on the new one, as load balancers do); the new one serves the scenarios after it
and, first, `baseline` (no fault) followed by a cache-hit-only phase for Redis keys per cache-hit request.

Each reports: requests sent; lost (anything but 200 or 503 with Retry-After: other statuses, 503 without
Retry-After, no answer); 503s; recovery, the seconds from the dependency back (Redis listening or continued; the model
server's pinned version AVAILABLE again; for the publish and unload scenarios the fault itself) until the last
answer that was not a 200 came (none after: 0; no 200 for any request sent after the last failed one was sent: not
recovered); the slowest answer; Redis keys added per request; gateway and model server RSS before and after; answers
from a version other than the pinned one; for Redis, whether the routing table and the audit log are intact after it
and when cache hits came back; while a dependency is away, what /readyz says (every 0.25 s) and what the admin audit
and feedback on a real answer (classified before the fault) answer (once), and what that feedback answers when sent
again once the dependency is back: a client told 503 retries, so it must be recorded then. And its timeline: the
answers by outcome in bins of 0.25 s (``timeline``), which bench/run_all.py draws as bench/plots/faults.svg.

Usage: python -m bench.faults [--quick] [--tiny] [--registry DIR] [--only redis_sigstop,...] [--result-name faults]
                               [--label TEXT]
"""
from __future__ import annotations

import argparse
import asyncio
import email.utils
import io
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from bench.common import latest_published_version, write_result
from bench.stack import Stack, freeze, resume, rss_mb
from devstack.servers import version_states, wait_until
from training_job import registry as registry_layout
from training_job.paths import default_registry, shared_data_dir

OK, UNAVAILABLE, LOST = "ok", "unavailable", "lost"
AVAILABLE = ModelVersionStatus.AVAILABLE
PINNED_VERSION = 1
PIN_TABLE = {"weights": {str(PINNED_VERSION): 100}, "shadow": None}
HOT_PHOTOS = 16
CLIENT_TIMEOUT_S = 30.0
PAUSE_AFTER_ERROR_S = 0.05
DEPENDENCY_SCENARIOS = ("redis_sigkill", "redis_sigstop", "model_server_sigkill", "model_server_sigstop",
                        "model_server_crash_loop")
SCENARIOS = ("baseline", "redis_sigkill", "redis_sigstop", "model_server_sigkill", "model_server_sigstop",
             "model_server_crash_loop", "publish_non_atomic", "publish_corrupt", "unload_under_load",
             "gateway_rolling_update")
ENDPOINT_LAG_S = 0.5  # rolling update: how long the balancer still sends to a gateway after its SIGTERM
CRASH_LOOP_CRASHES = 3  # model server crashes in the crash-loop scenario, the last one followed by a lasting restart
CRASH_LOOP_UP_S = 1.0  # how long each restarted server lives before its next crash: listening, its model loading


# ---------------------------------------------------------------------------------------------- counting (pure)
def classify_outcome(status: int | None, retry_after: str | None) -> str:
    """What one answer counts as: a 200 is ``ok``; a 503 with a valid Retry-After (delta-seconds or an HTTP date) is
    ``unavailable``, a clean "come back later"; anything else (another status, a 503 without a usable Retry-After, no
    answer at all: ``status`` None for refused, reset or timed out) is ``lost``."""
    if status == 200:
        return OK
    if status == 503 and retry_after is not None:
        value = retry_after.strip()
        if value.isdigit() or (value and email.utils.parsedate_tz(value) is not None):
            return UNAVAILABLE
    return LOST


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() when the request was sent
    done: float  # ... when its answer (or the failure) came
    outcome: str  # OK, UNAVAILABLE or LOST
    detail: str  # the HTTP status, or the client-side exception's name
    version: int | None = None  # the version that answered a 200
    cached: bool = False
    new_photo: bool = False
    rerouted: bool = False  # a gateway refused the connection and the next one took the request (nothing was sent)


def recovery_seconds(answers: list[Answer], back_at: float) -> float | None:
    """Seconds from ``back_at`` (the dependency back) until full service: until the last answer that was not a 200
    came (0 when none came after ``back_at``), so a request stranded for 10 s counts its 10 s. None when the service
    did not recover within the window: no request sent after the last failed one was sent got a 200."""
    failures = [a for a in answers if a.outcome != OK]
    if not failures:
        return 0.0 if answers else None
    last_sent = max(a.sent for a in failures)
    if not any(a.outcome == OK and a.sent > last_sent for a in answers):
        return None
    return max(0.0, max(a.done for a in failures) - back_at)


def summarise(answers: list[Answer], fault_at: float, back_at: float, pinned: int | None) -> dict:
    """The figures of one scenario's answers (times relative to the fault and to the dependency back)."""
    outcomes = Counter(a.outcome for a in answers)
    latencies = sorted(a.done - a.sent for a in answers)
    hits_back = [a.done for a in answers if a.cached and a.sent >= back_at]
    return {
        "requests": len(answers), "ok": outcomes[OK], "unavailable_503": outcomes[UNAVAILABLE], "lost": outcomes[LOST],
        "lost_by_kind": dict(Counter(a.detail for a in answers if a.outcome == LOST)),
        "new_photo_share": sum(a.new_photo for a in answers) / len(answers) if answers else 0.0,
        "recovery_s": recovery_seconds(answers, back_at),
        "fault_to_back_s": back_at - fault_at,
        "slowest_answer_s": latencies[-1] if latencies else None,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "cached_answers_during_fault": sum(a.cached for a in answers if fault_at <= a.sent and a.done < back_at),
        "cache_hits_resume_s": min(hits_back) - back_at if hits_back else None,
        "answered_by_version": {str(v): n for v, n in sorted(Counter(
            a.version for a in answers if a.outcome == OK).items())},
        "answers_off_pinned_version": sum(1 for a in answers if a.outcome == OK and a.version != pinned),
        "rerouted": sum(a.rerouted for a in answers),
    }


TIMELINE_BIN_S = 0.25


def timeline(answers: list[Answer], fault_at: float, back_at: float, recovery_s: float | None,
             bin_s: float = TIMELINE_BIN_S) -> dict:
    """The answers by when they came, in bins of ``bin_s`` seconds: per bin, how many were ``ok``, ``unavailable``
    (503 with Retry-After) and ``lost``, and the slowest of them (ms, 0 for an empty bin). Times are seconds from the
    fault: bin 0 starts at ``first_s``; the dependency was back at ``back_s``, full service at ``recovered_s``
    (None: not recovered)."""
    if not answers:
        return {"bin_s": bin_s, "first_s": 0.0, "back_s": back_at - fault_at, "recovered_s": None,
                OK: [], UNAVAILABLE: [], LOST: [], "slowest_ms": []}
    first = min(a.done for a in answers) - fault_at
    first_bin = int(first // bin_s)
    bins = int((max(a.done for a in answers) - fault_at) // bin_s) - first_bin + 1
    counts = {outcome: [0] * bins for outcome in (OK, UNAVAILABLE, LOST)}
    slowest = [0.0] * bins
    for a in answers:
        index = int((a.done - fault_at) // bin_s) - first_bin
        counts[a.outcome][index] += 1
        slowest[index] = max(slowest[index], round((a.done - a.sent) * 1000, 1))
    return {"bin_s": bin_s, "first_s": first_bin * bin_s, "back_s": back_at - fault_at,
            "recovered_s": None if recovery_s is None else back_at - fault_at + recovery_s, **counts,
            "slowest_ms": slowest}


# ---------------------------------------------------------------------------------------------- photos
def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a comment segment (COM) right after its start marker: the same picture, new bytes."""
    if not jpeg.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG")
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def base_photos(count: int = 48, max_side: int = 512) -> list[bytes]:
    """``count`` shared photos, downsized to ``max_side`` and re-encoded as JPEG; drawn ones when none are shared."""
    from PIL import Image, ImageOps

    paths = sorted(p for p in (shared_data_dir() / "mushrooms").glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg"))
    out = []
    for path in paths[::max(1, len(paths) // count)][:count]:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((max_side, max_side))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=90)
            out.append(buffer.getvalue())
    if not out:
        import numpy as np

        rng = np.random.default_rng(11)
        for _ in range(count):
            pixels = rng.integers(0, 256, (1, 1, 3)) + rng.integers(0, 64, (max_side // 2, max_side // 2, 3))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(buffer, "JPEG", quality=90)
            out.append(buffer.getvalue())
    return out


class Photos:
    """Requests alternate: a repeated photo (one of ``hot``), then a photo never sent before (a base photo with a
    comment unique to this run and request)."""

    def __init__(self, bases: list[bytes], hot_count: int = HOT_PHOTOS):
        self.bases = bases
        self.hot = [with_comment(photo, f"hot-{i}") for i, photo in enumerate(bases[:hot_count])]
        self._run = uuid.uuid4().hex[:12]
        self._counter, self._hot_counter, self._single_counter = itertools.count(), itertools.count(), itertools.count()

    def next_mixed(self) -> tuple[bytes, bool]:
        i = next(self._counter)
        if i % 2 == 0:
            return self.hot[(i // 2) % len(self.hot)], False
        return with_comment(self.bases[(i // 2) % len(self.bases)], f"new-{self._run}-{i}"), True

    def next_new(self) -> bytes:
        """A photo never sent before, outside the alternation."""
        i = next(self._single_counter)
        return with_comment(self.bases[i % len(self.bases)], f"single-{self._run}-{i}")

    def next_hot(self) -> tuple[bytes, bool]:
        return self.hot[next(self._hot_counter) % len(self.hot)], False


# ---------------------------------------------------------------------------------------------- load
class Load:
    """``concurrency`` clients send ``next_photo()`` to POST /v1/classify back to back (after ``think_s``), from a
    thread and event loop of their own, until stop() or ``max_requests`` were sent. A client answered anything but 200
    waits PAUSE_AFTER_ERROR_S before its next request.

    ``urls`` are the gateways, as a load balancer in front of them sees them: requests go to each in turn, and a
    request whose connection a gateway refuses (nothing was sent) goes to the next one, as a load balancer retries a
    failed connect on the next upstream. The list is read at every request: a scenario may change it under load."""

    def __init__(self, urls: list[str], next_photo: Callable[[], tuple[bytes, bool]], concurrency: int,
                 max_requests: int, think_s: float = 0.0, client_id: str = "fault-bench"):
        self.urls, self.next_photo, self.concurrency = urls, next_photo, concurrency
        self.max_requests, self.think_s, self.client_id = max_requests, think_s, client_id
        self.answers: list[Answer] = []
        self._stopping = threading.Event()
        self._sent = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="fault-load", daemon=True)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Answer]:
        """Stops sending and waits for every request in flight (each bounded by the client timeout)."""
        self._stopping.set()
        return self._join(CLIENT_TIMEOUT_S + 10)

    def run_to_count(self, timeout: float = 120.0) -> list[Answer]:
        """Sends ``max_requests`` requests (or gives up after ``timeout`` s) and returns their answers."""
        self._thread.start()
        self._thread.join(timeout)
        return self.stop()

    def _join(self, timeout: float) -> list[Answer]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the load did not stop")
        return self.answers

    async def _run(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency),
                                         timeout=timeout) as session:
            await asyncio.gather(*(self._client(session) for _ in range(self.concurrency)))

    async def _client(self, session) -> None:
        import aiohttp

        while not self._stopping.is_set() and self._sent < self.max_requests:
            self._sent += 1
            photo, new = self.next_photo()
            version, cached, sent = None, False, time.monotonic()
            urls = list(self.urls)
            first, rerouted = self._sent % len(urls), False
            for attempt in range(len(urls)):
                url = urls[(first + attempt) % len(urls)]
                try:
                    async with session.post(f"{url}/v1/classify?top_k=1", data=photo, headers={
                            "Content-Type": "image/jpeg", "X-Client-Id": self.client_id}) as response:
                        body = await response.read()
                        status, retry_after = response.status, response.headers.get("Retry-After")
                        detail = f"HTTP {status}"
                    if status == 200:
                        answer = json.loads(body)
                        version, cached = int(answer["model"]["version"]), bool(answer["cached"])
                except aiohttp.ClientConnectorError as exc:  # refused: nothing sent, the next gateway may take it
                    status, retry_after, detail = None, None, type(exc).__name__
                    rerouted = True
                    continue
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    status, retry_after, detail = None, None, type(exc).__name__
                except (ValueError, KeyError, TypeError):
                    status, retry_after, detail = None, None, "unreadable_200"
                break
            outcome = classify_outcome(status, retry_after)
            self.answers.append(Answer(sent, time.monotonic(), outcome, detail, version, cached, new, rerouted))
            if outcome != OK:
                await asyncio.sleep(PAUSE_AFTER_ERROR_S)
            elif self.think_s:
                await asyncio.sleep(self.think_s)


# ---------------------------------------------------------------------------------------------- the bench
@dataclass(frozen=True)
class Timing:
    warm_s: float  # steady load before the fault
    down_s: float  # how long a dependency stays dead or frozen
    after_s: float  # load kept up once the dependency is back


FULL = Timing(warm_s=3.0, down_s=3.0, after_s=6.0)
POLL_S = 0.05  # how often a state is polled when its time is measured (recovery, restart to AVAILABLE)
QUICK = Timing(warm_s=1.5, down_s=1.5, after_s=3.0)


class Admin:
    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(self.url + path, method=method, data=json.dumps(body).encode()
                                         if body is not None else None, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
            "X-Operator": "fault-bench"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())


def weights_of(routing: dict) -> dict[str, float]:
    return {str(k): float(v) for k, v in (routing.get("weights") or {}).items()}


class FaultBench:
    """The scenarios against one stack; each starts from the same state (versions 1 and 2 AVAILABLE, traffic pinned
    to version 1) and reports its figures."""

    def __init__(self, stack: Stack, gateway, model_dir: Path, originals: Path, photos: Photos, timing: Timing,
                 concurrency: int, admin_token: str, think_s: float = 0.0, max_requests: int = 50_000):
        self.stack, self.gateway, self.model_dir, self.originals = stack, gateway, model_dir, originals
        self.photos, self.timing, self.concurrency, self.think_s = photos, timing, concurrency, think_s
        self.max_requests = max_requests
        self.admin_token = admin_token
        self.admin = Admin(gateway.http_url, admin_token)
        self.urls = [gateway.http_url]  # the gateways the load balances over (Load), changed by a rolling update
        self.trash = originals.parent / "removed"
        self.trash.mkdir(exist_ok=True)
        self._next_version = 3
        self.feedback: dict | None = None  # feedback on an answer got before the scenario's fault (``prepare``)

    # ----------------------------------------------------------------------------------------- state
    def version_states(self) -> dict[int, int]:
        try:
            return {v: state for v, (state, _) in version_states(self.stack.server.grpc_target,
                                                                 self.stack.model_name).items()}
        except Exception:  # noqa: BLE001 - the server is down or restarting: nothing is AVAILABLE
            return {}

    def state_names(self) -> dict[str, str]:
        return {str(v): ModelVersionStatus.State.Name(s) for v, s in sorted(self.version_states().items())}

    def redis_keys(self) -> int | None:
        import redis

        client = redis.Redis.from_url(self.stack.redis.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return int(client.dbsize())
        except redis.RedisError:
            return None
        finally:
            client.close()

    def settled_redis_keys(self) -> int | None:
        """The key count once the gateway's background writes have landed (unchanged over 0.3 s, at most 5 s)."""
        last, deadline = self.redis_keys(), time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.redis_keys()
            if now == last:
                break
            last = now
        return last

    def snapshot(self) -> dict:
        return {"gateway_rss_mb": round(rss_mb(self.gateway.process.pid), 1),
                "model_server_rss_mb": round(rss_mb(self.stack.server.process.pid), 1),
                "redis_keys": self.settled_redis_keys()}

    def remove_version_folder(self, version: int) -> None:
        folder = self.model_dir / str(version)
        target = self.trash / f"{version}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, target)  # vanishes at once for the server's poll
        shutil.rmtree(target, ignore_errors=True)

    def prepare(self) -> None:
        """Versions 1 and 2 (only) in the registry and AVAILABLE, known to the gateway, traffic pinned to 1, the
        repeated photos sent once (so cached unless Redis lost them)."""
        for version in registry_layout.versions(self.model_dir):
            if version not in (1, 2):
                self.remove_version_folder(version)
        for version in (1, 2):
            if not (self.model_dir / str(version)).exists():
                staging = self.trash / f"restore-{version}-{uuid.uuid4().hex[:8]}"
                shutil.copytree(self.originals / str(version), staging)
                os.rename(staging, self.model_dir / str(version))
        wait_until(lambda: all(self.version_states().get(v) == AVAILABLE for v in (1, 2)), timeout=180,
                   interval=POLL_S, what="versions 1 and 2 AVAILABLE")

        def gateway_sees_both() -> bool:
            try:
                return {1, 2} <= set(self.admin.call("GET", "/v1/admin/routing").get("available", []))
            except (OSError, ValueError):
                return False

        wait_until(gateway_sees_both, timeout=60, interval=0.2, what="the gateway to see versions 1 and 2")
        if weights_of(self.admin.call("GET", "/v1/admin/routing")) != weights_of(PIN_TABLE):
            self.admin.call("PUT", "/v1/admin/routing", PIN_TABLE)
        Load([self.gateway.http_url], self.photos.next_hot, 2, len(self.photos.hot)).run_to_count()
        self.feedback = self.feedback_on_a_new_answer()

    def feedback_on_a_new_answer(self) -> dict:
        """Feedback confirming the answer to a photo never sent before: the body a client would POST."""
        photo = self.photos.next_new()
        request = urllib.request.Request(self.gateway.http_url + "/v1/classify", data=photo, method="POST",
                                         headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        return {"feedback_token": answer["feedback_token"], "true_label": answer["predictions"][0]["label"]}

    def routing_and_audit(self, answers: list[Answer], back_at: float) -> dict:
        """After a Redis fault: is the table still the pin (as the gateway reports it and as the traffic after the
        restart shows), and is the audit entry that set it still there?"""
        try:
            table_kept = weights_of(self.admin.call("GET", "/v1/admin/routing")) == weights_of(PIN_TABLE)
        except (OSError, ValueError):
            table_kept = False
        followed = not any(a.outcome == OK and a.version != PINNED_VERSION for a in answers if a.sent >= back_at)
        try:
            entries = self.admin.call("GET", "/v1/admin/audit").get("entries", [])
            audit_kept = any(weights_of(e.get("new", {})) == weights_of(PIN_TABLE) for e in entries)
        except (OSError, ValueError):
            audit_kept = False
        return {"routing_intact": table_kept and followed, "routing_table_kept": table_kept,
                "pinned_traffic_kept_after_back": followed, "audit_intact": audit_kept}

    # ----------------------------------------------------------------------------------------- one run
    def run(self, name: str) -> dict:
        fault = getattr(self, f"fault_{name}")
        self.prepare()
        before = self.snapshot()
        load = Load(self.urls, self.photos.next_mixed, self.concurrency, self.max_requests, self.think_s)
        with load:
            time.sleep(self.timing.warm_s)  # steady load before the fault (a measured span, not a synchronisation)
            fault_at, back_at, facts = fault()
            time.sleep(max(0.0, back_at + self.timing.after_s - time.monotonic()))
        answers = load.answers
        after = self.snapshot()
        keys_from, counted = before["redis_keys"], answers
        if "keys_at_back" in facts:  # Redis restarted: count from the restart on
            keys_from, counted = facts.pop("keys_at_back"), [a for a in answers if a.sent >= back_at]
        result = {**summarise(answers, fault_at, back_at, PINNED_VERSION), **facts,
                  "gateway_rss_mb": [before["gateway_rss_mb"], after["gateway_rss_mb"]],
                  "model_server_rss_mb": [before["model_server_rss_mb"], after["model_server_rss_mb"]],
                  "gateway_alive": self.gateway.process.poll() is None,
                  "versions_at_end": self.state_names()}
        result["timeline"] = timeline(answers, fault_at, back_at, result["recovery_s"])
        if name.startswith(("publish", "unload")):
            add_version_facts(result)
        added = None if keys_from is None or after["redis_keys"] is None else after["redis_keys"] - keys_from
        result["redis_keys_added"] = added
        result["redis_keys_per_request"] = added / len(counted) if added is not None and counted else None
        if name.startswith("redis"):
            result.update(self.routing_and_audit(answers, back_at))
        if "admin_during_outage" in result:  # the client that sent feedback during the outage sends it again
            result["feedback_sent_again_after"] = self.probe("POST", "/v1/feedback", self.feedback)
        print(f"{name}: {result['requests']} requests, lost {result['lost']} {result['lost_by_kind'] or ''}, "
              f"503 {result['unavailable_503']}, recovery {fmt_s(result['recovery_s'])}, slowest "
              f"{fmt_s(result['slowest_answer_s'])}, keys/request {fmt(result['redis_keys_per_request'])}, answers "
              f"by version {result['answered_by_version']}"
              + (f", routing intact {result['routing_intact']}, audit intact {result['audit_intact']}"
                 if "routing_intact" in result else ""), flush=True)
        return result

    # ----------------------------------------------------------------------------------------- the faults
    # Each fault returns (when it struck, when the dependency was back, facts to report), times of time.monotonic().
    def fault_baseline(self) -> tuple[float, float, dict]:
        now = time.monotonic()
        return now, now, {}

    def outage(self) -> dict:
        """Lasts ``down_s``. Meanwhile /readyz is asked every 0.25 s, and once the admin audit and the feedback
        ``prepare`` got a token for are: their answers while the dependency is away."""
        end, ready, admin = time.monotonic() + self.timing.down_s, Counter(), {}
        while time.monotonic() < end:
            ready[self.probe("GET", "/readyz")] += 1
            if not admin:
                admin = {"audit": self.probe("GET", "/v1/admin/audit"),
                         "feedback": self.probe("POST", "/v1/feedback", self.feedback)}
            time.sleep(max(0.0, min(0.25, end - time.monotonic())))
        return {"readyz_during_outage": dict(ready), "admin_during_outage": admin}

    def probe(self, method: str, path: str, body: dict | None = None) -> str:
        """'HTTP 200', 'HTTP 503 + Retry-After', 'HTTP 500', or the client-side error's name."""
        try:
            self.admin.call(method, path, body)
            return "HTTP 200"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}" + (" + Retry-After" if exc.headers.get("Retry-After") else "")
        except (OSError, ValueError) as exc:
            return type(exc).__name__

    def fault_redis_sigkill(self) -> tuple[float, float, dict]:
        self.stack.kill_redis()
        struck = time.monotonic()
        facts = self.outage()
        self.stack.restart_redis()
        back = time.monotonic()
        return struck, back, {**facts, "keys_at_back": self.redis_keys()}

    def fault_redis_sigstop(self) -> tuple[float, float, dict]:
        return self._frozen(self.stack.redis.process)

    def fault_model_server_sigkill(self) -> tuple[float, float, dict]:
        self.stack.kill_model_server()
        struck = time.monotonic()
        facts = self.outage()
        restarted, back = self.restart_until_available()
        return struck, back, {**facts, "restart_to_available_s": back - restarted}

    def restart_until_available(self) -> tuple[float, float]:
        """The model server restarted for good: (when it was started, when the pinned version was AVAILABLE)."""
        restarted = time.monotonic()
        self.stack.restart_model_server()
        back = wait_until(lambda: self.version_states().get(PINNED_VERSION) == AVAILABLE and time.monotonic(),
                          timeout=180, interval=POLL_S, what=f"version {PINNED_VERSION} AVAILABLE after the restart")
        return restarted, back

    def fault_model_server_crash_loop(self) -> tuple[float, float, dict]:
        self.stack.kill_model_server()
        struck = time.monotonic()
        facts = self.outage()
        for _ in range(CRASH_LOOP_CRASHES - 1):
            self.stack.restart_model_server()
            time.sleep(CRASH_LOOP_UP_S)  # the span the restarted server lives, not a synchronisation
            self.stack.kill_model_server()
            time.sleep(self.timing.down_s)
        restarted, back = self.restart_until_available()
        return struck, back, {**facts, "crashes": CRASH_LOOP_CRASHES, "restart_to_available_s": back - restarted}

    def fault_model_server_sigstop(self) -> tuple[float, float, dict]:
        return self._frozen(self.stack.server.process)

    def _frozen(self, process) -> tuple[float, float, dict]:
        freeze(process)
        struck = time.monotonic()
        try:
            facts = self.outage()
        finally:
            resume(process)
        return struck, time.monotonic(), facts

    def new_version_number(self) -> int:
        taken = registry_layout.versions(self.model_dir)
        self._next_version = max([self._next_version, *(v + 1 for v in taken)])
        number, self._next_version = self._next_version, self._next_version + 1
        return number

    def fault_publish_non_atomic(self) -> tuple[float, float, dict]:
        number = self.new_version_number()
        source, target = self.model_dir / "2", self.model_dir / str(number)
        target.mkdir()
        struck = time.monotonic()
        shutil.copy2(source / "saved_model.pb", target / "saved_model.pb")
        try:  # the server polls every second: let it find the half copy
            seen = wait_until(lambda: self.version_states().get(number), timeout=3.5, interval=POLL_S,
                              what="the half copy to be seen")
        except TimeoutError:
            seen = None
        for item in sorted(source.iterdir()):
            if item.name != "saved_model.pb":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, target / item.name)
        return struck, time.monotonic(), {"new_version": number,
                                          "half_copy_state_seen": ModelVersionStatus.State.Name(seen) if seen else None}

    def fault_publish_corrupt(self) -> tuple[float, float, dict]:
        number = self.new_version_number()
        target = self.model_dir / str(number)
        staging = self.trash / f"corrupt-{number}"
        staging.mkdir()
        (staging / "saved_model.pb").write_bytes(random.Random(number).randbytes(4096))
        os.rename(staging, target)
        now = time.monotonic()
        return now, now, {"new_version": number}

    def fault_gateway_rolling_update(self) -> tuple[float, float, dict]:
        """The gateway replaced under load as Kubernetes' rolling update replaces a pod (maxSurge 1, maxUnavailable
        0): a new gateway is started and, once ready, taken into the balancing; the old one gets SIGTERM, and the
        balancer stops sending to it ENDPOINT_LAG_S later (endpoint updates race the signal), retrying a refused
        connect on the new one meanwhile. The old gateway runs as the bench's does: no shutdown delay. Fault: the
        SIGTERM; back: the old gateway has exited."""
        old = self.gateway
        new = self.stack.start_gateway(grpc=False, env={"GATEWAY_ADMIN_TOKEN": self.admin_token})
        self.urls.append(new.http_url)
        time.sleep(1.0)  # both serve
        fault_at = time.monotonic()
        old.process.send_signal(signal.SIGTERM)
        time.sleep(ENDPOINT_LAG_S)
        self.urls.remove(old.http_url)
        old.process.wait(60)
        back_at = time.monotonic()
        self.stack.stop_gateway(old)
        self.gateway, self.admin = new, Admin(new.http_url, self.admin_token)
        return fault_at, back_at, {"old_gateway_exit_code": old.process.returncode,
                                   "old_gateway_stopped_in_s": round(back_at - fault_at, 3)}

    def fault_unload_under_load(self) -> tuple[float, float, dict]:
        self.remove_version_folder(PINNED_VERSION)
        now = time.monotonic()
        return now, now, {"removed_version": PINNED_VERSION}


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def fmt_s(value) -> str:
    return "not recovered" if value is None else f"{value:.2f} s"


def add_version_facts(result: dict) -> None:
    """The new version's answers and end state, and whether the pinned version kept its place."""
    number = result.get("new_version")
    if number is not None:
        result["answers_by_new_version"] = result["answered_by_version"].get(str(number), 0)
        result["new_version_state_at_end"] = result["versions_at_end"].get(str(number))
    result["pinned_version_available_at_end"] = result["versions_at_end"].get(str(PINNED_VERSION)) == "AVAILABLE"


def cache_hit_phase(bench: FaultBench, requests: int) -> dict:
    """Only repeated photos, each cached beforehand: the Redis keys each cache-hit answer adds."""
    bench.prepare()
    for _ in range(5):  # until every hot photo is answered from the cache
        warm = Load([bench.gateway.http_url], bench.photos.next_hot, 1, len(bench.photos.hot)).run_to_count()
        if all(a.cached for a in warm):
            break
    before = bench.settled_redis_keys()
    answers = Load([bench.gateway.http_url], bench.photos.next_hot, bench.concurrency, requests,
                   bench.think_s).run_to_count()
    after = bench.settled_redis_keys()
    hits = sum(a.cached for a in answers)
    added = None if before is None or after is None else after - before
    result = {"requests": len(answers), "cache_hits": hits,
              "lost": sum(a.outcome == LOST for a in answers), "redis_keys_added": added,
              "redis_keys_per_cache_hit": added / hits if added is not None and hits else None}
    print(f"cache hits only: {result['requests']} requests, {hits} cache hits, Redis keys per cache hit "
          f"{fmt(result['redis_keys_per_cache_hit'])}", flush=True)
    return result


def targets(scenarios: dict, hits: dict | None) -> dict:
    """The issue's done-when figures, over the scenarios that ran."""
    out = {}
    if scenarios:
        lost = sum(s["lost"] for s in scenarios.values())
        out["lost"] = {"what": "requests lost under faults (all scenarios; anything but 200 or 503 with Retry-After)",
                       "value": lost, "target": "0", "met": lost == 0}
    dependency = {n: s["recovery_s"] for n, s in scenarios.items() if n in DEPENDENCY_SCENARIOS}
    if dependency:
        worst = None if None in dependency.values() else max(dependency.values())
        out["recovery"] = {"what": "recovery after Redis or the model server is back (worst; the model server: after "
                           "its model is AVAILABLE)", "value": "not recovered" if worst is None else round(worst, 2),
                           "target": "<= 2 s", "unit": "s", "met": worst is not None and worst <= 2.0}
    if hits and hits.get("redis_keys_per_cache_hit") is not None:
        value = hits["redis_keys_per_cache_hit"]
        out["keys_per_hit"] = {"what": "Redis keys added per cache-hit request", "value": round(value, 4),
                               "target": "<= 0.01", "met": value <= 0.01}
    feedback = {n: s for n, s in scenarios.items() if "feedback_sent_again_after" in s}
    if feedback:
        kept = [n for n, s in feedback.items() if s["feedback_sent_again_after"] == "HTTP 200"
                and s["admin_during_outage"]["feedback"] in ("HTTP 200", "HTTP 503 + Retry-After")]
        out["feedback_kept"] = {
            "what": "feedback on an answer sent while Redis or the model server is down: recorded, or refused with "
                    "503 and Retry-After and recorded when sent again once it is back (scenarios)",
            "value": f"{len(kept)} of {len(feedback)}", "target": "all", "met": len(kept) == len(feedback)}
    if "redis_sigkill" in scenarios:
        s = scenarios["redis_sigkill"]
        intact = s["routing_intact"] and s["audit_intact"]
        out["state_after_restart"] = {
            "what": "routing table and audit intact after a Redis restart",
            "value": f"routing {'yes' if s['routing_intact'] else 'no'}, audit {'yes' if s['audit_intact'] else 'no'}",
            "target": "yes", "met": intact}
    return out


# ---------------------------------------------------------------------------------------------- setup
def build_registry(root: Path, model_name: str, published: Path | None) -> Path:
    """``root/model_name/{1,2}`` (and pristine copies under ``root/originals``): the published version twice, or two
    tiny versions."""
    model_dir, originals = root / model_name, root / "originals"
    model_dir.mkdir(parents=True)
    if published is not None:
        for version in (1, 2):
            shutil.copytree(published, originals / str(version))
    else:
        from training_job.tiny_model import write_tiny_model

        for version, bias in ((1, 0.0), (2, 2.0)):
            write_tiny_model(originals / str(version), bias=bias)
    for version in (1, 2):
        shutil.copytree(originals / str(version), model_dir / str(version))
    return model_dir


def run_bench(scenarios: list[str], timing: Timing, concurrency: int = 8, tiny: bool = False,
              registry: Path | None = None, model_name: str = "mushrooms", think_s: float = 0.0,
              max_requests: int = 50_000, hit_requests: int = 400) -> dict:
    """Starts the stack, runs ``scenarios`` in order ("baseline" adds the cache-hit phase), stops everything."""
    from devstack import configs

    published = None if tiny else latest_published_version(registry or default_registry(), model_name)
    root = Path(tempfile.mkdtemp(prefix="fault-bench-"))
    token = uuid.uuid4().hex
    results: dict = {}
    hits = None
    try:
        model_dir = build_registry(root, model_name, published)
        photos = Photos(base_photos())
        with Stack(model_dir / "2", model_name, write_model_config=lambda path: configs.write_model_config(
                path, model_name, model_dir)) as stack:
            gateway = stack.start_gateway(grpc=False, env={"GATEWAY_ADMIN_TOKEN": token})
            bench = FaultBench(stack, gateway, model_dir, root / "originals", photos, timing, concurrency, token,
                               think_s, max_requests)
            for name in scenarios:
                results[name] = bench.run(name)
                if name == "baseline":
                    hits = cache_hit_phase(bench, hit_requests)
            logs = str(stack.work)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"model": str(published) if published else "training_job/tiny_model.py (two tiny versions)",
            "timing": asdict(timing), "concurrency": concurrency, "pinned_version": PINNED_VERSION,
            "client_timeout_s": CLIENT_TIMEOUT_S, "scenarios": results, "order": list(results), "cache_hits_only": hits,
            "targets": targets(results, hits), "logs": logs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"shorter phases: {QUICK}")
    parser.add_argument("--tiny", action="store_true", help="serve two tiny test models even when one is published")
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--model_name", default="mushrooms")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    parser.add_argument("--result-name", default="faults", help="bench/results/<name>.json (default faults)")
    parser.add_argument("--label", default="", help="stored with the results, e.g. 'before the fixes'")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.only.split(",") if s] or list(SCENARIOS)
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    started = time.monotonic()
    result = run_bench(scenarios, QUICK if args.quick else FULL, args.concurrency, args.tiny, args.registry,
                       args.model_name)
    result.update(quick=args.quick, label=args.label, wall_s=round(time.monotonic() - started, 1))
    for row in result["targets"].values():
        print(f"{row['what']}: {row['value']} {row.get('unit', '')} (target {row['target']}: "
              f"{'met' if row['met'] else 'NOT met'})")
    write_result(args.result_name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
