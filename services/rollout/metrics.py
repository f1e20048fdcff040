"""Prometheus metrics of the rollout controller; every label has a small, fixed set of values."""
from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry()
OUTCOMES = ("start", "advance", "promote", "rollback", "reject", "pause", "resume", "retry", "override")

STEP = Gauge("mushroom_rollout_step", "Index of the rollout's current step in the policy (-1 when no rollout runs)",
             registry=REGISTRY)
CANDIDATE_WEIGHT = Gauge("mushroom_rollout_candidate_weight_percent", "Share of traffic the new version gets now "
                         "(0 in a shadow step or with no rollout)", registry=REGISTRY)
CANDIDATE_VERSION = Gauge("mushroom_rollout_candidate_version", "Version being rolled out (0 when none)",
                          registry=REGISTRY)
STABLE_VERSION = Gauge("mushroom_rollout_stable_version", "The stable version", registry=REGISTRY)
PAUSED = Gauge("mushroom_rollout_paused", "1 while an operator has paused the rollout", registry=REGISTRY)
LEADER = Gauge("mushroom_rollout_leader", "1 while this controller holds the lease and acts", registry=REGISTRY)
DECISIONS = Counter("mushroom_rollout_decisions", "Rollout decisions by outcome", ["outcome"], registry=REGISTRY)
RETIRED_VERSIONS = Counter("mushroom_rollout_retired_versions", "Versions removed from the model server's specific "
                           "list (--serve-new-versions), so that it unloads them", registry=REGISTRY)
LOOP_FAILURES = Counter("mushroom_rollout_loop_failures", "Failed controller ticks (each is retried with backoff)",
                        registry=REGISTRY)
LAST_TICK = Gauge("mushroom_rollout_last_tick_timestamp_seconds", "Unix time of the last successful tick",
                  registry=REGISTRY)

for _outcome in OUTCOMES:  # every outcome exported from the start, so rate() and increase() see the first one
    DECISIONS.labels(outcome=_outcome)
