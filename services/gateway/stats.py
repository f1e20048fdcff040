"""Per-version A/B figures: requests, latency, errors and cache hits from this process; feedback from Redis (shared
by every replica); a two-proportion z-test between the two versions with the most feedback.

The per-process counts start from zero with the process, so the summary names the process they belong to
(``instance``: an id drawn at start and the start time): a reader that keeps baselines (the rollout controller) tells a
restarted replica from one that goes on counting.

Answers cost Redis nothing: each carries a signed feedback token (feedback.py); Redis is written only when feedback
arrives (the tally hash, and the request id in the ``feedback_seen`` set with its true label in ``feedback_labels``
until its token expires, so it counts once and the same feedback sent again is answered as recorded).
"""
from __future__ import annotations

import math
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from services.gateway import keys, metrics
from services.gateway.feedback import FeedbackClaim, FeedbackTokens

# KEYS: feedback_seen, feedback_tally, feedback_labels; ARGV: now, token expiry, request id, version, 1 if correct
# else 0, true label. Returns 1 when recorded, 2 when the request id's feedback was recorded with this true label
# before (the same feedback again), 0 when it was recorded with another. One script: the check and the counts are
# atomic.
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


@dataclass
class VersionStats:
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


class Stats:
    def __init__(self, redis, model_name: str, tokens: FeedbackTokens | None = None):
        self.redis = redis
        self.model_name = model_name
        self.tokens = tokens or FeedbackTokens.with_random_secret(model_name)
        self._record_script = None  # registered at the first feedback (no Redis I/O until then)
        self.versions: dict[int, VersionStats] = defaultdict(VersionStats)
        self.instance = {"id": uuid.uuid4().hex, "started": time.time()}  # the process these counts belong to

    def record(self, version: int, seconds: float, cached: bool) -> None:
        s = self.versions[version]
        s.requests += 1
        s.cache_hits += cached
        s.latencies.append(seconds)
        if not cached:
            s.miss_latencies.append(seconds)

    def record_error(self, version: int | None) -> None:
        if version is not None:
            self.versions[version].requests += 1
            self.versions[version].errors += 1

    def record_shadow(self, version: int, agreed: bool, seconds: float) -> None:
        s = self.versions[version]
        s.shadow_requests += 1
        s.shadow_agreements += agreed
        s.shadow_latencies.append(seconds)
        metrics.SHADOW.labels(agreement="agree" if agreed else "disagree").inc()
        metrics.SHADOW_SECONDS.observe(seconds)

    def feedback_token(self, request_id: str, version: int, predicted: str) -> str:
        return self.tokens.issue(request_id, version, predicted)

    async def record_feedback(self, claim: FeedbackClaim, true_label: str) -> dict | None:
        """Records ground truth once per answer; returns what was recorded (also when this same feedback was
        recorded before), None if the answer already got feedback with another true label."""
        correct = claim.predicted == true_label
        if self._record_script is None:
            self._record_script = self.redis.register_script(RECORD_FEEDBACK_LUA)
        recorded = await self._record_script(
            keys=[keys.feedback_seen(self.model_name), keys.feedback_tally(self.model_name),
                  keys.feedback_labels(self.model_name)],
            args=[self.tokens.clock(), claim.expires_at, claim.request_id, claim.version, int(correct), true_label])
        if not recorded:
            return None
        return {"request_id": claim.request_id, "version": claim.version, "predicted": claim.predicted,
                "true_label": true_label, "correct": correct}

    async def feedback_counts(self) -> dict[int, tuple[int, int]]:
        """{version: (correct, total)} from the one tally hash of the model."""
        counts: dict[int, list[int]] = {}
        for field_name, value in (await self.redis.hgetall(keys.feedback_tally(self.model_name))).items():
            field_name = field_name.decode() if isinstance(field_name, bytes) else field_name
            version, _, kind = field_name.partition(":")
            if version.isdigit() and kind in ("correct", "total"):
                counts.setdefault(int(version), [0, 0])[kind == "total"] = int(value)
        return {version: (correct, total) for version, (correct, total) in counts.items()}

    async def summary(self) -> dict:
        feedback = await self.feedback_counts()
        versions = {}
        for version in sorted(set(self.versions) | set(feedback)):
            s = self.versions.get(version, VersionStats())
            lat, miss_lat = np.asarray(s.latencies) * 1000, np.asarray(s.miss_latencies) * 1000
            shadow_lat = np.asarray(s.shadow_latencies) * 1000
            correct, total = feedback.get(version, (0, 0))
            accuracy = correct / total if total else None
            if accuracy is not None:
                metrics.FEEDBACK_ACCURACY.labels(model_version=str(version)).set(accuracy)
            versions[str(version)] = {
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
