"""Per-version A/B figures: requests, latency, errors and cache hits from this process; feedback from Redis (shared
by every replica); a two-proportion z-test between the two versions with the most feedback.

The per-process counts start from zero with the process, so the summary names the process they belong to
(``instance``: an id drawn at start and the start time): a reader that keeps baselines (the rollout controller) tells a
restarted replica from one that goes on counting. They also start from zero for a version number once another model
holds it (its identity, version_facts.py, is not the one they counted), as a restarted replica's do.

Answers cost Redis nothing: each carries a signed feedback token (feedback.py); Redis is written only when feedback
arrives (the tally hash, and the request id in the ``feedback_seen`` set with its true label in ``feedback_labels``
until its token expires, so it counts once and the same feedback sent again is answered as recorded).

Feedback is tallied per model, not per version number: under the version and the identity of the model that
answered (version_facts.py), which the token carries, so a number given again to another model (a registry removed
and trained anew) starts with no feedback, and what arrives later for the old model's answers stays the old
model's. A version's figures show the tally of the model this process knows under its number. Tallies without an
identity (tokens issued before answers named their model) are moved, once, to the model serving under their number
when they are first seen; a version this process never learnt shows every model's tally under its number together.

A version's figures and its metric series (metrics.VERSIONED) are kept while it is routed to, and for
``forget_after`` seconds once it has left (``keep``: a reader sees how it ended, Prometheus scrapes its last counts),
then dropped: a gateway outlives many versions (a nightly retrain publishes one a night), and what it holds must not
grow with them. A version that comes back after that is counted from zero. Its feedback stays in Redis.
"""
from __future__ import annotations

import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from services.gateway import keys, metrics
from services.gateway.feedback import FeedbackClaim, FeedbackTokens

if TYPE_CHECKING:
    from services.gateway.version_facts import Facts

# KEYS: feedback_seen, feedback_tally, feedback_labels; ARGV: now, token expiry, request id, the tally's field prefix
# (``tally_prefix``), 1 if correct else 0, true label. Returns 1 when recorded, 2 when the request id's feedback was
# recorded with this true label before (the same feedback again), 0 when it was recorded with another. One script:
# the check and the counts are atomic.
RECORD_FEEDBACK_LUA = """
for _, expired in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  redis.call('HDEL', KEYS[3], expired)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[3]) == 0 then
  if redis.call('HGET', KEYS[3], ARGV[3]) == ARGV[6] then return 2 end
  return 0
end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[6])
redis.call('HINCRBY', KEYS[2], ARGV[4] .. ':total', 1)
redis.call('HINCRBY', KEYS[2], ARGV[4] .. ':correct', ARGV[5])
return 1
"""
# KEYS: feedback_tally; ARGV: the unnamed tally's field prefix, the named one's (``tally_prefix``). The version's
# tally without an identity added to the identity's, and removed: atomic, so replicas doing it at once move it once.
NAME_UNNAMED_TALLY_LUA = """
for _, kind in ipairs({'total', 'correct'}) do
  local unnamed = redis.call('HGET', KEYS[1], ARGV[1] .. ':' .. kind)
  if unnamed then
    redis.call('HINCRBY', KEYS[1], ARGV[2] .. ':' .. kind, unnamed)
    redis.call('HDEL', KEYS[1], ARGV[1] .. ':' .. kind)
  end
end
return 1
"""
UNNAMED = None  # the identity of a tally kept before answers named their model
FORGET_AFTER_SECONDS = 600.0  # how long a version that left keeps its figures and metric series (``Stats.keep``)


def tally_prefix(version: int, identity: str | None) -> str:
    """The start of a tally's field names in ``keys.feedback_tally``: ``<version>:<identity>``, or ``<version>`` for
    feedback on an answer that named no model."""
    return str(version) if identity is None else f"{version}:{identity}"


class KnownModels(Protocol):
    """Which model a version number names (version_facts.VersionFacts): ``known`` while it is AVAILABLE,
    ``last_known`` also once it left."""

    def known(self, version: int) -> Facts | None: ...

    def last_known(self, version: int) -> Facts | None: ...


@dataclass
class VersionStats:
    identity: str | None = None  # the model counted (version_facts.identity), None until known
    requests: int = 0
    errors: int = 0
    cache_hits: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=2000))
    miss_latencies: deque = field(default_factory=lambda: deque(maxlen=2000))  # of answers computed, not cached
    shadow_requests: int = 0
    shadow_agreements: int = 0
    shadow_latencies: deque = field(default_factory=lambda: deque(maxlen=2000))


