"""Per-version A/B figures: requests, latency, errors and cache hits from this process; feedback from Redis (shared
by every replica); a two-proportion z-test between the two versions with the most feedback."""
from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from services.gateway import keys, metrics

REQUEST_TTL_SECONDS = 7 * 24 * 3600


@dataclass
class VersionStats:
    requests: int = 0
    errors: int = 0
    cache_hits: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=2000))
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
    def __init__(self, redis, model_name: str):
        self.redis = redis
        self.model_name = model_name
        self.versions: dict[int, VersionStats] = defaultdict(VersionStats)

    def record(self, version: int, seconds: float, cached: bool) -> None:
        s = self.versions[version]
        s.requests += 1
        s.cache_hits += cached
        s.latencies.append(seconds)

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

    async def remember_request(self, request_id: str, version: int, predicted: str) -> None:
        await self.redis.set(keys.request(request_id), json.dumps({"version": version, "predicted": predicted}),
                             ex=REQUEST_TTL_SECONDS)

    async def feedback(self, request_id: str, true_label: str) -> dict | None:
        """Records ground truth once per request; returns what was recorded, None for an unknown request id."""
        raw = await self.redis.getdel(keys.request(request_id))
        if raw is None:
            return None
        answer = json.loads(raw)
        correct = answer["predicted"] == true_label
        tally = keys.feedback_tally(self.model_name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(tally, f"{answer['version']}:total", 1)
            pipe.hincrby(tally, f"{answer['version']}:correct", int(correct))
            await pipe.execute()
        return {"version": answer["version"], "predicted": answer["predicted"], "true_label": true_label,
                "correct": correct}

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
            lat = np.asarray(s.latencies) * 1000
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
        return {"versions": versions, "significance": significance}
