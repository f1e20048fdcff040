"""The rollout state machine: one tick reads the figures, judges the current step and acts through the gateway.

States (kept in Redis, keys.state, so a restarted or another controller resumes where the last one was):

- **idle** (``candidate`` None): the ``stable`` version serves everything. A version that is AVAILABLE on the model
  server, newer than ``stable`` and never rejected starts a rollout: the offline rule is judged first (a breach
  rejects the version before it sees traffic), then step 0 of the policy is routed; a version the gateway refuses to
  route because it cannot use it (400 ``version_unusable``: it breaks the serving contract) is rejected too, rule
  ``unusable``.
- **rolling** (``candidate`` set, at step ``step``): every tick judges the rollout's figures since it started
  (judge.judge_online). A breach rolls back at once: routing back to ``stable`` alone, the version added to
  ``rejected``. When the step has held ``hold_seconds`` and counted ``min_requests`` it advances; after the last
  step (100 %) the version is promoted: it becomes ``stable``. A rollout newer versions arrive during is finished
  first; the newest of them starts next. The figures are every gateway replica's, each counted from its own
  baseline (replica_figures.py); with a replica that did not answer they are partial: a breach in them rolls back,
  but the step does not advance (nor does a rollout start). A candidate the model server does not report AVAILABLE
  holds the step
  (``candidate_unavailable_since`` keeps when that began); it rolls back (rule ``candidate_unavailable``) only once
  every reading for the policy's ``candidate_unavailable_seconds`` said so: replicas of TF Serving behind one Service
  load a version at different times.

**The state's versions gone**: when the model server lists nothing from ``stable`` up that it serves or will load
(no such version, or each in END: unloaded, as TF Serving lists them until it restarts), rejected versions aside, and
serves an older one (a registry removed and published anew, or the stable version's folder removed:
``_versions_gone``), the state's versions name models that are gone or will not be served again. The controller
starts over from the newest AVAILABLE version that is not rejected as stable, routed alone, and says so in the history
(``renumbered``, with the state it dropped); the rejected versions the model server still lists stay rejected (a
rejected model is never made stable by a start-over), the others are dropped and not rebuilt into a lost state.
Waiting instead would leave later versions unjudged: the old table's numbers name the new versions published under
them (a new v2 under a table routing v2 alone takes every request as soon as it loads).

With ``serve_new_versions`` (serving_config.py) the controller lists each new version in the model server's config
at every tick, and while idle retires the versions nothing keeps loaded any more (``retire_versions``: not among the
newest on disk, not stable, not named by the gateway's routing table, not labelled), recorded as a ``retire`` event.

Operators' commands (keys.commands, from the controller's HTTP API or the CLI) are applied at the next tick:
``pause`` holds the current step (a breach still rolls back: pausing never disables the safety net), ``resume`` (after
an operator override, the step's table is routed again),
``abort`` (rolls back, rule ``operator_abort``), ``promote`` (straight to 100 % and stable, rule
``operator_promote``), ``retry`` with a version (takes it out of ``rejected``, running or not, so that it may be
rolled out again: the next idle tick starts it if it is the newest AVAILABLE version).

During a rollout every tick compares the gateway's routing table with the step's. A table the controller did not
write (the gateway's ``writer`` names no lease token: an operator's PUT) is an **operator override**: the rollout is
paused, the table kept as the operator set it (``override``) and an ``override`` event names who set it; ``resume``
routes the step again, ``abort`` rolls back. A table written under a lease that the state does not hold (a controller
that died between its routing change and its state save) is put back to the step's. The controller's own changes
name the table generation it read (``?expected_generation=``), so an operator's change landing in between is refused
to the controller (409 routing_changed), never undone: the next tick sees it as an override.

Times (a step's start and hold, the candidate's grace, the history's ``at``) come from Redis TIME, read once a tick:
the clock every controller replica shares, whatever the clock of the host it runs on.

Only the holder of the lease (keys.lease) acts. The lease holds a token drawn at each taking (``lease_token``); the
tick takes or renews it, anything later in the tick only renews it, so a controller that lost its lease mid-tick acts
no further on what it read under it. Its state writes go through a script that checks the token in the same step,
and its routing changes carry the token, which the gateway checks in the script that stores the table (409
lease_lost, taken as LeaseLost): a controller that lost its lease overwrites neither the state nor the routing.
Every routing change goes through the gateway's admin API under the controller's operator token, the decision, rule
and reason in the audit note; every decision is also appended to the history (keys.history) with the judged
figures.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from services.rollout import judge, keys, metrics
from services.rollout.clients import ApiError, GatewayAdmin, ModelServerStates
from services.rollout.judge import ADVANCE, BREACH, ROLLBACK, Verdict
from services.rollout.policy import Policy, Step
from services.rollout.replica_figures import ReplicaFigures

log = logging.getLogger("rollout.controller")
HISTORY_LENGTH = 500
MAX_QUEUED_COMMANDS = 100
COMMANDS = ("pause", "resume", "abort", "promote", "retry")
VERSION_COMMANDS = ("retry",)  # the commands that name a version (and only they)

# KEYS: lease; ARGV: the caller's token or '', a new token to take a free lease with or '' (renew only), ttl ms.
# The token the caller holds the lease under now (renewed or taken), else nil.
HOLD_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder and holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[3]) return ARGV[1] end
if not holder and ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return ARGV[2] end
return false
"""
# KEYS: lease, state, history; ARGV: lease token, state JSON, history items (JSON) ... . 0 (nothing written) unless
# the lease holds that token.
SAVE_STATE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
for i = 3, #ARGV do redis.call('LPUSH', KEYS[3], ARGV[i]) end
redis.call('LTRIM', KEYS[3], 0, %d)
return 1
""" % (HISTORY_LENGTH - 1)
# KEYS: lease; ARGV: lease token. Gives the lease up if it holds that token.
RELEASE_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(RuntimeError):
    pass


class RoutingChangedMeanwhile(RuntimeError):
    """The gateway's table changed between this tick's read and its change: nothing was changed; the next tick
    reads the table again."""


class StableUnavailable(RuntimeError):
    """The stable version is not AVAILABLE: nothing can be rolled out against it or rolled back to it."""


@dataclass
class State:
    stable: int | None = None
    candidate: int | None = None
    step: int = 0
    rollout_started: float = 0.0
    step_started: float = 0.0
    paused: bool = False
    # "stable" / "candidate" -> that version's figures at the rollout's start, per source (replica_figures.py)
    baseline: dict = field(default_factory=dict)
    step_baseline: dict = field(default_factory=dict)  # the candidate's figures at the step's start, per source
    rejected: list = field(default_factory=list)
    judgement: dict | None = None  # the last tick's verdicts, decision and figures
    candidate_unavailable_since: float | None = None  # the first of the readings since which the candidate is missing
    override: dict | None = None  # an operator's table the rollout is paused under, as the gateway stored it

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw) -> "State":
        return cls(**json.loads(raw))


def table_for(step: Step | None, stable: int, candidate: int | None, by_label: bool = False) -> dict:
    """The routing table of a step: stable alone (no step), stable + shadow, stable/candidate split, candidate.
    ``by_label``: the entries are the labels ``stable`` and ``canary`` (labels.py moves them) instead of numbers."""
    stable_entry, candidate_entry = ("stable", "canary") if by_label else (str(stable), str(candidate))
    if step is None or candidate is None:
        return {"weights": {stable_entry: 100}, "shadow": None}
    if step.weight >= 100:
        return {"weights": {candidate_entry: 100}, "shadow": None}
    weights = {stable_entry: 100 - step.weight}
    if step.weight > 0:
        weights[candidate_entry] = step.weight
    shadow = (candidate_entry if by_label else candidate) if step.shadow else None
    return {"weights": weights, "shadow": shadow}


def labels_for(stable: int, candidate: int | None) -> dict[str, int]:
    return {"stable": stable, **({"canary": candidate} if candidate is not None else {})}


def same_table(stored: dict, wanted: dict) -> bool:
    stored_weights = {k: float(v) for k, v in stored.get("weights", {}).items()}
    wanted_weights = {k: float(v) for k, v in wanted["weights"].items()}
    shadow = stored.get("shadow")
    return stored_weights == wanted_weights and (None if shadow is None else str(shadow)) == (
        None if wanted["shadow"] is None else str(wanted["shadow"]))


class Controller:
    def __init__(self, redis, gateway: GatewayAdmin, model_server: ModelServerStates, policy: Policy,
                 model_name: str, registry_dir: str | Path | None = None, identity: str | None = None,
                 lease_seconds: float = 15.0, clock=None, labels=None, serve_new_versions=None,
                 retire_versions=None):
        self.labels = labels  # a labels.LabelConfig when the rollout moves version labels, else None
        # () -> [versions added to the model server's specific list] (serving_config.py), or None
        self.serve_new_versions = serve_new_versions
        # (stable, routing table or None, rolling) -> [versions removed from that list] (serving_config.py), or None
        self.retire_versions = retire_versions
        self.redis = redis
        self.gateway = gateway
        self.model_server = model_server
        self.policy = policy
        self.model_name = model_name
        self.registry_dir = Path(registry_dir) if registry_dir else None  # <registry>/<model>: offline scores
        self.identity = identity or f"rollout-{uuid.uuid4().hex[:12]}"
        self.lease_ms = int(lease_seconds * 1000)
        # () -> Unix seconds for the timers and the history, or None for Redis TIME: the one clock every controller
        # replica shares, so a hold begun by one counts the same on another whose host clock is off
        self.clock = clock
        self._now = 0.0  # this tick's time (read once at its start)
        self.leader = False
        self.lease_token = ""  # "<identity>/<drawn at the taking>" while this process holds the lease
        self._reconciled = False  # the gateway's table checked against the state since this lease was taken
        self._routing: dict | None = None  # the gateway's routing as this tick read it (or its own change left it)
        self._scripts = None

    # ------------------------------------------------------------------ Redis: clock, lease, state, history, commands
    async def now(self) -> float:
        """Unix seconds: the injected clock, else Redis TIME (shared by every controller replica)."""
        if self.clock is not None:
            return float(self.clock())
        seconds, microseconds = await self.redis.time()
        return seconds + microseconds / 1_000_000

    def _script(self, name: str):
        if self._scripts is None:
            self._scripts = {"hold": self.redis.register_script(HOLD_LEASE_LUA),
                             "save": self.redis.register_script(SAVE_STATE_LUA),
                             "release": self.redis.register_script(RELEASE_LEASE_LUA)}
        return self._scripts[name]

    async def hold_lease(self, take: bool = True) -> bool:
        """Renews the lease under this process's token, or with ``take`` takes it when free under a new token (at the
        start of a tick only: later steps act on what the tick read under the token it began with)."""
        fresh = f"{self.identity}/{uuid.uuid4().hex[:8]}" if take else ""
        token = await self._script("hold")(keys=[keys.lease(self.model_name)],
                                           args=[self.lease_token, fresh, self.lease_ms])
        token = token.decode() if isinstance(token, bytes) else token
        held = token is not None
        if held != self.leader:
            log.info("%s %s the lease of %s", self.identity, "took" if held else "does not hold", self.model_name)
        self.leader, self.lease_token = held, token or ""
        metrics.LEADER.set(1 if held else 0)
        return held

    async def release_lease(self) -> None:
        await self._script("release")(keys=[keys.lease(self.model_name)], args=[self.lease_token])
        self.leader, self.lease_token = False, ""
        metrics.LEADER.set(0)

    async def load_state(self) -> State | None:
        raw = await self.redis.get(keys.state(self.model_name))
        return State.from_json(raw) if raw else None

    async def save_state(self, state: State, *events: dict) -> None:
        saved = await self._script("save")(
            keys=[keys.lease(self.model_name), keys.state(self.model_name), keys.history(self.model_name)],
            args=[self.lease_token, state.to_json(), *(json.dumps(e) for e in events)])
        if not saved:
            self.leader, self._reconciled, self.lease_token = False, False, ""
            metrics.LEADER.set(0)
            raise LeaseLost(f"{self.identity} lost the lease of {self.model_name}: state not written")
        self._export(state)

    async def history(self, limit: int = 50) -> list[dict]:
        return [json.loads(e) for e in await self.redis.lrange(keys.history(self.model_name), 0, limit - 1)]

    async def queue_command(self, action: str, who: str, note: str | None = None, version: int | None = None) -> dict:
        """Queues an operator's command for the lease holder's next tick (any controller replica may queue).
        ``version``: the version a command of VERSION_COMMANDS is about; no other command takes one."""
        if action not in COMMANDS:
            raise ValueError(f"unknown command {action!r} (known: {', '.join(COMMANDS)})")
        if action in VERSION_COMMANDS and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
            raise ValueError(f"{action} needs the version it is about: a JSON integer >= 0, e.g. {{\"version\": 3}}")
        if action not in VERSION_COMMANDS and version is not None:
            raise ValueError(f"{action} takes no version")
        if await self.redis.llen(keys.commands(self.model_name)) >= MAX_QUEUED_COMMANDS:
            raise OverflowError(f"{MAX_QUEUED_COMMANDS} commands are already queued")
        command = {"action": action, "who": who, "at": await self.now()}
        if version is not None:
            command["version"] = version
        if note:
            command["note"] = note[:200]
        await self.redis.rpush(keys.commands(self.model_name), json.dumps(command))
        return command

    async def _apply_commands(self, state: State, stable_available: bool = True) -> None:
        """Operators' commands, oldest first; one leaves the queue only once applied, so a command whose routing
        change fails (gateway down) is retried at the next tick rather than lost (at least once: an abort or
        promote applied twice finds no rollout the second time and is recorded as ignored). Without the stable
        version (``stable_available`` False) the commands that would route to it are refused in the history."""
        key = keys.commands(self.model_name)
        while (raw := await self.redis.lindex(key, 0)) is not None:
            await self._apply_command(state, json.loads(raw), stable_available)
            await self.redis.lpop(key)

    # ------------------------------------------------------------------ figures
    async def _figures(self) -> ReplicaFigures:
        """Every gateway replica's figures; those that did not answer are left out (the figures are then partial)."""
        answered, unanswered = await self.gateway.statuses()
        for url, why in unanswered.items():
            log.warning("gateway replica %s did not answer its status: %s (the figures are partial)", url, why)
        return ReplicaFigures(answered, unanswered)

    def _offline_scores(self, version: int) -> dict | None:
        return judge.read_offline_scores(self.registry_dir / str(version) if self.registry_dir else None)

    # ------------------------------------------------------------------ acting
    def _event(self, state: State, outcome: str, reason: str, rule: str | None = None, who: str | None = None,
               **extra) -> dict:
        step = self.policy.steps[state.step] if state.candidate is not None and state.step < len(
            self.policy.steps) else None
        event = {"at": self._now, "outcome": outcome, "version": state.candidate, "stable": state.stable,
                 "step": step.name if step else None, "rule": rule, "reason": reason,
                 "who": who or self.identity, **extra}
        if outcome in metrics.OUTCOMES:
            metrics.DECISIONS.labels(outcome=outcome).inc()
        log.info("rollout %s: %s", outcome, {k: v for k, v in event.items() if k != "at"})
        return event

    def _table(self, step: Step | None, stable: int, candidate: int | None) -> dict:
        return table_for(step, stable, candidate, by_label=self.labels is not None)

    async def _read_routing(self) -> dict:
        """The gateway's routing (weights, shadow, generation, writer), read once a tick."""
        if self._routing is None:
            self._routing = await self.gateway.routing()
        return self._routing

    async def _route(self, table: dict, note: str, labels: dict[str, int] | None = None,
                     labels_first: bool = True, candidate: int | None = None) -> None:
        """Changes the routing (and, with labels, moves them: before the routing when it starts referring to them,
        after it when it stops); ``candidate``: the version the table rolls out, if it does. The change names the
        generation this tick read, so that one made meanwhile is not undone (RoutingChangedMeanwhile)."""
        if not await self.hold_lease(take=False):  # never change the routing without the lease
            raise LeaseLost(f"{self.identity} lost the lease of {self.model_name}: routing not changed")
        move = self.labels is not None and labels is not None
        if move and labels_first:
            await self.labels.move(labels)
        generation = (await self._read_routing()).get("generation")
        try:  # the gateway checks the token where it stores the table: a lease lost since is caught there
            applied = await self.gateway.put_routing(table, f"rollout: {note}", lease=self.lease_token,
                                                     candidate=candidate, expected_generation=generation)
        except ApiError as exc:
            if exc.code == "routing_changed":
                self._routing = None
                raise RoutingChangedMeanwhile(f"routing not changed ({note}): {exc}") from None
            if exc.code != "lease_lost":
                raise
            self.leader, self._reconciled, self.lease_token = False, False, ""
            metrics.LEADER.set(0)
            raise LeaseLost(f"{self.identity} lost the lease of {self.model_name}: the gateway refused the routing "
                            f"change ({exc})") from None
        self._routing = {**table, "generation": applied.get("generation"),
                         "writer": {"who": self.identity, "lease": self.lease_token, "candidate": candidate}}
        if move and not labels_first:
            await self.labels.move(labels)

    def _step(self, state: State) -> Step:
        return self.policy.steps[state.step]

    async def _start(self, state: State, candidate: int, figures: ReplicaFigures) -> None:
        offline = judge.judge_offline(self._offline_scores(candidate), self._offline_scores(state.stable),
                                      self.policy.rules["offline"])
        if offline.outcome == BREACH:
            await self._reject(state, candidate, "offline", offline.reason, verdicts=[offline.to_json()])
            return
        now, before = self._now, asdict(state)
        state.candidate, state.step, state.paused, state.candidate_unavailable_since = candidate, 0, False, None
        state.override = None
        state.rollout_started = state.step_started = now
        state.baseline = {"stable": figures.baseline(state.stable), "candidate": figures.baseline(candidate)}
        state.step_baseline = figures.baseline(candidate)
        state.judgement = None
        step = self._step(state)
        try:
            await self._route(self._table(step, state.stable, candidate),
                              f"start v{candidate} (stable v{state.stable}) at {step.name}; offline: {offline.reason}",
                              labels_for(state.stable, candidate), candidate=candidate)
        except ApiError as exc:
            if exc.code != "version_unusable":
                raise
            # the gateway cannot use the version (it breaks the serving contract): rolling it out cannot start
            for name, value in before.items():  # the state as it was before this start
                setattr(state, name, value)
            if self.labels is not None:
                await self.labels.move(labels_for(state.stable, None))
            await self._reject(state, candidate, "unusable", f"the gateway cannot use v{candidate}: {exc}")
            return
        await self.save_state(state, self._event(state, "start", f"v{candidate} AVAILABLE; offline: "
                                                 f"{offline.reason}", verdicts=[offline.to_json()]))

    async def _reject(self, state: State, candidate: int, rule: str, reason: str, **extra) -> None:
        """``candidate`` is not rolled out, and not tried again: a ``reject`` event."""
        state.rejected = sorted(set(state.rejected) | {candidate})
        probe = State(**{**asdict(state), "candidate": candidate})
        await self.save_state(state, self._event(probe, "reject", reason, rule=rule, **extra))

    async def _rollback(self, state: State, rule: str, reason: str, who: str | None = None, **extra) -> None:
        candidate, step = state.candidate, self._step(state)
        await self._route(self._table(None, state.stable, None),
                          f"rollback v{candidate} at {step.name}: rule {rule}: {reason}",
                          labels_for(state.stable, None), labels_first=False)
        event = self._event(state, "rollback", reason, rule=rule, who=who, **extra)
        state.rejected = sorted(set(state.rejected) | {candidate})
        state.candidate, state.step, state.paused, state.baseline, state.step_baseline = None, 0, False, {}, {}
        state.candidate_unavailable_since = state.override = None
        await self.save_state(state, event)

    async def _promote(self, state: State, reason: str, rule: str | None = None, who: str | None = None) -> None:
        candidate = state.candidate
        note = f"promote v{candidate} to stable (was v{state.stable}): {reason}"
        if self.labels is None:
            await self._route(table_for(self.policy.steps[-1], state.stable, candidate), note)
        else:  # stable moves to the new version, then the routing names stable alone, then canary goes
            await self._route(self._table(None, candidate, None), note, {"stable": candidate, "canary": candidate})
            await self.labels.move(labels_for(candidate, None))
        event = self._event(state, "promote", reason, rule=rule, who=who)
        state.stable, state.candidate, state.step, state.paused = candidate, None, 0, False
        state.baseline, state.step_baseline, state.candidate_unavailable_since, state.override = {}, {}, None, None
        await self.save_state(state, event)

    async def _advance(self, state: State, figures: ReplicaFigures, reason: str) -> None:
        state.step += 1
        state.step_started = self._now
        state.step_baseline = figures.baseline(state.candidate)
        step = self._step(state)
        await self._route(self._table(step, state.stable, state.candidate),
                          f"advance v{state.candidate} to {step.name} ({step.weight:g} %): {reason}",
                          candidate=state.candidate)
        await self.save_state(state, self._event(state, "advance", reason))

    async def _apply_command(self, state: State, command: dict, stable_available: bool = True) -> None:
        action, who = command["action"], command["who"]
        if action == "retry":
            await self._retry(state, command["version"], who)
            return
        if state.candidate is None:
            await self.save_state(state, self._event(state, "ignored", f"{action}: no rollout is running",
                                                     who=who, command=action))
            return
        if not stable_available and (action == "abort" or action == "resume" and state.override is not None):
            reason = (f"{action}: the stable version v{state.stable} is not AVAILABLE on the model server, so no "
                      f"table can route to it; promote v{state.candidate}, or load v{state.stable} again")
            await self.save_state(state, self._event(state, "ignored", reason, who=who, command=action))
            return
        if action == "pause":
            state.paused = True
            await self.save_state(state, self._event(state, "pause", f"paused by {who}", who=who))
        elif action == "resume":
            if state.override is not None:  # the operator hands the routing back: the step's table again
                step = self._step(state)
                await self._route(self._table(step, state.stable, state.candidate),
                                  f"resume v{state.candidate} at {step.name} by {who}: the step's table replaces the "
                                  "operator override", candidate=state.candidate)
            state.paused, state.override = False, None
            await self.save_state(state, self._event(state, "resume", f"resumed by {who}", who=who))
        elif action == "abort":
            await self._rollback(state, "operator_abort", f"aborted by {who}", who=who)
        elif action == "promote":
            await self._promote(state, f"promoted by {who}", rule="operator_promote", who=who)

    async def _retry(self, state: State, version: int, who: str) -> None:
        """An operator's second chance for a rejected version: out of ``rejected``, recorded with who asked."""
        if version not in state.rejected:
            await self.save_state(state, self._event(
                state, "ignored", f"retry v{version}: not a rejected version (rejected: {state.rejected})", who=who,
                command="retry", version=version))
            return
        state.rejected = [v for v in state.rejected if v != version]
        await self.save_state(state, self._event(
            state, "retry", f"v{version} removed from the rejected versions by {who}: a rollout may start it again",
            who=who, version=version))

    async def _retire(self, state: State) -> None:
        """Idle: remove from the model server's list the versions nothing keeps loaded (serving_config.retirable);
        with the routing table unreadable, nothing is removed this tick."""
        if self.retire_versions is None or state.candidate is not None:
            return
        try:
            routing = await self.gateway.routing()
        except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("no version retired: the gateway's routing table is unreadable (%s: %s)",
                        type(exc).__name__, exc)
            return
        if not await self.hold_lease(take=False):  # never change the model server's config without the lease
            raise LeaseLost(f"{self.identity} lost the lease of {self.model_name}: no version retired")
        retired = await asyncio.to_thread(self.retire_versions, state.stable, routing, False)
        if retired:
            metrics.RETIRED_VERSIONS.inc(len(retired))
            await self.save_state(state, self._event(
                state, "retire", f"versions {retired} removed from the model server's list: not among the newest "
                "on disk, not stable, not routed, not labelled", retired=retired))

    async def _follow_routing(self, state: State, taking_over: bool) -> None:
        """The gateway's table against the state's: on taking the lease (labels moved too) and at every tick of a
        rollout. Idle, on taking over, the table becomes stable alone. Rolling: the step's table, or the operator's
        table the rollout is paused under, is as it should be; a table written under a lease (a controller that died
        between its change and its state save) is put back to the step's; any other is an operator override: the
        rollout pauses and keeps it."""
        if state.stable is None or not taking_over and state.candidate is None:
            return
        rolling = state.candidate is not None
        wanted = self._table(self._step(state) if rolling else None, state.stable, state.candidate)
        if taking_over and self.labels is not None:
            await self.labels.move(labels_for(state.stable, state.candidate))
        stored = await self._read_routing()
        if same_table(stored, wanted) or state.override is not None and same_table(stored, state.override):
            return
        writer = stored.get("writer") or {}
        if rolling and not writer.get("lease"):
            table = {"weights": stored.get("weights", {}), "shadow": stored.get("shadow")}
            who = writer.get("who") or "an operator"
            state.paused, state.override = True, table
            await self.save_state(state, self._event(
                state, "override", f"operator override: {who} set the routing to {table} during the rollout (the "
                f"step's is {wanted}); the rollout is paused and the table left as set until `rollout resume` "
                "routes the step again or `rollout abort` rolls back", who=who, table=table))
            return
        where = f"v{state.candidate} at {self._step(state).name}" if rolling else "idle"
        await self._route(wanted, f"take over: {where} (stable v{state.stable}) by {self.identity}",
                          candidate=state.candidate)

    async def _rejected_in_history(self) -> list[int]:
        """The versions the kept history rejects (``reject`` or ``rollback``) with no ``retry`` after: what a lost
        state's ``rejected`` held, as far as the last HISTORY_LENGTH decisions tell."""
        retried, rejected = set(), set()
        for event in await self.history(limit=HISTORY_LENGTH):  # newest first
            version = event.get("version")
            if event.get("outcome") == "renumbered":  # older decisions are of other models' numbers
                rejected.update(v for v in event.get("kept_rejected", []) if v not in retried)
                break
            if event.get("outcome") == "retry":
                retried.add(version)
            elif event.get("outcome") in ("reject", "rollback") and version not in retried:
                rejected.add(version)
        return sorted(v for v in rejected if isinstance(v, int))

    async def _adopt(self, available: set[int]) -> State:
        """A state for a controller that finds none: the stable version is the label ``stable`` (with labels), else
        the AVAILABLE version with the routing table's largest weight (ties: the lower version), else the newest
        AVAILABLE one. A rollout's table gives the larger share to the stable version until its last step, so a
        state lost mid-rollout never makes the candidate stable; its rollout starts again from the first step.
        The loss is said in the history (``state_lost``) when the history holds decisions or the table splits
        traffic, which only a controller or an operator did; the rejected versions are rebuilt from the history, so a
        version rolled back before the loss is not rolled out again."""
        weights = (await self._read_routing()).get("weights", {})
        routed = sorted((-float(weight), int(entry)) for entry, weight in weights.items()
                        if entry.isdigit() and int(entry) in available)
        labelled = self.labels.current().get("stable") if self.labels is not None else None
        if labelled in available:
            stable, how = labelled, "the version labelled stable"
        elif routed:
            stable, how = routed[0][1], "the routing table's largest weight"
        else:
            stable, how = max(available), "the newest AVAILABLE version"
        state = State(stable=stable)
        evidence = [what for what, seen in (("the history holds decisions", await self.history(limit=1)),
                                            (f"the routing table splits traffic {weights}", len(weights) > 1)) if seen]
        if not evidence:
            await self.save_state(state, self._event(state, "adopt", f"v{stable} taken as stable ({how}; no earlier "
                                                     "state)"))
            return state
        state.rejected = await self._rejected_in_history()
        rejections = (f"the rejected versions are those the history shows ({', '.join(f'v{v}' for v in state.rejected)})"
                      if state.rejected else "the history shows no rejected version")
        reason = (f"state lost: no saved state, though {' and '.join(evidence)}; v{stable} taken as stable ({how}); a "
                  f"rollout in progress starts again from its first step; {rejections}")
        log.error("rollout of %s: %s", self.model_name, reason)
        await self.save_state(state, self._event(state, "adopt", reason, state_lost=True, routing=weights))
        return state

    # ------------------------------------------------------------------ the tick
    async def tick(self) -> None:
        """One round: lease, routing, commands, version states, figures, judgement, at most one routing change per
        cause."""
        if not await self.hold_lease():
            self._reconciled = False
            return
        self._routing = None
        self._now = await self.now()
        try:
            await self._tick()
        except RoutingChangedMeanwhile as exc:
            log.info("tick ended early: %s", exc)

    async def _tick(self) -> None:
        if self.serve_new_versions is not None:
            added = self.serve_new_versions()
            if added:
                log.info("listed new versions %s in the model server's config so that they load", added)
        state = await self.load_state()
        listed = await self.model_server.listed()
        available = {v for v, s in listed.items() if s == "AVAILABLE"}
        if state is None:
            if not available:
                return
            state = await self._adopt(available)
        elif self._versions_gone(state, listed, available):
            state = await self._start_over(state, listed, available)
        if self._stable_missing(state, available):  # operators' commands still apply: a promote needs no stable
            await self._apply_commands(state, stable_available=False)
        if self._stable_missing(state, available):
            raise StableUnavailable(
                f"the stable version {state.stable} is not AVAILABLE on the model server (AVAILABLE: "
                f"{sorted(available)}): no rollout can start or roll back; keep it loaded (a model_version_policy "
                "that includes it, not latest { num_versions: 1 })")
        await self._follow_routing(state, taking_over=not self._reconciled)
        self._reconciled = True
        await self._apply_commands(state)  # operators' commands need no figures: no unanswering replica blocks them
        figures = await self._figures()
        if state.candidate is None:
            newer = [v for v in available if v > state.stable and v not in state.rejected]
            if newer and figures.partial:  # a replica without a baseline would count what it served before
                log.warning("v%d not started yet: its baselines need every gateway replica, and %s did not answer",
                            max(newer), sorted(figures.unanswered))
                self._export(state)
            elif newer:
                await self._start(state, max(newer), figures)
            else:
                self._export(state)
                await self._retire(state)
            return
        await self._judge(state, available, figures)

    async def _judge(self, state: State, available: set[int], figures: ReplicaFigures) -> None:
        step = self._step(state)
        missing = self._candidate_missing(state, available)
        if missing is not None and missing >= self.policy.candidate_unavailable_seconds:
            await self._rollback(state, "candidate_unavailable", f"v{state.candidate} not AVAILABLE on the model "
                                 f"server for {missing:.0f} s (every reading since; the policy's grace: "
                                 f"{self.policy.candidate_unavailable_seconds:g} s)")
            return
        new = figures.since(state.candidate, state.baseline.get("candidate", {}))
        stable = figures.since(state.stable, state.baseline.get("stable", {}))
        in_step = figures.since(state.candidate, state.step_baseline)
        step_requests = in_step.shadow_requests if step.weight == 0 else in_step.requests
        verdicts = judge.judge_online(new, stable, self.policy.rules)
        held = self._now - state.step_started
        decision = judge.decide(verdicts, held, step.hold_seconds, step_requests, step.min_requests)
        partial = sorted(figures.unanswered)  # replicas left out: a breach in the rest is a breach, a pass is not
        state.judgement = {"at": self._now, "decision": decision.outcome, "rule": decision.rule,
                           "reason": decision.reason, "step_requests": step_requests, "held_seconds": held,
                           "new": new.to_json(), "stable": stable.to_json(),
                           "verdicts": [v.to_json() for v in verdicts], "partial": partial}
        if decision.outcome == ROLLBACK:
            await self._rollback(state, decision.rule, decision.reason, verdicts=_brief(verdicts), partial=partial)
        elif decision.outcome == ADVANCE and state.paused:
            state.judgement["reason"] = f"paused ({decision.reason})"
            await self.save_state(state)
        elif decision.outcome == ADVANCE and missing is not None:
            state.judgement["reason"] = (f"held: v{state.candidate} not AVAILABLE on the model server for "
                                         f"{missing:.0f} of {self.policy.candidate_unavailable_seconds:g} s "
                                         f"({decision.reason})")
            await self.save_state(state)
        elif decision.outcome == ADVANCE and partial:
            state.judgement["reason"] = (f"held: figures partial, gateway replicas {partial} did not answer "
                                         f"({decision.reason})")
            await self.save_state(state)
        elif decision.outcome == ADVANCE and state.step + 1 >= len(self.policy.steps):
            await self._promote(state, f"all steps passed; {decision.reason}")
        elif decision.outcome == ADVANCE:
            await self._advance(state, figures, decision.reason)
        else:
            await self.save_state(state)

    @staticmethod
    def _versions_gone(state: State, listed: dict[int, str], available: set[int]) -> bool:
        """The state's versions are gone: the model server lists no version from ``stable`` up that it serves or
        will load (none, or each in END), rejected versions aside (never routed again), and serves an older one
        that is not rejected. A model server still loading lists every version it aspires from its first look at
        the disk (START or LOADING), one unloading the stable version lists it UNLOADING, one whose `latest` policy
        replaced the stable version lists the newer one: none of these is taken for this. One restarted on a
        registry published anew (its numbers started again), or one that unloaded the stable version and every
        newer one but rejected ones (their folders removed: it lists them in END until it restarts), is; the
        controller follows what it serves."""
        rejected = set(state.rejected)
        return (state.stable is not None and bool(available - rejected)
                and all(v < state.stable or s == "END" or v in rejected for v, s in listed.items()))

    async def _start_over(self, state: State, listed: dict[int, str], available: set[int]) -> State:
        """A state for versions that are gone: the newest AVAILABLE version that is not rejected stable and routed
        alone (at this tick); the rejected versions the model server still lists outside END stay rejected (the
        same models, or a new one under a reused number, which an operator's ``retry`` releases: a rejected model
        is never made stable by a start-over), the others are dropped (a version rejected before is judged again if
        it comes back). The dropped state goes into the history's ``renumbered`` event, the kept rejections too
        (``kept_rejected``, which a lost state is rebuilt from)."""
        kept = [v for v in state.rejected if listed.get(v, "END") != "END"]
        fresh = State(stable=max(available - set(kept)), rejected=kept)
        seen = ", ".join(f"v{v} {s}" for v, s in sorted(listed.items()))
        but = " but rejected ones" if kept else ""
        if any(v >= state.stable and v not in kept for v in listed):
            what = (f"unloaded the stable v{state.stable} and lists no version from it up that it serves or will load"
                    f"{but} ({seen}), as after its folder was removed or a registry removed and published anew")
        else:
            what = (f"lists no version from the stable v{state.stable} up{but} ({seen}), as after a registry removed "
                    "and published anew (version numbers started again)")
        stays = ""
        if kept:
            names = ", ".join(f"v{v}" for v in kept)
            stays = f"; {names} {'stays' if len(kept) == 1 else 'stay'} rejected (still listed; `retry` releases it)"
        reason = (f"the model server {what}; the state's versions name models it will not serve again (candidate "
                  f"{state.candidate and f'v{state.candidate}'}, rejected {state.rejected}){stays}; v{fresh.stable}, "
                  "the newest AVAILABLE version not rejected, taken as stable")
        log.warning("rollout of %s: %s", self.model_name, reason)
        await self.save_state(fresh, self._event(fresh, "renumbered", reason, dropped=asdict(state),
                                                 kept_rejected=kept))
        self._reconciled = False  # the table of the dropped state's versions is replaced at this tick
        return fresh

    def _stable_missing(self, state: State, available: set[int]) -> bool:
        """The stable version is not AVAILABLE, while the table routes it traffic (any step below 100 %, or idle)."""
        full = state.candidate is not None and self._step(state).weight >= 100
        return state.stable not in available and not full

    def _candidate_missing(self, state: State, available: set[int]) -> float | None:
        """Seconds since the first of the readings, this one included, that did not list the candidate as AVAILABLE;
        None when this one does."""
        if state.candidate in available:
            state.candidate_unavailable_since = None
            return None
        if state.candidate_unavailable_since is None:
            state.candidate_unavailable_since = self._now
        return self._now - state.candidate_unavailable_since

    def _export(self, state: State) -> None:
        rolling = state.candidate is not None
        metrics.STEP.set(state.step if rolling else -1)
        metrics.CANDIDATE_WEIGHT.set(self._step(state).weight if rolling else 0)
        metrics.CANDIDATE_VERSION.set(state.candidate or 0)
        metrics.STABLE_VERSION.set(state.stable or 0)
        metrics.PAUSED.set(1 if state.paused else 0)

    # ------------------------------------------------------------------ reading, for the API and the web panel
    async def describe(self) -> dict:
        state = await self.load_state()
        token = await self.redis.get(keys.lease(self.model_name))
        token = token.decode() if isinstance(token, bytes) else token
        holder = token.rpartition("/")[0] if token else None  # the identity of "<identity>/<drawn at the taking>"
        body = {"model": self.model_name, "identity": self.identity, "leader": holder, "policy":
                self.policy.to_json(), "state": asdict(state) if state else None, "step": None, "timers": None,
                "history": await self.history()}
        if state is not None and state.candidate is not None:
            step = self._step(state)
            now = await self.now()
            held = now - state.step_started
            body["step"] = {"index": state.step, "of": len(self.policy.steps), "name": step.name,
                            "weight": step.weight, "shadow": step.shadow, "min_requests": step.min_requests}
            body["timers"] = {"held_seconds": held, "hold_seconds": step.hold_seconds,
                              "remaining_seconds": max(step.hold_seconds - held, 0.0),
                              "rollout_seconds": now - state.rollout_started}
        return body


def _brief(verdicts: list[Verdict]) -> list[dict]:
    return [{"rule": v.rule, "outcome": v.outcome, "reason": v.reason} for v in verdicts]