def two_proportion_z_test(correct_a: int, total_a: int, correct_b: int, total_b: int) -> dict | None:
    if min(total_a, total_b) == 0:
        return None
    p_a, p_b = correct_a / total_a, correct_b / total_b
    pooled = (correct_a + correct_b) / (total_a + total_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / total_a + 1 / total_b))
    if se == 0:
        return {"z": 0.0, "p_value": 1.0, "significant": False}
    z = (p_a - p_b) / se
    p_value = math.erfc(abs(z) / math.sqrt(2))
    return {"z": z, "p_value": p_value, "significant": p_value < 0.05}


def _added(tallies) -> tuple[int, int]:
    """(correct, total) tallies added up."""
    tallies = list(tallies)
    return sum(correct for correct, _ in tallies), sum(total for _, total in tallies)


class Stats:
    def __init__(self, redis, model_name: str, tokens: FeedbackTokens | None = None,
                 models: KnownModels | None = None, forget_after: float = FORGET_AFTER_SECONDS):
        self.redis = redis
        self.model_name = model_name
        self.tokens = tokens or FeedbackTokens.with_random_secret(model_name)
        # which model each version number names (version_facts.VersionFacts): the figures and feedback shown for a
        # version are that model's (None: every model's under the number together)
        self.models = models
        self._record_script = None  # registered at the first feedback (no Redis I/O until then)
        self._name_script = None  # registered when a tally without an identity is first seen
        self.versions: dict[int, VersionStats] = {}
        self.forget_after = forget_after
        self._routed: set[int] | None = None  # the versions routed to at the last ``keep`` (None: not called yet)
        self._left: dict[int, float] = {}  # version -> when ``keep`` first found it held but not routed to
        self.instance = {"id": uuid.uuid4().hex, "started": time.time()}  # the process these counts belong to

    def _counted(self, version: int) -> VersionStats:
        """The figures of the model under ``version`` now: begun anew when the number names another model than the
        one they counted."""
        facts = self.models.known(version) if self.models is not None else None
        s = self.versions.get(version)
        if s is None or (facts is not None and s.identity not in (None, facts.identity)):
            s = self.versions[version] = VersionStats()
        if facts is not None:
            s.identity = facts.identity
        return s

    def keep(self, routed: set[int], now: float | None = None) -> list[int]:
        """Drops the figures and metric series of every version not in ``routed`` (the versions requests go to) for
        ``forget_after`` seconds, as seen by the calls to this (the version watcher's, every second); returns the
        versions dropped."""
        now = time.monotonic() if now is None else now
        self._routed = set(routed)
        held = set(self.versions) | {int(v) for v in metrics.version_values() if v.isdigit()}
        self._left = {version: self._left.get(version, now) for version in held - routed}
        dropped = sorted(version for version, since in self._left.items() if now - since >= self.forget_after)
        for version in dropped:
            self.versions.pop(version, None)
            metrics.forget_version(str(version))
            del self._left[version]
        return dropped

    def _kept(self, version: int) -> bool:
        """Whether the figures of ``version`` are shown: it is routed to, or it left less than ``forget_after`` ago
        (every version until ``keep`` is first called)."""
        return self._routed is None or version in self._routed or version in self._left

    def _last_known(self, version: int) -> Facts | None:
        """The model ``self.models`` last knew under ``version`` (None: none, or no ``self.models``)."""
        return self.models.last_known(version) if self.models is not None else None

    def _shown(self, version: int) -> VersionStats:
        """The figures ``summary`` shows for ``version``: none yet when the model last known under its number is
        not the one they counted."""
        facts = self._last_known(version)
        s = self.versions.get(version, VersionStats())
        return VersionStats() if facts is not None and s.identity not in (None, facts.identity) else s

    def record(self, version: int, seconds: float, cached: bool) -> None:
        s = self._counted(version)
        s.requests += 1
        s.cache_hits += cached
        s.latencies.append(seconds)
        if not cached:
            s.miss_latencies.append(seconds)

    def record_error(self, version: int | None) -> None:
        if version is not None:
            s = self._counted(version)
            s.requests += 1
            s.errors += 1

    def record_shadow(self, version: int, agreed: bool, seconds: float) -> None:
        s = self._counted(version)
        s.shadow_requests += 1
        s.shadow_agreements += agreed
        s.shadow_latencies.append(seconds)
        metrics.SHADOW.labels(agreement="agree" if agreed else "disagree").inc()
        metrics.SHADOW_SECONDS.observe(seconds)

    def feedback_token(self, request_id: str, version: int, identity: str | None, predicted: str) -> str:
        """The token of an answer of ``version``, the model of ``identity`` (None: not known)."""
        return self.tokens.issue(request_id, version, predicted, identity=identity)

    async def record_feedback(self, claim: FeedbackClaim, true_label: str) -> dict | None:
        """Records ground truth once per answer; returns what was recorded (also when this same feedback was
        recorded before), None if the answer already got feedback with another true label."""
        correct = claim.predicted == true_label
        if self._record_script is None:
            self._record_script = self.redis.register_script(RECORD_FEEDBACK_LUA)
        recorded = await self._record_script(
            keys=[keys.feedback_seen(self.model_name), keys.feedback_tally(self.model_name),
                  keys.feedback_labels(self.model_name)],
            args=[self.tokens.clock(), claim.expires_at, claim.request_id, tally_prefix(claim.version, claim.identity),
                  int(correct), true_label])
        if not recorded:
            return None
        return {"request_id": claim.request_id, "version": claim.version, "predicted": claim.predicted,
                "true_label": true_label, "correct": correct}

    async def feedback_tallies(self) -> dict[int, dict[str | None, tuple[int, int]]]:
        """{version: {identity (UNNAMED: none): (correct, total)}} from the one tally hash of the model."""
        counts: dict[int, dict[str | None, list[int]]] = {}
        for field_name, value in (await self.redis.hgetall(keys.feedback_tally(self.model_name))).items():
            field_name = field_name.decode() if isinstance(field_name, bytes) else field_name
            version, *identity, kind = field_name.split(":")
            if version.isdigit() and kind in ("correct", "total") and len(identity) <= 1:
                tally = counts.setdefault(int(version), {}).setdefault(identity[0] if identity else UNNAMED, [0, 0])
                tally[kind == "total"] = int(value)
        return {version: {identity: (correct, total) for identity, (correct, total) in by_identity.items()}
                for version, by_identity in counts.items()}

    async def feedback_counts(self) -> dict[int, tuple[int, int]]:
        """{version: (correct, total)}: for each version, the tally of the model ``self.models`` knows under its
        number, with its unnamed tally (named after the model serving under that number, in Redis, the first time
        it is seen); every model's together for a version it does not know, or with no ``self.models``."""
        counts = {}
        for version, by_identity in (await self.feedback_tallies()).items():
            facts = self._last_known(version)
            if facts is None:
                counts[version] = _added(by_identity.values())
                continue
            if UNNAMED in by_identity and self.models.known(version) is not None:
                await self._name_unnamed(version, facts.identity)
            counts[version] = _added([by_identity.get(facts.identity, (0, 0)), by_identity.get(UNNAMED, (0, 0))])
        return counts

    async def _name_unnamed(self, version: int, identity: str) -> None:
        if self._name_script is None:
            self._name_script = self.redis.register_script(NAME_UNNAMED_TALLY_LUA)
        await self._name_script(keys=[keys.feedback_tally(self.model_name)],
                                args=[tally_prefix(version, UNNAMED), tally_prefix(version, identity)])

    async def summary(self) -> dict:
        """The figures of each version routed to or gone less than ``forget_after`` ago, its feedback that of the model
        known under its number (``feedback_counts``), and the z-test between the two of them with the most feedback.
        The feedback of older versions stays in Redis, and out of the summary."""
        feedback = {version: counts for version, counts in (await self.feedback_counts()).items()
                    if self._kept(version)}
        versions = {}
        for version in sorted(set(self.versions) | set(feedback)):
            s = self._shown(version)
            lat, miss_lat = np.asarray(s.latencies) * 1000, np.asarray(s.miss_latencies) * 1000
            shadow_lat = np.asarray(s.shadow_latencies) * 1000
            correct, total = feedback.get(version, (0, 0))
            accuracy = correct / total if total else None
            if accuracy is not None:
                metrics.FEEDBACK_ACCURACY.labels(model_version=str(version)).set(accuracy)
            facts = self._last_known(version)
            versions[str(version)] = {
                "identity": facts.identity if facts is not None else None,  # the model these figures are of
                "requests": s.requests,
                "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                "p95_ms": float(np.percentile(lat, 95)) if lat.size else None,
                "error_rate": s.errors / s.requests if s.requests else 0.0,
                "cache_hit_rate": s.cache_hits / s.requests if s.requests else 0.0,
                "misses": s.requests - s.cache_hits - s.errors,  # answers computed: neither cached nor failed
                "miss_p95_ms": float(np.percentile(miss_lat, 95)) if miss_lat.size else None,
                "shadow_requests": s.shadow_requests,
                "shadow_agreement": s.shadow_agreements / s.shadow_requests if s.shadow_requests else None,
                "shadow_p50_ms": float(np.percentile(shadow_lat, 50)) if shadow_lat.size else None,
                "feedback": {"correct": correct, "total": total}, "feedback_accuracy": accuracy,
            }
        ranked = sorted(feedback.items(), key=lambda kv: -kv[1][1])[:2]
        significance = None
        if len(ranked) == 2:
            (va, (ca, ta)), (vb, (cb, tb)) = ranked
            test = two_proportion_z_test(ca, ta, cb, tb)
            if test:
                significance = {"versions": [va, vb], **test}
        return {"versions": versions, "significance": significance, "instance": self.instance}
