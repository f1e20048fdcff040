"""Pure judging functions: a version's figures in, a verdict per rule out, and the step's decision from the verdicts.

No I/O except ``read_offline_scores`` (one JSON file). Each rule answers ``pass``, ``breach`` (roll back now),
``insufficient`` (not enough data yet: it neither breaches nor blocks) or ``skipped`` (not applicable); its
``reason`` is the sentence that goes into the audit log and the history.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

PASS, BREACH, INSUFFICIENT, SKIPPED = "pass", "breach", "insufficient", "skipped"
ROLLBACK, ADVANCE, HOLD = "rollback", "advance", "hold"


@dataclass(frozen=True)
class Figures:
    """One version's counts over a period (as the gateway's GET /v1/admin/status reports them, or a difference of
    two such reports) and the p95 latency of its cache misses over the gateway's recent window."""
    requests: int = 0
    errors: int = 0
    shadow_requests: int = 0
    shadow_agreements: int = 0
    feedback_correct: int = 0
    feedback_total: int = 0
    misses: int = 0  # answers the version computed (not from the cache): the ones its latency is judged on
    miss_p95_ms: float | None = None  # their p95, over the gateway's recent window

    def since(self, base: "Figures") -> "Figures":
        """The counts added since ``base``. A counter below its base (the gateway restarted and counts from zero)
        is taken whole: base treated as 0 for that group of counters."""
        served = (self.requests - base.requests, self.errors - base.errors, self.misses - base.misses) \
            if self.requests >= base.requests else (self.requests, self.errors, self.misses)
        shadow = (self.shadow_requests - base.shadow_requests, self.shadow_agreements - base.shadow_agreements) \
            if self.shadow_requests >= base.shadow_requests else (self.shadow_requests, self.shadow_agreements)
        feedback = (self.feedback_correct - base.feedback_correct, self.feedback_total - base.feedback_total) \
            if self.feedback_total >= base.feedback_total else (self.feedback_correct, self.feedback_total)
        return Figures(max(served[0], 0), max(served[1], 0), max(shadow[0], 0), max(shadow[1], 0),
                       max(feedback[0], 0), max(feedback[1], 0), max(served[2], 0), self.miss_p95_ms)

    def plus(self, other: "Figures") -> "Figures":
        """Counts of two gateway replicas added; the p95 is the worse of the two (a conservative bound)."""
        p95s = [p for p in (self.miss_p95_ms, other.miss_p95_ms) if p is not None]
        return Figures(self.requests + other.requests, self.errors + other.errors,
                       self.shadow_requests + other.shadow_requests, self.shadow_agreements + other.shadow_agreements,
                       self.feedback_correct + other.feedback_correct, self.feedback_total + other.feedback_total,
                       self.misses + other.misses, max(p95s) if p95s else None)

    @property
    def computing(self) -> int:
        """Cache misses the version was asked to compute: answered, or failed (a cache hit never fails)."""
        return self.misses + self.errors

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> "Figures":
        """Figures saved by this or an earlier controller: a field this one no longer has (``p95_ms``, the p95 of
        every answer, before latency was judged on cache misses) is dropped. A baseline saved without ``misses``
        has 0: a rollout under way when the controller was upgraded then counts its misses from the gateway's
        start, which can only dilute its error rate, never raise it."""
        return cls(**{name: value for name, value in (data or {}).items() if name in cls.__dataclass_fields__})


def figures_from_status(status: dict, version: int, with_feedback: bool = True) -> Figures:
    """One version's Figures from a gateway's GET /v1/admin/status body (rates turned back into counts)."""
    row = status.get("versions", {}).get(str(version))
    if row is None:
        return Figures()
    requests, shadow_requests = int(row.get("requests", 0)), int(row.get("shadow_requests", 0))
    errors = round(float(row.get("error_rate") or 0.0) * requests)
    feedback = row.get("feedback", {}) if with_feedback else {}
    # A gateway older than the misses' count: every answer taken as computed, as they were judged then.
    misses = int(row.get("misses", requests - errors))
    agreements = round(float(row.get("shadow_agreement") or 0.0) * shadow_requests)
    return Figures(requests, errors, shadow_requests, agreements, int(feedback.get("correct", 0)),
                   int(feedback.get("total", 0)), misses, row.get("miss_p95_ms"))


@dataclass(frozen=True)
class Verdict:
    rule: str
    outcome: str  # PASS, BREACH, INSUFFICIENT or SKIPPED
    reason: str
    figures: dict

    def to_json(self) -> dict:
        return asdict(self)


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


# The spread of true differences the sequential tests are tuned to (the normal mixture's standard deviation):
# differences of about 5 points, in accuracy or in error rate, are found soonest.
MIXTURE_SD = 0.05


