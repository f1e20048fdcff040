"""Every Redis key the gateway reads or writes, each built by one function here: the whole Redis layout in one file.

Two kinds of keys share one Redis and are told apart by their expiry (the deployments run ``volatile-lru`` with
persistence, see DEVELOPERS.md "Redis layout"):

- **cache** (always written with a TTL, so evictable): ``result``, ``explanation``.
- **operator state** (never a TTL, so never evicted; persisted): ``routing``, ``routing_generation``,
  ``routing_writer``, ``audit``, ``feedback_tally``, ``feedback_seen``, ``feedback_labels``.

One more key is read here and written by the rollout controller: ``rollout_lease`` (its lease, with a TTL).

Collections are found through these known keys, never by scanning the keyspace.
"""
from __future__ import annotations

PREFIX = "mushroom"


def result(model: str, version: int, identity: str, preprocessing_version: int | str, image_size: int,
           sha256: str) -> str:
    """String (JSON): the full answer of a version, the model of that ``identity`` (version_facts.py), for a photo
    preprocessed at ``image_size`` (the version's input size). Cache: written with the cache TTL."""
    return f"{PREFIX}:result:{model}:{version}:{identity}:{preprocessing_version}:{image_size}:{sha256}"


def explanation(model: str, version: int, identity: str, preprocessing_version: int | str, image_size: int,
                sha256: str, target: str) -> str:
    """String (JSON): a version's answer for a photo preprocessed at ``image_size``, with its Grad-CAM heatmap for
    ``target`` (``class=<label>``, or ``predicted``), beside ``result``'s. Cache: written with the cache TTL."""
    return f"{PREFIX}:explanation:{model}:{version}:{identity}:{preprocessing_version}:{image_size}:{sha256}:{target}"


def result_pattern(model: str) -> str:
    """The MATCH pattern of every cached answer of ``model``: only for dropping the cache (bench), never a tally."""
    return f"{PREFIX}:result:{model}:*"


def explanation_pattern(model: str) -> str:
    """The MATCH pattern of every cached explanation of ``model``: only for dropping the cache (bench)."""
    return f"{PREFIX}:explanation:{model}:*"


def routing(model: str) -> str:
    """String (JSON): the A/B table {"weights": {"<version or label>": weight}, "shadow": ...}. State: no TTL."""
    return f"{PREFIX}:routing:{model}"


def routing_generation(model: str) -> str:
    """String (integer): the generation of ``routing``, incremented by every change in the script that stores the
    table, so that a change made against an older generation is refused. State: no TTL."""
    return f"{PREFIX}:routing_generation:{model}"


def routing_writer(model: str) -> str:
    """String (JSON): who stored ``routing``: {"who": the operator, "lease": the rollout lease token the change was
    sent under ("" for an operator's own change), "candidate": the version the rollout was rolling out, or null}.
    Written with the table, in the same script. State: no TTL."""
    return f"{PREFIX}:routing_writer:{model}"


def audit(model: str) -> str:
    """List (JSON items, newest first, at most 1,000): who changed the routing, when, old and new. State: no TTL."""
    return f"{PREFIX}:audit:{model}"


def feedback_tally(model: str) -> str:
    """Hash: fields ``<version>:<identity>:total`` and ``<version>:<identity>:correct``, user feedback counts per
    model (a version and the identity of the model behind it, version_facts.py); ``<version>:total`` and
    ``<version>:correct`` for feedback on answers that named no model (stats.py). State: no TTL."""
    return f"{PREFIX}:feedback:{model}"


def feedback_seen(model: str) -> str:
    """Sorted set: request ids that got feedback, scored by the expiry of their feedback token (members past it are
    removed at each feedback write), so one answer counts once. State: no TTL, bounded by the feedback window."""
    return f"{PREFIX}:feedback_seen:{model}"


def feedback_labels(model: str) -> str:
    """Hash: request id -> the true label its feedback recorded, so the same feedback sent again (a retry after a 503
    whose write landed, or a lost reply) is answered as recorded, not as a conflict; a field goes when its request id
    leaves ``feedback_seen``. State: no TTL, bounded as ``feedback_seen`` is."""
    return f"{PREFIX}:feedback_labels:{model}"


def rollout_lease(model: str) -> str:
    """String: the token of the rollout controller process that holds the lease of ``model``, with a TTL it renews
    (services/rollout/keys.lease is this key). Written by the controller only; the gateway reads it in the script
    that stores a routing table sent under a lease, to refuse a change from a controller that no longer holds it."""
    return f"{PREFIX}:rollout:lease:{model}"
