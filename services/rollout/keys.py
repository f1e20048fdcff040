"""Every Redis key the rollout controller reads or writes, each built by one function here (the gateway's keys are in
services/gateway/keys.py; the controller never writes them: it changes the routing through the gateway's admin API).

All of them are **operator state**: never a TTL except the lease, so ``volatile-lru`` never evicts them, and they
are persisted with the gateway's state (DEVELOPERS.md "Redis layout").
"""
from __future__ import annotations

from services.gateway import keys as gateway_keys

PREFIX = "mushroom:rollout"


def state(model: str) -> str:
    """String (JSON): the controller's state machine (stable version, candidate, step, timers, baselines, paused,
    rejected versions). Written only by the lease holder, in the same script that checks the lease. State: no TTL."""
    return f"{PREFIX}:state:{model}"


def lease(model: str) -> str:
    """String: the lease token of the controller process allowed to act (its identity and a part drawn anew at each
    taking), written with a TTL it renews each tick (the one key here with a TTL: a dead holder's lease expires and
    another controller takes over). Built by services/gateway/keys.rollout_lease: the gateway reads it too, to refuse
    a routing change sent under a lease that is no longer held."""
    return gateway_keys.rollout_lease(model)


def commands(model: str) -> str:
    """List (JSON items, oldest first): operators' pause, resume, abort and promote commands, consumed by the lease
    holder at its next tick. State: no TTL, bounded by the API (at most 100 queued)."""
    return f"{PREFIX}:commands:{model}"


def history(model: str) -> str:
    """List (JSON items, newest first, at most 500): every decision with its step, rule, reason and figures.
    State: no TTL."""
    return f"{PREFIX}:history:{model}"
