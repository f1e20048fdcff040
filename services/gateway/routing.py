"""A/B routing: a weights table per model in Redis that every gateway replica follows, sticky per client id.

An entry of the table is a version number (``3``) or a version label (``"canary"``) that the model server resolves (see
labels.py). Redis keys (keys.routing, keys.routing_generation, keys.routing_writer, keys.audit): the table as JSON
{"weights": {"<version or label>": weight, ...}, "shadow": version, label or null}; its generation, incremented by every
change; who wrote it ({"who", "lease", "candidate"}); the audit as a list of {"who", "when", "old", "new"} (newest
first; "rollout" too when an operator's change replaced a running rollout's table), entries as given, and of the rollout
commands operators send through the gateway ({"who", "when", "action", "status", "answer"}, rollout_proxy.py). A change
reads the table it replaces, stores the new one, bumps the generation and appends the audit entry in one Lua script, so
that two changes at once (two operators, two replicas) each audit the table they really replaced, and a change made
against a generation that is no longer the stored one is refused (RoutingChanged). A change the rollout controller sends
under its lease carries the lease token, checked in the same script against the lease key (keys.rollout_lease): a
controller that no longer holds the lease changes nothing (LeaseNotHeld). A change without a token is an operator's:
always applied; when it replaces a table the lease holder wrote for a running rollout it is an **override**, said in its
audit entry ({"rollout": {"controller", "candidate"}}), and the controller pauses that rollout at its next tick
(services/rollout/controller.py).

Weighted rendezvous hashing on the entry name picks an entry per client: when a weight changes only the clients that
must move do, and moving a label to another version moves no client between entries.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field

from services.gateway import keys, metrics

log = logging.getLogger("gateway.routing")
Entry = int | str  # a version number or a version label
LABEL_RE = re.compile(r"[a-zA-Z0-9_]+")  # TF Serving's version label rule
MAX_VERSION = 2**63 - 1  # TF Serving's versions are int64
MAX_WEIGHT = 1_000_000  # weights are relative; bounded so that pick_entry's -w / ln(u) stays far from overflow
AUDIT_ENTRIES = 1000  # the audit keeps the newest entries
UPDATE_SHAPE = ('a routing update is {"weights": {"<version or label>": <weight>, ...}, "shadow": <version or '
                'label>|null} with at least one weight above 0; to clear the table send {"clear": true}')


# KEYS: routing, routing_generation, audit, rollout lease, routing_writer; ARGV: the new table (JSON), the audit entry
# (a JSON object without "old": the stored table, as a JSON string when what is stored is not JSON), the empty table
# (JSON, "old" when none is stored), the expected generation or '' for
# any, the audit's last index, the lease token the change is sent under or '' for none, the writer (JSON), the highest
# generation the writing replica has seen (the new one is above it, and above the stored one). Once stored:
# {1, new generation, the audit entry (JSON) with "old", and "rollout" when a change without a token replaces the
# table the lease holder wrote for a rollout}. Nothing written: {0, stored generation} when ARGV[4] names another
# generation, {-1, lease holder or ''} when ARGV[6] is not the token the lease key holds.
SET_TABLE_LUA = """
local holder = redis.call('GET', KEYS[4])
if ARGV[6] ~= '' and holder ~= ARGV[6] then return {-1, holder or ''} end
local generation = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= generation then return {0, generation} end
local old = redis.call('GET', KEYS[1]) or ARGV[3]
if not pcall(cjson.decode, old) then old = cjson.encode(old) end
local entry = string.sub(ARGV[2], 1, -2) .. ', "old": ' .. old
local previous = redis.call('GET', KEYS[5])
if ARGV[6] == '' and holder and previous then
  local readable, writer = pcall(cjson.decode, previous)
  if readable and type(writer) == 'table' and writer.lease == holder and type(writer.candidate) == 'number' then
    entry = entry .. ', "rollout": ' .. cjson.encode({controller = holder, candidate = writer.candidate})
  end
