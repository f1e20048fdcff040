"""bench/rollout_bench.py measures what it says: the scaled policy keeps the default's shape, and the smallest real
run (a good version at a very compressed schedule) reports a promotion with its steps in order."""
from __future__ import annotations

import json

from bench.rollout_bench import main, scaled_policy
from bench.common import RESULTS_DIR
from services.rollout.policy import DEFAULT_POLICY, parse_policy


def test_scaled_policy_divides_holds_and_scales_counts():
    policy = scaled_policy(time_scale=100, request_scale=0.1)
    assert [s["hold_seconds"] for s in policy["steps"]] == [6.0] * 5
    assert [s["min_requests"] for s in policy["steps"]] == [20, 20, 50, 100, 100]
    assert policy["rules"]["feedback_accuracy"]["min_feedback"] == 3 and policy["tick_seconds"] == 0.2
    assert [s["weight"] for s in policy["steps"]] == [s["weight"] for s in DEFAULT_POLICY["steps"]]
    parse_policy(policy)  # still a valid policy
    assert scaled_policy(1, 1) == DEFAULT_POLICY
    # A p95 of 2 answers is the slower of the two: the smallest run below judged one stall a slow version.
    assert scaled_policy(600, 0.02)["rules"]["p95_latency"]["min_requests"] == 20


def test_smallest_real_run_promotes_a_good_version_through_every_step():
    name = "rollout-test"
    assert main(["--time-scale", "600", "--request-scale", "0.02", "--concurrency", "2", "--only", "promote",
                 "--result-name", name]) == 0
    result = json.loads((RESULTS_DIR / f"{name}.json").read_text())
    (RESULTS_DIR / f"{name}.json").unlink()
    [scenario] = result["scenarios"]
    assert scenario["outcome"] == "promote" and scenario["failed"] == 0
    assert [e["outcome"] for e in scenario["events"]] == ["start", "advance", "advance", "advance", "advance",
                                                          "promote"]
    times = [e["seconds_after_publish"] for e in scenario["events"]]
    assert times == sorted(times) and scenario["seconds_to_available"] > 0
    # The controller cannot start on a version before it is AVAILABLE: the bench last saw it not yet so before then.
    assert scenario["seconds_last_seen_unavailable"] <= times[0]
    assert scenario["seconds_to_outcome"] == times[-1] and scenario["answers_per_version"].get("2", 0) > 0


def test_default_policy_time_is_derived_from_the_holds_gone_through():
    from bench.rollout_bench import derived_default_seconds

    scaled = scaled_policy(time_scale=60, request_scale=0.2)  # holds of 10 s
    events = [{"outcome": "start"}, {"outcome": "advance"}, {"outcome": "rollback"}]
    assert derived_default_seconds(17.0, events, scaled) == 17.0 + 590  # the shadow step held to its end
    promoted = [{"outcome": "start"}] + [{"outcome": "advance"}] * 4 + [{"outcome": "promote"}]
    assert derived_default_seconds(53.0, promoted, scaled) == 53.0 + 5 * 590
    assert derived_default_seconds(4.6, [{"outcome": "start"}, {"outcome": "rollback"}], scaled) == 4.6
    assert derived_default_seconds(None, [], scaled) is None
    from bench.rollout_bench import without_shadow

    no_shadow = without_shadow(scaled)
    assert [s["weight"] for s in no_shadow["steps"]] == [5, 25, 50, 100]
    assert derived_default_seconds(5.0, events, no_shadow, without_shadow(DEFAULT_POLICY)) == 5.0 + 590


def test_run_all_renders_the_rollout_table():
    from bench.run_all import rollout_table

    lines = rollout_table({"time_scale": 60, "request_scale": 0.2, "concurrency": 4, "feedback_rate": 0.5,
                           "scenarios": [{"scenario": "promote", "outcome": "promote", "rule": None,
                                          "seconds_to_available": 1.4, "seconds_to_outcome": 52.9,
                                          "default_policy_seconds_derived": 3002.9, "requests": 6127,
                                          "requests_per_second": 115.0, "feedback": 3077}]})
    assert lines[-1] == "| promote | promote | 1.4 s | 52.9 s | 3002.9 s | 6127 (115.0) | 3077 |"
