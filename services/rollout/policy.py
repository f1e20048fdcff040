"""The rollout policy: the steps a new version goes through and the rules that judge it, from a YAML or JSON file.

Defaults (``DEFAULT_POLICY``, printed by ``python -m services.rollout --print-default-policy``):

- steps: ``shadow`` (weight 0, the new version gets a mirrored copy of the traffic, 10 min, 200 mirrored requests)
  -> ``canary-5`` (5 %, 10 min, 200 requests) -> ``canary-25`` (25 %, 10 min, 500) -> ``canary-50`` (50 %, 10 min,
  1,000) -> ``full`` (100 %, 10 min, 1,000). A step passes when it has held ``hold_seconds`` AND the new version got
  ``min_requests`` requests in it (mirrored ones in a shadow step), with no rule breached.
- rules (each judged at every tick, over the whole rollout so far; a breach rolls back at once). The two statistical
  rules use sequential tests (judge.sequential_log_evidence), valid however many ticks look: an identical version is
  rolled back by one of them in at most ``alpha`` of its rollouts (bench/judge_sim.py measures it);
  - ``error_rate``: breached when a sequential test at level ``alpha`` (0.01) says the new version's error rate
    exceeds the stable version's by more than ``max_increase`` (0.01), once it has tried ``min_requests`` (100)
    cache misses;
  - ``p95_latency``: breached when the p95 of its cache misses exceeds ``max_ratio`` (1.5) x the stable version's
    + ``slack_ms`` (25), once it has answered ``min_requests`` (100) misses. Both rules count cache misses only,
    for both versions: a cached answer costs neither anything and cannot fail, and a new version's cache starts
    empty;
  - ``shadow_agreement``: breached when its top-1 agrees with the answer given less often than ``min_agreement``
    (0.9), once ``min_requests`` (100) requests were mirrored;
  - ``feedback_accuracy``: breached when a one-sided sequential test at level ``alpha`` (0.05) says its accuracy
    from user feedback is lower than the stable version's, once each has ``min_feedback`` (30) feedback answers;
  - ``offline``: judged once when the rollout starts: breached when ``metric`` (``test_accuracy``) in the version's
    ``assets.extra/metrics.json`` is lower than the stable version's by more than ``max_drop`` (0.02);
    ``required: true`` refuses a version without the scores (default false: skipped, said in the history).
- ``tick_seconds`` (5): how often the controller reads the figures and judges.
- ``candidate_unavailable_seconds`` (180): how long every reading of the model server may say the new version is not
  AVAILABLE before the rollout rolls back (rule ``candidate_unavailable``); meanwhile the step holds. Replicas of TF
  Serving behind one Service load a version at different times (each at its own config poll, 60 s in k8s), so one
  reading says little; 0 rolls back at the first one.

Every field is checked; an unknown field, a wrong type, a weight out of 0..100, weights going down, a last step
below 100 % are refused with the path of the offending field.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml


class PolicyError(ValueError):
    pass


DEFAULT_POLICY: dict = {
    "tick_seconds": 5,
    "candidate_unavailable_seconds": 180,
    "steps": [
        {"name": "shadow", "weight": 0, "shadow": True, "hold_seconds": 600, "min_requests": 200},
        {"name": "canary-5", "weight": 5, "hold_seconds": 600, "min_requests": 200},
        {"name": "canary-25", "weight": 25, "hold_seconds": 600, "min_requests": 500},
        {"name": "canary-50", "weight": 50, "hold_seconds": 600, "min_requests": 1000},
        {"name": "full", "weight": 100, "hold_seconds": 600, "min_requests": 1000},
    ],
    "rules": {
        "error_rate": {"max_increase": 0.01, "alpha": 0.01, "min_requests": 100},
        "p95_latency": {"max_ratio": 1.5, "slack_ms": 25, "min_requests": 100},
        "shadow_agreement": {"min_agreement": 0.9, "min_requests": 100},
        "feedback_accuracy": {"alpha": 0.05, "min_feedback": 30},
        "offline": {"metric": "test_accuracy", "max_drop": 0.02, "required": False},
    },
}

# field -> (type check, description, validity check): every field a policy may hold.
_NUMBER = (int, float)
STEP_FIELDS = {
    "name": (str, "a name", lambda v: 0 < len(v) <= 40),
    "weight": (_NUMBER, "a percentage 0..100", lambda v: 0 <= v <= 100),
    "shadow": (bool, "true or false", lambda v: True),
    "hold_seconds": (_NUMBER, "seconds >= 0", lambda v: v >= 0),
    "min_requests": (int, "an integer >= 0", lambda v: v >= 0),
}
RULE_FIELDS = {
    "error_rate": {"max_increase": (_NUMBER, "a rate 0..1", lambda v: 0 <= v <= 1),
                   "alpha": (_NUMBER, "a level between 0 and 0.5", lambda v: 0 < v < 0.5),
                   "min_requests": (int, "an integer >= 1", lambda v: v >= 1)},
    "p95_latency": {"max_ratio": (_NUMBER, "a ratio >= 1", lambda v: v >= 1),
                    "slack_ms": (_NUMBER, "milliseconds >= 0", lambda v: v >= 0),
                    "min_requests": (int, "an integer >= 1", lambda v: v >= 1)},
    "shadow_agreement": {"min_agreement": (_NUMBER, "a rate 0..1", lambda v: 0 <= v <= 1),
                         "min_requests": (int, "an integer >= 1", lambda v: v >= 1)},
    "feedback_accuracy": {"alpha": (_NUMBER, "a level between 0 and 0.5", lambda v: 0 < v < 0.5),
                          "min_feedback": (int, "an integer >= 1", lambda v: v >= 1)},
    "offline": {"metric": (str, "a key of metrics.json", lambda v: bool(v)),
                "max_drop": (_NUMBER, "a drop 0..1", lambda v: 0 <= v <= 1),
                "required": (bool, "true or false", lambda v: True)},
}


@dataclass(frozen=True)
class Step:
    name: str
    weight: float  # the new version's share, percent; 0 = shadow only
    shadow: bool  # mirror the stable version's traffic to the new version in this step
    hold_seconds: float
    min_requests: int


@dataclass(frozen=True)
class Policy:
    steps: tuple[Step, ...]
    rules: dict  # rule name -> its parameters (every rule present, defaults filled in)
    tick_seconds: float
    candidate_unavailable_seconds: float  # the grace before a candidate the model server does not serve rolls back

    def to_json(self) -> dict:
        return {"tick_seconds": self.tick_seconds, "candidate_unavailable_seconds": self.candidate_unavailable_seconds,
                "rules": self.rules,
                "steps": [{"name": s.name, "weight": s.weight, "shadow": s.shadow, "hold_seconds": s.hold_seconds,
                           "min_requests": s.min_requests} for s in self.steps]}


def _check(value, spec, where: str):
    kind, description, valid = spec
    wrong_type = isinstance(value, bool) and kind is not bool or not isinstance(value, kind)
    if wrong_type or isinstance(value, float) and not math.isfinite(value) or not valid(value):
        raise PolicyError(f"{where}: must be {description}, got {json.dumps(value)}")
    return value


def _check_fields(data, allowed: dict, where: str) -> dict:
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: must be a mapping, got {json.dumps(data)}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise PolicyError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return {name: _check(value, allowed[name], f"{where}.{name}") for name, value in data.items()}


def parse_policy(data, source: str = "policy") -> Policy:
    """A validated Policy from parsed YAML/JSON; missing fields take DEFAULT_POLICY's values (steps are replaced
    as a whole when given)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: must be a mapping with 'steps', 'rules' and 'tick_seconds'")
    unknown = sorted(set(data) - set(DEFAULT_POLICY))
    if unknown:
        raise PolicyError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(sorted(DEFAULT_POLICY))})")
    tick = _check(data.get("tick_seconds", DEFAULT_POLICY["tick_seconds"]),
                  (_NUMBER, "seconds > 0", lambda v: 0 < v <= 3600), f"{source}.tick_seconds")
    unavailable_grace = _check(data.get("candidate_unavailable_seconds",
                                        DEFAULT_POLICY["candidate_unavailable_seconds"]),
                               (_NUMBER, "seconds >= 0", lambda v: 0 <= v <= 86400),
                               f"{source}.candidate_unavailable_seconds")
    raw_steps = data.get("steps", DEFAULT_POLICY["steps"])
    if not isinstance(raw_steps, list) or not raw_steps:
        raise PolicyError(f"{source}.steps: must be a non-empty list of steps")
    steps = []
    for i, raw in enumerate(raw_steps):
        where = f"{source}.steps[{i}]"
        fields = _check_fields(raw, STEP_FIELDS, where)
        if "weight" not in fields:
            raise PolicyError(f"{where}: 'weight' is required (the new version's percentage, 0 = shadow only)")
        weight = float(fields["weight"])
        shadow = fields.get("shadow", weight == 0)
        if weight == 0 and not shadow:
            raise PolicyError(f"{where}: a step with weight 0 sends the new version nothing: set shadow: true")
        if steps and weight < steps[-1].weight:
            raise PolicyError(f"{where}.weight: {weight:g} is lower than the step before ({steps[-1].weight:g}): "
                              "weights never go down in a rollout")
        steps.append(Step(fields.get("name", f"step-{i}"), weight, shadow,
                          float(fields.get("hold_seconds", 0)), fields.get("min_requests", 0)))
    if steps[-1].weight != 100:
        raise PolicyError(f"{source}.steps: the last step must have weight 100 (it has {steps[-1].weight:g}): a "
                          "rollout ends with the new version serving everything")
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise PolicyError(f"{source}.steps: step names must differ ({names})")
    raw_rules = data.get("rules", {})
    rules = copy.deepcopy(DEFAULT_POLICY["rules"])
    if not isinstance(raw_rules, dict):
        raise PolicyError(f"{source}.rules: must be a mapping of rule name to parameters")
    for name, params in raw_rules.items():
        if name not in RULE_FIELDS:
            raise PolicyError(f"{source}.rules: unknown rule {name!r} (known: {', '.join(sorted(RULE_FIELDS))})")
        rules[name].update(_check_fields(params, RULE_FIELDS[name], f"{source}.rules.{name}"))
    return Policy(tuple(steps), rules, float(tick), float(unavailable_grace))


def load_policy(path: str | Path | None) -> Policy:
    """The policy in ``path`` (``.json`` parsed as JSON, anything else as YAML), or the defaults when None."""
    if path is None:
        return parse_policy(copy.deepcopy(DEFAULT_POLICY), "default policy")
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read the policy file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    return parse_policy(data, str(path))