end
entry = entry .. '}'
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[5], ARGV[7])
if generation < tonumber(ARGV[8]) then redis.call('SET', KEYS[2], ARGV[8]) end
generation = redis.call('INCR', KEYS[2])
redis.call('LPUSH', KEYS[3], entry)
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]))
return {1, generation, entry}
"""

# KEYS: routing, routing_generation, routing_writer, audit; ARGV: the table (JSON), its generation, its writer (JSON,
# or '' when unknown), the audit entry (JSON), the audit's last index. Writes the table back with its generation when
# the stored generation is lower (1); 0 when it is not: another replica restored it first, or a change came since.
RESTORE_TABLE_LUA = """
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then redis.call('SET', KEYS[3], ARGV[3]) else redis.call('DEL', KEYS[3]) end
redis.call('LPUSH', KEYS[4], ARGV[4])
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[5]))
return 1
"""


class RoutingError(ValueError):
    pass


class VersionUnusable(RoutingError):
    """A table naming a version the model server serves but the gateway cannot use (version_facts.py)."""


class LeaseNotHeld(RuntimeError):
    """A change sent under a rollout lease token that the lease key does not hold (any more)."""

    def __init__(self, token: str, holder: str):
        super().__init__(f"the rollout lease is held by {holder or 'nobody'}, not {token}: a controller that lost its "
                         "lease changes no routing")
        self.token, self.holder = token, holder


class RoutingChanged(RuntimeError):
    """A change made against a generation of the table that is no longer the stored one."""

    def __init__(self, expected: int, stored: int):
        super().__init__(f"the routing table is at generation {stored}, not {expected}: it changed since it was read; "
                         "read it again (GET /v1/admin/routing) before changing it")
        self.expected, self.stored = expected, stored


class UnknownLabel(LookupError):
    def __init__(self, label: str, reason: str):
        super().__init__(f"version label {label!r} is unknown to the model server ({reason})")
        self.label = label


def is_label(text: str) -> bool:
    """TF Serving's rule, [a-zA-Z0-9_]+ (letters, digits and '_'; no '-'); an all-digit name is a version number."""
    return bool(LABEL_RE.fullmatch(text)) and not text.isdigit()


def _version(value: int, what: str) -> int:
    if not 0 <= value <= MAX_VERSION:
        raise RoutingError(f"{what} {str(value)[:24]}{'...' if len(str(value)) > 24 else ''} is not a version "
                           f"number between 0 and {MAX_VERSION} (TF Serving's int64)")
    return value


