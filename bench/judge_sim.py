"""Rollouts simulated through the real judge (services/rollout/judge.py) at the controller's cadence: how often is an
identical version rolled back (A/A), and how often, and how fast, is a worse one?

Each simulated tick draws the requests each version gets at its step's weight, their errors, the feedback a share of
the answers gets and how much of it says "right", then calls ``judge_online`` and ``decide`` on the totals since the
rollout started, as the controller does every ``tick_seconds``. The p95 is the same for both versions and mirrored
requests always agree, so only the error-rate and feedback rules can fire.

    python -m bench.judge_sim            # -> bench/results/judge_sim.json
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from services.rollout import judge
from services.rollout.judge import ADVANCE, ROLLBACK, Figures
from services.rollout.policy import Policy, load_policy


@dataclass(frozen=True)
class Traffic:
    requests_per_second: float = 5.0
    feedback_share: float = 0.10  # of the answers given, how many get feedback
    stable_error_rate: float = 0.005
    stable_accuracy: float = 0.8
    new_error_rate: float = 0.005
    new_accuracy: float = 0.8


def simulate_rollout(policy: Policy, traffic: Traffic, rng: np.random.Generator) -> tuple[str | None, float]:
    """One rollout to its end: (the rule that rolled it back, or None if promoted; seconds it took)."""
    new, stable = np.zeros(4, np.int64), np.zeros(4, np.int64)  # requests, errors, feedback right, feedback
    step, step_started, step_requests_before, now, mirrored = 0, 0.0, 0, 0.0, 0
    while True:
        now += policy.tick_seconds
        weight = policy.steps[step].weight
        arriving = rng.poisson(traffic.requests_per_second * policy.tick_seconds)
        to_new = rng.binomial(arriving, weight / 100)
        if weight == 0:
            mirrored += arriving
        for totals, n, error_rate, accuracy in ((new, to_new, traffic.new_error_rate, traffic.new_accuracy),
                                               (stable, arriving - to_new, traffic.stable_error_rate,
                                                traffic.stable_accuracy)):
            errors = rng.binomial(n, error_rate)
            feedback = rng.binomial(n - errors, traffic.feedback_share)
            totals += (n, errors, rng.binomial(feedback, accuracy), feedback)
        # No cache: every request is computed, and every version as fast as the other.
        new_figures = Figures(int(new[0]), int(new[1]), mirrored, mirrored, int(new[2]), int(new[3]),
                              misses=int(new[0] - new[1]), miss_p95_ms=50.0)
        stable_figures = Figures(int(stable[0]), int(stable[1]), 0, 0, int(stable[2]), int(stable[3]),
                                 misses=int(stable[0] - stable[1]), miss_p95_ms=50.0)
        verdicts = judge.judge_online(new_figures, stable_figures, policy.rules)
        step_requests = mirrored if weight == 0 else int(new[0]) - step_requests_before
        decision = judge.decide(verdicts, now - step_started, policy.steps[step].hold_seconds, step_requests,
                                policy.steps[step].min_requests)
        if decision.outcome == ROLLBACK:
            return decision.rule, now
        if decision.outcome == ADVANCE:
            if step + 1 == len(policy.steps):
                return None, now
            step, step_started, step_requests_before = step + 1, now, int(new[0])


def rollback_rate(policy: Policy, traffic: Traffic, rollouts: int, seed: int = 0) -> dict:
    """Share of ``rollouts`` rolled back, by rule, and the median time to the end."""
    rng = np.random.default_rng(seed)
    outcomes = [simulate_rollout(policy, traffic, rng) for _ in range(rollouts)]
    rules: dict[str, int] = {}
    for rule, _ in outcomes:
        if rule is not None:
            rules[rule] = rules.get(rule, 0) + 1
    rolled_back = [seconds for rule, seconds in outcomes if rule is not None]
    return {"rollouts": rollouts, "rolled_back": sum(rules.values()) / rollouts, "by_rule": rules,
            "median_seconds_to_rollback": float(np.median(rolled_back)) if rolled_back else None}


SCENARIOS = {
    "identical (A/A)": Traffic(),
    "identical, 20 req/s": Traffic(requests_per_second=20.0),
    "accuracy 0.80 -> 0.70": Traffic(new_accuracy=0.70),
    "accuracy 0.80 -> 0.75": Traffic(new_accuracy=0.75),
    "errors 0.5 % -> 3 %": Traffic(new_error_rate=0.03),
    "errors 0.5 % -> 1 %": Traffic(new_error_rate=0.01),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="a policy file (default: the built-in default policy)")
    parser.add_argument("--rollouts", type=int, default=400)
    args = parser.parse_args(argv)
    from bench.common import write_result

    policy = load_policy(args.policy)
    scenarios = {name: {**vars(traffic), **rollback_rate(policy, traffic, args.rollouts, seed=k)}
                 for k, (name, traffic) in enumerate(SCENARIOS.items())}
    for name, row in scenarios.items():
        print(f"{name}: rolled back {row['rolled_back']:.1%} of {row['rollouts']} {row['by_rule']}")
    write_result("judge_sim", {"policy": args.policy or "default", "scenarios": scenarios})


if __name__ == "__main__":
    main()
