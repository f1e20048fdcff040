"""A/B routing: weighted rendezvous (highest-random-weight) hashing over version or label arms, sticky per client.

score(arm) = -weight / ln(u(client, arm)), u uniform in (0,1); best score wins. Unavailable version arms are dropped
before scoring, spreading their share proportionally.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

_LABEL = re.compile(r"^[A-Za-z0-9_]+$")


class RoutingError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Arm:
    target: str
    weight: float

    @property
    def version(self) -> int | None:
        return int(self.target) if self.target.isdigit() else None


@dataclass(frozen=True)
class RoutingTable:
    arms: tuple[Arm, ...] = ()
    shadow: str | None = None


def _weight(value) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise RoutingError("bad_routing", f"weight {value!r} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise RoutingError("bad_routing", f"weight {value!r} must be a finite number >= 0")
    return weight


def validate(table: RoutingTable, available_versions: set[int] | None = None) -> RoutingTable:
    targets = [a.target for a in table.arms]
    for target in targets + ([table.shadow] if table.shadow else []):
        if not _LABEL.match(target):
            raise RoutingError("bad_routing", f"target {target!r} is neither a version nor a label")
    if len(set(targets)) != len(targets):
        raise RoutingError("bad_routing", f"duplicate targets in {targets}")
    if table.arms and sum(a.weight for a in table.arms) <= 0:
        raise RoutingError("bad_routing", "at least one weight must be > 0")
    if available_versions is not None:
        for arm in table.arms:
            if arm.version is not None and arm.weight > 0 and arm.version not in available_versions:
                raise RoutingError("version_unavailable", f"version {arm.version} is not AVAILABLE")
    return table


def parse_assignments(items: list[str], shadow: str | None = None) -> RoutingTable:
    arms = []
    for item in items:
        target, sep, weight = item.partition("=")
        if not sep:
            raise RoutingError("bad_routing", f"{item!r}: expected TARGET=WEIGHT")
        arms.append(Arm(target.strip(), _weight(weight)))
    return validate(RoutingTable(tuple(arms), shadow))


def _unit_hash(client_id: str, target: str) -> float:
    digest = hashlib.blake2b(f"{client_id}\x00{target}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2**64


def choose(table: RoutingTable, client_id: str, available_versions: set[int] | None = None) -> Arm | None:
    arms = [a for a in table.arms if a.weight > 0 and (
        available_versions is None or a.version is None or a.version in available_versions)]
    if not arms:
        return None
    return max(arms, key=lambda a: -a.weight / math.log(_unit_hash(client_id, a.target)))