def parse_entry(value, what: str = "entry") -> Entry:
    """A version number (int or all-digit ASCII string, 0..2^63-1) or a version label (TF Serving's rule)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return _version(value, what)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value) > len(str(MAX_VERSION)):  # never hand int() thousands of digits
            raise RoutingError(f"{what} {value[:24]}... is not a version number between 0 and {MAX_VERSION} "
                               "(TF Serving's int64)")
        return _version(int(value), what)
    if isinstance(value, str) and is_label(value):
        return value
    raise RoutingError(f"{what} {value!r} is neither a version number nor a version label (labels follow TF "
                       f"Serving's rule [a-zA-Z0-9_]+: letters, digits and '_' only, not all digits)")


def _entry_order(entry: Entry) -> tuple:
    return (1, 0, entry) if isinstance(entry, str) else (0, entry, "")


@dataclass
class RoutingTable:
    weights: dict[Entry, float] = field(default_factory=dict)
    shadow: Entry | None = None

    def entries(self) -> list[Entry]:
        return sorted(self.weights, key=_entry_order)

    def referenced(self) -> list[Entry]:
        """The weighted entries, then the shadow (if any)."""
        return [*self.entries(), *([self.shadow] if self.shadow is not None else [])]

    def labels(self) -> set[str]:
        return {e for e in self.referenced() if isinstance(e, str)}

    def to_json(self) -> dict:
        return {"weights": {str(e): self.weights[e] for e in self.entries()}, "shadow": self.shadow}

    @classmethod
    def from_json(cls, data: dict) -> "RoutingTable":
        if not isinstance(data, dict) or not isinstance(data.get("weights", {}), dict):
            raise RoutingError('routing must be {"weights": {"<version or label>": <weight>, ...}, '
                               '"shadow": <version or label>|null}')
        weights = {}
        for key, weight in data.get("weights", {}).items():
            entry = parse_entry(key)
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise RoutingError(f"bad entry {key!r}: {weight!r}: weights are numbers") from None
            if weight < 0 or not math.isfinite(weight):
                raise RoutingError(f"weight of {key} must be a finite number >= 0")
            if weight > 0:
                weights[entry] = weight
        shadow = data.get("shadow")
        if shadow is not None:
            shadow = parse_entry(shadow, "shadow")
        return cls(weights, shadow)

    @classmethod
    def from_request(cls, data) -> "RoutingTable":
        """The table an operator sends (PUT /v1/admin/routing, the admin CLI), held to stricter rules than a stored
        table (from_json): no unknown fields; weights are JSON numbers (not strings or booleans) between 0 and
        MAX_WEIGHT, 0 leaving the entry out, at least one above 0; an entry given twice ("1" and "01") is refused.
        Emptying the table is said explicitly: exactly {"clear": true} gives the empty table (route to the latest
        version)."""
        if not isinstance(data, dict):
            raise RoutingError(UPDATE_SHAPE)
        unknown = sorted(set(data) - {"weights", "shadow", "clear"})
        if unknown:
            raise RoutingError(f"unknown fields {unknown}: {UPDATE_SHAPE}")
        if "clear" in data:
            if data["clear"] is not True or len(data) != 1:
                raise RoutingError('to clear the table send exactly {"clear": true}, with no other field')
            return cls()
        if not isinstance(data.get("weights"), dict):
            raise RoutingError(UPDATE_SHAPE)
        weights, seen = {}, set()
        for key, weight in data["weights"].items():
            entry = parse_entry(key)
            if entry in seen:
                raise RoutingError(f"entry {entry} is given twice (as {key!r} and another spelling)")
            seen.add(entry)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise RoutingError(f"weight of {key}: {json.dumps(weight)[:40]} is not a JSON number (weights are "
                                   "numbers, not strings or booleans)")
            if isinstance(weight, float) and not math.isfinite(weight):
                raise RoutingError(f"weight of {key} must be a finite number")
            if not 0 <= weight <= MAX_WEIGHT:
                raise RoutingError(f"weight of {key} must be between 0 and {MAX_WEIGHT}, got {_number(weight)}")
            if weight > 0:
                weights[entry] = float(weight)
        if not weights:
            raise RoutingError(f"no entry has a weight above 0: {UPDATE_SHAPE}")
        shadow = data.get("shadow")
        return cls(weights, parse_entry(shadow, "shadow") if shadow is not None else None)


def _number(value: int | float) -> str:
    """A number as an error message shows it: 6 significant digits, or for an integer past a float's range (a JSON
    integer of hundreds of digits) its size."""
    try:
        return f"{value:.6g}"
    except OverflowError:
        sign = "a negative" if value < 0 else "an"
        return f"{sign} integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"


def parse_assignments(items: list[str]) -> RoutingTable:
    """CLI form: ``3=90 4=10 shadow=5`` or ``stable=90 canary=10 shadow=canary``."""
    weights, shadow = {}, None
    for item in items:
        key, _, value = item.partition("=")
        if not value:
            raise RoutingError(f"expected VERSION=WEIGHT, LABEL=WEIGHT or shadow=VERSION|LABEL, got {item!r}")
        if key == "shadow":
            shadow = value
        else:
            try:
                weights[key] = float(value)
            except ValueError:
                raise RoutingError(f"weight of {key}: {value!r} is not a number") from None
    return RoutingTable.from_request({"weights": weights, "shadow": shadow})


def _unit_hash(client: str, entry: Entry) -> float:
    digest = hashlib.blake2b(f"{client}\x00{entry}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


def pick_entry(weights: dict[Entry, float], client: str) -> Entry:
    """Weighted rendezvous (HRW) hashing on the entry name: the entry with the highest -w / ln(u) wins."""
    return max(weights, key=lambda e: -weights[e] / math.log(_unit_hash(client, e)))



class Router:
    def __init__(self, redis, model_name: str, labels=None):
        self.redis = redis
        self.model_name = model_name
        self.labels = labels  # a labels.LabelResolver (kept out of this module: it needs the TF Serving stubs)
        self.table = RoutingTable()
        self.available: set[int] = set()  # the versions requests may be routed to: AVAILABLE and usable
        self.unusable: dict[int, str] = {}  # AVAILABLE versions the gateway cannot use, and why (version_facts.py)
        self.seen_stored_table = False  # a table was read from (or written to) Redis at least once
        self.table_lost = False
        self.table_generation = 0  # bumped by every set_table: a Redis read begun before it is older than the table
        self.stored_generation = 0  # the generation (keys.routing_generation) of ``table`` as last read or written
        self.stored_writer: dict | None = None  # who wrote ``table`` (keys.routing_writer), None when unknown
        self._set_table_script = None  # registered at the first change
        self._restore_script = None  # registered at the first loss

    def _stored_table_seen(self) -> None:
        self.seen_stored_table = True
        if self.table_lost:
            log.info("a routing table is stored again: %s", self.table.to_json())
            self.table_lost = False
            metrics.ROUTING_TABLE_LOST.set(0)

    @property
    def key(self) -> str:
        return keys.routing(self.model_name)

    @property
    def generation_key(self) -> str:
        return keys.routing_generation(self.model_name)

    @property
    def writer_key(self) -> str:
        return keys.routing_writer(self.model_name)

    @property
    def audit_key(self) -> str:
        return keys.audit(self.model_name)

    def set_available(self, available: set[int], unusable: dict[int, str]) -> None:
        """The model server's AVAILABLE versions, and those of them the gateway cannot use, routed around as if
        they were not AVAILABLE."""
        self.unusable = {v: why for v, why in unusable.items() if v in available}
        self.available = set(available) - set(self.unusable)
        metrics.VERSIONS_UNUSABLE.set(len(self.unusable))

    async def refresh(self) -> None:
        """Re-read the table from Redis (about twice a second); the caller keeps the last table when Redis is down.
        Labels new to this replica are resolved at once rather than at the next label refresh. A read that was in
        flight while ``set_table`` stored a table is dropped: it may hold the table from before the change.

        Generations only grow, so a table that vanishes after this replica has seen one stored (a Redis restarted
        without its data, a flush), or comes back at a lower generation than this replica has seen (a Redis restarted
        from older data: an append-only file that had not synced its last second, a replica promoted before it
        caught up), is a loss, not a change: the last known table stays and is written back (``_restore``).
        Clearing the table is a stored empty table, never a missing key."""
        generation = self.table_generation
        raw, stored_generation, writer = await self.redis.mget(self.key, self.generation_key, self.writer_key)
        if generation != self.table_generation:
            return
        stored_generation = int(stored_generation or 0)
        if self.seen_stored_table and (raw is None or stored_generation < self.stored_generation):
            if raw is None:
                await self._restore("gone from Redis", RoutingTable().to_json())
            else:
                older = _audit_entry_read(raw)  # a table is a JSON object; anything else is kept as its text
                await self._restore(f"back at generation {stored_generation} in Redis, from {self.stored_generation}",
                                    older.get("unreadable", older))
            return
        try:
            stored = json.loads(raw) if raw else None
            writer = json.loads(writer) if writer else None
        except ValueError as exc:
            raise RoutingError(f"what {self.key} or {self.writer_key} holds is not JSON ({exc}): keeping the last "
                               "known table; store a table to replace it") from None
        self.table = RoutingTable.from_json(stored) if raw else RoutingTable()
        self.stored_generation = stored_generation
        self.stored_writer = writer
        if raw is not None:
            self._stored_table_seen()
        if self.labels is not None and self.table.labels() - self.labels.asked:
            await self.refresh_labels()

    async def _restore(self, what: str, old) -> None:
        """Redis lost the table this replica follows (``what`` says how; ``old`` is what it holds instead, as an
        audit entry's "old" is): flagged by the mushroom_gateway_routing_table_lost metrics, then written back with
        its generation and writer and an audit entry, unless another replica restored it first or a change came
        since (RESTORE_TABLE_LUA; the next refresh reads theirs). Should Redis refuse the write, the last known table
        is still followed, flagged until a table is stored."""
        if not self.table_lost:
            self.table_lost = True
            metrics.ROUTING_TABLE_LOSSES.inc()
            metrics.ROUTING_TABLE_LOST.set(1)
            log.error("the routing table %s is %s (restarted without its latest data?): following the last known "
                      "table %s and writing it back", self.key, what, self.table.to_json())
        if self._restore_script is None:
            self._restore_script = self.redis.register_script(RESTORE_TABLE_LUA)
        table = self.table.to_json()
        entry = _audit_entry("gateway", None, restored=f"the table was {what}", old=old, new=table)
        restored = await self._restore_script(
            keys=[self.key, self.generation_key, self.writer_key, self.audit_key],
            args=[json.dumps(table), self.stored_generation, json.dumps(self.stored_writer) if self.stored_writer
                  else "", json.dumps(entry), AUDIT_ENTRIES - 1])
        if restored:
            log.info("routing table %s written back at generation %d", self.key, self.stored_generation)
            self._stored_table_seen()

    async def refresh_labels(self) -> None:
        """Ask the model server where each label of the table points now (about once a second)."""
        if self.labels is not None:
            await self.labels.refresh(self.table.labels())
            self.labels.retain(self.table.labels())

    def version_of(self, entry: Entry | None) -> int | None:
        """The version an entry routes to now; None for a label the model server does not (or no longer) know."""
        if entry is None or isinstance(entry, int):
            return entry
        return self.labels.versions.get(entry) if self.labels is not None else None

    def live_entries(self) -> dict[Entry, float]:
        """Entries whose version is AVAILABLE; a vanished version or label has its share spread over the rest."""
        live = {e: w for e, w in self.table.weights.items() if self.version_of(e) in self.available}
        metrics.ROUTED_VERSION_MISSING.set(1 if len(live) < len(self.table.weights) else 0)
        return live

    def _per_version(self, weights: dict[Entry, float]) -> dict[int, float]:
        """Weights summed per resolved version (two entries on one version add up; unresolved labels left out)."""
        totals: dict[int, float] = {}
        for entry, weight in weights.items():
            version = self.version_of(entry)
            if version is not None:
                totals[version] = totals.get(version, 0.0) + weight
        return totals

    def effective_weights(self) -> dict[int, float]:
        """The live weights per resolved version."""
        return self._per_version(self.live_entries())

    def version_weights(self) -> dict[int, float]:
        """The table's weights per resolved version, AVAILABLE or not."""
        return self._per_version(self.table.weights)

    def shadow_version(self) -> int | None:
        return self.version_of(self.table.shadow)

    def describe(self) -> dict:
        """The table as set, plus where each entry points now, the effective split and, while no entry's version is
        AVAILABLE, the version answering in their place (for status and the API)."""
        return {**self.table.to_json(), "resolved": {str(e): self.version_of(e) for e in self.table.referenced()},
                "effective": {str(v): w for v, w in sorted(self.effective_weights().items())},
                "fallback": self.fallback()}

    def choose(self, client: str | None) -> tuple[int | None, str]:
        """(version, reason): an entry of the table whose version is AVAILABLE ("single", or "ab" among several);
        with a table none of whose versions is, the ``fallback``; with no table, the newest AVAILABLE version
        ("latest"); None, "latest" when nothing AVAILABLE is known."""
        live = self.live_entries()
        if live:
            entry = pick_entry(live, client or uuid.uuid4().hex)
            return self.version_of(entry), "ab" if len(live) > 1 else "single"
        fallback = self.fallback()
        if fallback is not None:
            return fallback, "fallback"
        return (max(self.available) if self.available else None), "latest"

    def fallback(self) -> int | None:
        """The version that answers while the table routes versions and every one of them is gone (its folder
        removed, a registry published anew): the newest AVAILABLE one not newer than the table's newest, else the
        nearest above it; the newest when no entry resolves. Never a newer version the table did not route while an
        older one is left: one published and not rolled out yet, or one a rollout rejected. None while an entry's
        version is AVAILABLE, with no table, or with nothing AVAILABLE."""
        if not self.table.weights or not self.available or self.live_entries():
            return None
        routed = self.version_weights()
        if not routed:
            return max(self.available)
        top = max(routed)
        older = [v for v in self.available if v <= top]
        return max(older) if older else min(self.available)

    async def _check(self, table: RoutingTable) -> dict[str, int]:
        """Refuse entries the model server cannot serve now: unknown labels, versions that are not AVAILABLE.
        Returns where the table's labels point."""
        resolved: dict[str, int] = {}
        if table.labels():
            if self.labels is None:
                raise RoutingError("version labels need the model server's label lookup, which is not set up")
            try:
                resolved = await self.labels.resolve_all(table.labels())
            except UnknownLabel as exc:
                raise RoutingError(str(exc)) from None
        referenced = [e for e in table.referenced() if isinstance(e, int)] + list(resolved.values())
        unusable = [f"version {v} cannot be used: {self.unusable[v]}" for v in sorted(set(referenced))
                    if v in self.unusable]
        if unusable:
            raise VersionUnusable("; ".join(unusable))
        unknown = [e for e in table.referenced() if isinstance(e, int) and e not in self.available]
        if unknown:
            raise RoutingError(f"versions {unknown} are not AVAILABLE on the model server "
                               f"(available: {sorted(self.available)})")
        stale = {label: v for label, v in resolved.items() if v not in self.available}
        if stale:
            raise RoutingError(f"labels point at versions that are not AVAILABLE: {stale} "
                               f"(available: {sorted(self.available)})")
        return resolved

    async def set_table(self, table: RoutingTable, who: str, note: str | None = None,
                        expected_generation: int | None = None, lease: str | None = None,
                        candidate: int | None = None) -> dict:
        """Stores ``table`` and its audit entry (returned) in one step (SET_TABLE_LUA). ``who``: the operator whose
        token made the change; ``note``: what the caller said (X-Operator), if anything, recorded as given and never
        taken as who; ``expected_generation``: change only that generation of the table, else RoutingChanged;
        ``lease``: the rollout controller's lease token, change only while the lease key holds it, else
        LeaseNotHeld; ``candidate``: the version the controller's table rolls out (with ``lease``), so that an
        operator's change replacing it is told an override (the entry's "rollout")."""
        resolved = await self._check(table)
        new = table.to_json()
        entry = _audit_entry(who, note, new=new)
        writer = {"who": who, "lease": lease or "", "candidate": candidate if lease else None}
        if self._set_table_script is None:
            self._set_table_script = self.redis.register_script(SET_TABLE_LUA)
        answer = await self._set_table_script(
            keys=[self.key, self.generation_key, self.audit_key, keys.rollout_lease(self.model_name), self.writer_key],
            args=[json.dumps(new), json.dumps(entry), json.dumps(RoutingTable().to_json()),
                  "" if expected_generation is None else str(expected_generation), AUDIT_ENTRIES - 1, lease or "",
                  json.dumps(writer), self.stored_generation])
        if answer[0] == -1:
            holder = answer[1].decode() if isinstance(answer[1], bytes) else answer[1]
            raise LeaseNotHeld(lease, holder)
        if not answer[0]:
            raise RoutingChanged(expected_generation, int(answer[1]))
        entry = json.loads(answer[2])
        old = entry["old"]
        self.table = table
        self.stored_generation, self.stored_writer = int(answer[1]), writer
        self.table_generation += 1
        if resolved:  # a label refresh of the old table, ended during the write, may have dropped them
            self.labels.remember(resolved)
        self._stored_table_seen()
        log.info("routing changed by %s: %s -> %s", who, old, new)
        return entry

    def _push_audit(self, pipe, entry: dict) -> None:
        pipe.lpush(self.audit_key, json.dumps(entry))
        pipe.ltrim(self.audit_key, 0, AUDIT_ENTRIES - 1)

    async def record(self, who: str, note: str | None = None, **fields) -> dict:
        """Adds an audit entry for something other than a routing change (``fields``, e.g. a rollout command and
        the controller's answer), in the same list and shape: ``who`` the operator, ``note`` X-Operator as sent."""
        entry = _audit_entry(who, note, **fields)
        async with self.redis.pipeline(transaction=True) as pipe:
            self._push_audit(pipe, entry)
            await pipe.execute()
        return entry

    async def audit(self, limit: int = 100) -> list[dict]:
        """The newest ``limit`` entries, newest first; one that is not a JSON object (the gateway did not write it)
        as ``{"unreadable": <its text>}``."""
        return [_audit_entry_read(e) for e in await self.redis.lrange(self.audit_key, 0, limit - 1)]


def _audit_entry_read(raw: bytes) -> dict:
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):
        entry = None
    return entry if isinstance(entry, dict) else {"unreadable": raw.decode(errors="replace")}


def _audit_entry(who: str, note: str | None, **fields) -> dict:
    entry = {"who": who, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    if note:
        entry["note"] = note[:200]
    return entry
