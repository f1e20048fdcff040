"""The judge's statistics over a whole rollout: the controller judges the totals so far at every tick (hundreds of
looks per rollout), so an identical version must be rolled back rarely however often it is looked at, and a worse one
still before it is promoted. Simulated with bench/judge_sim.py at the default policy's cadence (seeded)."""
import pytest

from bench.judge_sim import Traffic, rollback_rate
from services.rollout.policy import load_policy

ROLLOUTS = 200


@pytest.fixture(scope="module")
def policy():
    return load_policy(None)


@pytest.mark.parametrize("requests_per_second", [5.0, 20.0])
def test_an_identical_version_is_rarely_rolled_back(policy, requests_per_second):
    alphas = policy.rules["feedback_accuracy"]["alpha"] + policy.rules["error_rate"]["alpha"]
    result = rollback_rate(policy, Traffic(requests_per_second=requests_per_second), ROLLOUTS, seed=1)
    # at most the two rules' levels together; 200 rollouts leave about 1.7 points of noise around a 6 % rate
    assert result["rolled_back"] <= alphas + 0.03, result


@pytest.mark.parametrize("traffic, rule", [(Traffic(new_accuracy=0.70), "feedback_accuracy"),
                                          (Traffic(new_error_rate=0.03), "error_rate"),
                                          (Traffic(new_error_rate=0.5), "error_rate")])
def test_a_worse_version_is_rolled_back_before_it_is_promoted(policy, traffic, rule):
    result = rollback_rate(policy, traffic, ROLLOUTS, seed=2)
    assert result["rolled_back"] >= 0.95 and max(result["by_rule"], key=result["by_rule"].get) == rule, result


def test_a_version_within_the_allowed_error_increase_is_rarely_rolled_back(policy):
    """0.5 % -> 1 % errors is within the default ``max_increase`` of one point: no reason to roll back."""
    result = rollback_rate(policy, Traffic(new_error_rate=0.01), ROLLOUTS, seed=3)
    assert result["by_rule"].get("error_rate", 0) / ROLLOUTS <= policy.rules["error_rate"]["alpha"] + 0.03, result
