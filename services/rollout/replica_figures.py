"""A version's figures over every gateway replica, each replica counted from its own baseline.

The gateway counts requests, errors, latency and shadow agreement per process (GET /v1/admin/status), so a restarted
replica counts from zero while the others go on. Adding the replicas up first and comparing the sum with the sum at
the baseline (Figures.since) would take one replica's restart for everyone's: the sum falls below the baseline and
is then taken whole, the other replicas' counts from before the rollout included. So a baseline is kept per
**source**: each replica under its key (its status URL and the ``instance`` id its status names, drawn anew at each
start, so a restarted replica is a new source counting from zero), and the feedback, one tally in Redis that every
replica reports alike, under FEEDBACK (read from one replica). Each source is counted from its own baseline
(Figures.since), then the sources are added up (Figures.plus). A source that has no baseline counts from zero.

A replica that did not answer is left out and named in ``unanswered``: the figures are then **partial** (a lower
bound of what was served), enough to find a breach, not to pass a step.
"""
from __future__ import annotations

from services.rollout.judge import Figures, figures_from_status

FEEDBACK = "feedback"  # the source key of the shared feedback tally


def replica_key(url: str, status: dict) -> str:
    """``<status URL>#<instance id>``; the URL alone for a gateway whose status names no instance."""
    instance = status.get("instance")
    return f"{url}#{instance['id']}" if isinstance(instance, dict) and instance.get("id") else url


class ReplicaFigures:
    """One reading of every replica's GET /v1/admin/status (``statuses``: status URL -> body of the replicas that
    answered; ``unanswered``: status URL -> why not, for the others)."""

    def __init__(self, statuses: dict[str, dict], unanswered: dict[str, str] | None = None):
        self.statuses = statuses
        self.unanswered = unanswered or {}

    @property
    def partial(self) -> bool:
        return bool(self.unanswered)

    def sources(self, version: int) -> dict[str, Figures]:
        """Each replica's counts of ``version`` (without feedback), and the feedback tally under FEEDBACK."""
        sources = {replica_key(url, status): figures_from_status(status, version, with_feedback=False)
                   for url, status in self.statuses.items()}
        for status in self.statuses.values():  # the same shared tally in every body: read once
            shared = figures_from_status(status, version)
            sources[FEEDBACK] = Figures(feedback_correct=shared.feedback_correct, feedback_total=shared.feedback_total)
            break
        return sources

    def baseline(self, version: int) -> dict[str, dict]:
        """The baseline of ``version`` now, as the state keeps it: source key -> Figures JSON."""
        return {key: figures.to_json() for key, figures in self.sources(version).items()}

    def since(self, version: int, baseline: dict) -> Figures:
        """``version``'s figures added since ``baseline`` (from ``baseline()``), source by source. A baseline of one
        Figures (a state saved before baselines were kept per source) is compared with the sum, as it was then."""
        sources = self.sources(version)
        if "requests" in baseline:
            total = Figures()
            for figures in sources.values():
                total = total.plus(figures)
            return total.since(Figures.from_json(baseline))
        total = Figures()
        for key, figures in sources.items():
            total = total.plus(figures.since(Figures.from_json(baseline.get(key))))
        return total