def sequential_log_evidence(excess: float, variance: float, mixture_sd: float = MIXTURE_SD) -> float:
    """log of the mixture sequential probability ratio (mSPRT; Johari, Pekelis and Walsh, "Always valid inference",
    2017) of an estimate ``excess`` beyond its value under the null hypothesis, with ``variance``: the normal
    approximation, with a N(0, mixture_sd^2) mixture over the true excess.

    Its contract, whatever the number of looks: when the true difference is nil, the chance that it ever reaches
    log(1 / alpha) is at most alpha. So a rule may judge the totals so far at every tick."""
    if variance <= 0:
        raise ValueError("the variance of an estimate must be positive")
    spread = mixture_sd * mixture_sd
    return 0.5 * math.log(variance / (variance + spread)) + excess * excess * spread / (
        2 * variance * (variance + spread))


def _sequential_p(log_evidence: float) -> float:
    """The always-valid p-value of one look: 1 / evidence, at most 1."""
    return math.exp(-log_evidence) if log_evidence > 0 else 1.0


def _succession(successes: int, trials: int) -> float:
    """A rate with one success and one failure of doubt (the rule of succession), so that a variance computed from it
    is never 0: an error-free or all-right sample still says little after few trials."""
    return (successes + 1) / (trials + 2)


def judge_error_rate(new: Figures, stable: Figures, params: dict) -> Verdict:
    """Breached when the new version's error rate exceeds the stable version's (0 when it has no requests) by more
    than ``max_increase``, by a sequential test at level ``alpha``. The rate is of the answers each version had to
    compute (``Figures.computing``): a cached answer cannot fail, and a new version's cache starts empty, so over
    every answer the same failures of the model server would weigh on it alone."""
    new_tried, stable_tried = new.computing, stable.computing
    new_rate, stable_rate = _rate(new.errors, new_tried), _rate(stable.errors, stable_tried) or 0.0
    figures = {"new_error_rate": new_rate, "stable_error_rate": stable_rate, "new_computing": new_tried,
               "stable_computing": stable_tried}
    if new_tried < params["min_requests"]:
        return Verdict("error_rate", INSUFFICIENT, f"{new_tried} of {params['min_requests']} cache misses tried",
                       figures)
    limit = stable_rate + params["max_increase"]
    doubt = _succession(new.errors, new_tried)
    variance = doubt * (1 - doubt) / new_tried
    if stable_tried:
        doubt = _succession(stable.errors, stable_tried)
        variance += doubt * (1 - doubt) / stable_tried
    log_evidence = sequential_log_evidence(new_rate - limit, variance) if new_rate > limit else 0.0
    figures.update(sequential_p=_sequential_p(log_evidence))
    summary = (f"error rate {new_rate:.2%} of {new_tried} cache misses vs stable {stable_rate:.2%} + "
               f"{params['max_increase']:.2%}: sequential p = {figures['sequential_p']:.3g}")
    if log_evidence >= math.log(1 / params["alpha"]):
        return Verdict("error_rate", BREACH, f"{summary} < {params['alpha']:g}", figures)
    return Verdict("error_rate", PASS, summary, figures)


def judge_p95_latency(new: Figures, stable: Figures, params: dict) -> Verdict:
    """Breached when the p95 latency of the new version's cache misses exceeds ``max_ratio`` x the stable version's
    + ``slack_ms``. Misses only, on both sides: a cached answer costs neither version anything, and a new version's
    cache starts empty, so its p95 over every answer would be misses against the stable version's hits."""
    figures = {"new_miss_p95_ms": new.miss_p95_ms, "stable_miss_p95_ms": stable.miss_p95_ms,
               "new_misses": new.misses}
    if new.misses < params["min_requests"] or new.miss_p95_ms is None or stable.miss_p95_ms is None:
        return Verdict("p95_latency", INSUFFICIENT, f"{new.misses} of {params['min_requests']} cache misses "
                       "answered (or none of the stable version's yet)", figures)
    limit = stable.miss_p95_ms * params["max_ratio"] + params["slack_ms"]
    if new.miss_p95_ms > limit:
        return Verdict("p95_latency", BREACH, f"cache-miss p95 {new.miss_p95_ms:.1f} ms > {params['max_ratio']:g} x "
                       f"stable {stable.miss_p95_ms:.1f} ms + {params['slack_ms']:g} ms", figures)
    return Verdict("p95_latency", PASS, f"cache-miss p95 {new.miss_p95_ms:.1f} ms <= {limit:.1f} ms", figures)


def judge_shadow_agreement(new: Figures, params: dict) -> Verdict:
    agreement = _rate(new.shadow_agreements, new.shadow_requests)
    figures = {"agreement": agreement, "shadow_requests": new.shadow_requests}
    if new.shadow_requests == 0:
        return Verdict("shadow_agreement", SKIPPED, "no mirrored requests", figures)
    if new.shadow_requests < params["min_requests"]:
        return Verdict("shadow_agreement", INSUFFICIENT, f"{new.shadow_requests} of {params['min_requests']} "
                       "requests mirrored", figures)
    if agreement < params["min_agreement"]:
        return Verdict("shadow_agreement", BREACH, f"top-1 agrees with the answer on {agreement:.1%} of "
                       f"{new.shadow_requests} mirrored requests < {params['min_agreement']:.0%}", figures)
    return Verdict("shadow_agreement", PASS, f"agreement {agreement:.1%} >= {params['min_agreement']:.0%}", figures)


