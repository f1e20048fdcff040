"""A/B routing: a weights table per model in Redis that every gateway replica follows, sticky per client id.

Redis keys (plain JSON): ``mushroom:routing:<model>`` = {"weights": {"<version>": weight, ...}, "shadow": version or
null}; ``mushroom:audit:<model>`` = list of {"who", "when", "old", "new"} (newest first).
Weighted rendezvous hashing picks a version per client: when a weight changes, only the clients that must move do.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from services.gateway import metrics

log = logging.getLogger("gateway.routing")


class RoutingError(ValueError):
    pass


@dataclass
class RoutingTable:
    weights: dict[int, float] = field(default_factory=dict)
    shadow: int | None = None

    def to_json(self) -> dict:
        return {"weights": {str(v): w for v, w in sorted(self.weights.items())}, "shadow": self.shadow}

    @classmethod
    def from_json(cls, data: dict) -> "RoutingTable":
        if not isinstance(data, dict) or not isinstance(data.get("weights", {}), dict):
            raise RoutingError('routing must be {"weights": {"<version>": <weight>, ...}, "shadow": <version>|null}')
        weights = {}
        for key, weight in data.get("weights", {}).items():
            try:
                version, weight = int(key), float(weight)
            except (TypeError, ValueError):
                raise RoutingError(f"bad entry {key!r}: {weight!r}: versions are integers, weights numbers") from None
            if weight < 0 or not math.isfinite(weight):
                raise RoutingError(f"weight of version {version} must be a finite number >= 0")
            if weight > 0:
                weights[version] = weight
        shadow = data.get("shadow")
        if shadow is not None:
            try:
                shadow = int(shadow)
            except (TypeError, ValueError):
                raise RoutingError(f"shadow must be a version number, not {shadow!r}") from None
        return cls(weights, shadow)


def parse_assignments(items: list[str]) -> RoutingTable:
    """CLI form: ``3=90 4=10 shadow=5``."""
    weights, shadow = {}, None
    for item in items:
        key, _, value = item.partition("=")
        if not value:
            raise RoutingError(f"expected VERSION=WEIGHT or shadow=VERSION, got {item!r}")
        if key == "shadow":
            shadow = value
        else:
            weights[key] = value
    return RoutingTable.from_json({"weights": weights, "shadow": shadow})


def _unit_hash(client: str, version: int) -> float:
    digest = hashlib.blake2b(f"{client}\x00{version}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


def pick_version(weights: dict[int, float], client: str) -> int:
    """Weighted rendezvous (HRW) hashing: the version with the highest -w / ln(u) wins."""
    return max(weights, key=lambda v: -weights[v] / math.log(_unit_hash(client, v)))


class Router:
    def __init__(self, redis, model_name: str):
        self.redis = redis
        self.model_name = model_name
        self.table = RoutingTable()
        self.available: set[int] = set()

    @property
    def key(self) -> str:
        return f"mushroom:routing:{self.model_name}"

    @property
    def audit_key(self) -> str:
        return f"mushroom:audit:{self.model_name}"

    async def refresh(self) -> None:
        """Re-read the table from Redis (about twice a second); the caller keeps the last table when Redis is down."""
        raw = await self.redis.get(self.key)
        self.table = RoutingTable.from_json(json.loads(raw)) if raw else RoutingTable()

    def effective_weights(self) -> dict[int, float]:
        """Weights over AVAILABLE versions only; a routed version that disappeared has its share spread out."""
        live = {v: w for v, w in self.table.weights.items() if v in self.available}
        metrics.ROUTED_VERSION_MISSING.set(1 if len(live) < len(self.table.weights) else 0)
        return live

    def choose(self, client: str | None) -> tuple[int | None, str]:
        """(version, reason); version None means "latest" (no table and nothing available known)."""
        live = self.effective_weights()
        if live:
            version = pick_version(live, client or uuid.uuid4().hex)
            return version, "ab" if len(live) > 1 else "single"
        if self.available:
            return max(self.available), "latest"
        return None, "latest"

    async def set_table(self, table: RoutingTable, who: str) -> dict:
        unknown = [v for v in list(table.weights) + ([table.shadow] if table.shadow else []) if v not in self.available]
        if unknown:
            raise RoutingError(f"versions {unknown} are not AVAILABLE on the model server "
                               f"(available: {sorted(self.available)})")
        old_raw = await self.redis.get(self.key)
        old = json.loads(old_raw) if old_raw else RoutingTable().to_json()
        new = table.to_json()
        entry = {"who": who, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "old": old, "new": new}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key, json.dumps(new))
            pipe.lpush(self.audit_key, json.dumps(entry))
            pipe.ltrim(self.audit_key, 0, 999)
            await pipe.execute()
        self.table = table
        log.info("routing changed by %s: %s -> %s", who, old, new)
        return entry

    async def audit(self, limit: int = 100) -> list[dict]:
        return [json.loads(e) for e in await self.redis.lrange(self.audit_key, 0, limit - 1)]