def judge_feedback_accuracy(new: Figures, stable: Figures, params: dict) -> Verdict:
    """Breached when the new version's accuracy from user feedback is lower than the stable version's, by a one-sided
    sequential test at level ``alpha`` (pooled variance, as the two-proportion z-test)."""
    figures = {"new_accuracy": _rate(new.feedback_correct, new.feedback_total), "new_feedback": new.feedback_total,
               "stable_accuracy": _rate(stable.feedback_correct, stable.feedback_total),
               "stable_feedback": stable.feedback_total}
    if min(new.feedback_total, stable.feedback_total) < params["min_feedback"]:
        return Verdict("feedback_accuracy", INSUFFICIENT, f"feedback {new.feedback_total} (new) and "
                       f"{stable.feedback_total} (stable) of {params['min_feedback']} each", figures)
    drop = figures["stable_accuracy"] - figures["new_accuracy"]
    pooled = _succession(new.feedback_correct + stable.feedback_correct, new.feedback_total + stable.feedback_total)
    variance = pooled * (1 - pooled) * (1 / new.feedback_total + 1 / stable.feedback_total)
    log_evidence = sequential_log_evidence(drop, variance) if drop > 0 else 0.0
    figures.update(sequential_p=_sequential_p(log_evidence))
    summary = (f"accuracy {figures['new_accuracy']:.1%} of {new.feedback_total} vs stable "
               f"{figures['stable_accuracy']:.1%} of {stable.feedback_total}: sequential p = "
               f"{figures['sequential_p']:.3g}")
    if log_evidence >= math.log(1 / params["alpha"]):
        return Verdict("feedback_accuracy", BREACH, f"{summary} < {params['alpha']:g}", figures)
    return Verdict("feedback_accuracy", PASS, summary, figures)


def read_offline_scores(version_dir: str | Path | None) -> dict | None:
    """The version's ``assets.extra/metrics.json`` (as written at export), or None when absent or unreadable."""
    if version_dir is None:
        return None
    try:
        data = json.loads((Path(version_dir) / "assets.extra" / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def judge_offline(new_scores: dict | None, stable_scores: dict | None, params: dict) -> Verdict:
    metric = params["metric"]
    new_value = new_scores.get(metric) if new_scores else None
    stable_value = stable_scores.get(metric) if stable_scores else None
    figures = {"metric": metric, "new": new_value, "stable": stable_value}
    if not isinstance(new_value, (int, float)):
        if params["required"]:
            return Verdict("offline", BREACH, f"the new version has no {metric} in assets.extra/metrics.json and the "
                           "policy requires offline scores", figures)
        return Verdict("offline", SKIPPED, f"no {metric} in the new version's assets.extra/metrics.json", figures)
    if not isinstance(stable_value, (int, float)):
        return Verdict("offline", SKIPPED, f"no {metric} for the stable version to compare with", figures)
    if new_value < stable_value - params["max_drop"]:
        return Verdict("offline", BREACH, f"offline {metric} {new_value:.4f} < stable {stable_value:.4f} - "
                       f"{params['max_drop']:g}", figures)
    return Verdict("offline", PASS, f"offline {metric} {new_value:.4f} vs stable {stable_value:.4f}", figures)


def judge_online(new: Figures, stable: Figures, rules: dict) -> list[Verdict]:
    """Every online rule, in a fixed order (the first breach is the one reported)."""
    return [judge_error_rate(new, stable, rules["error_rate"]),
            judge_p95_latency(new, stable, rules["p95_latency"]),
            judge_shadow_agreement(new, rules["shadow_agreement"]),
            judge_feedback_accuracy(new, stable, rules["feedback_accuracy"])]


@dataclass(frozen=True)
class Decision:
    outcome: str  # ROLLBACK, ADVANCE or HOLD
    rule: str | None  # the rule that fired (ROLLBACK), else None
    reason: str


def decide(verdicts: list[Verdict], held_seconds: float, hold_seconds: float, step_requests: int,
           min_requests: int) -> Decision:
    """ROLLBACK at the first breach, whatever the timers; ADVANCE once the step has held long enough and counted
    enough requests; HOLD otherwise."""
    for verdict in verdicts:
        if verdict.outcome == BREACH:
            return Decision(ROLLBACK, verdict.rule, verdict.reason)
    waiting = []
    if held_seconds < hold_seconds:
        waiting.append(f"held {held_seconds:.0f} of {hold_seconds:g} s")
    if step_requests < min_requests:
        waiting.append(f"{step_requests} of {min_requests} requests")
    if waiting:
        return Decision(HOLD, None, "; ".join(waiting))
    return Decision(ADVANCE, None, f"held {held_seconds:.0f} s with {step_requests} requests; no rule breached")
