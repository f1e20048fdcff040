"""The rollout controller's pure parts: policy validation and the judging rules (no processes)."""
from __future__ import annotations

import json
import math

import pytest

from services.rollout import judge
from services.rollout.judge import (ADVANCE, BREACH, HOLD, INSUFFICIENT, PASS, ROLLBACK, SKIPPED, Figures, Verdict,
                                    decide, figures_from_status, sequential_log_evidence)
from services.rollout.policy import DEFAULT_POLICY, PolicyError, load_policy, parse_policy

RULES = parse_policy({}).rules


# ---------------------------------------------------------------------------------------------- policy
def test_default_policy_is_shadow_then_5_25_50_100_with_holds():
    policy = load_policy(None)
    assert [(s.name, s.weight, s.shadow) for s in policy.steps] == [
        ("shadow", 0, True), ("canary-5", 5, False), ("canary-25", 25, False), ("canary-50", 50, False),
        ("full", 100, False)]
    assert all(s.hold_seconds > 0 and s.min_requests > 0 for s in policy.steps)
    assert set(policy.rules) == {"error_rate", "p95_latency", "shadow_agreement", "feedback_accuracy", "offline"}


def test_policy_files_yaml_and_json_fill_in_defaults(tmp_path):
    (tmp_path / "p.yaml").write_text("tick_seconds: 0.5\nsteps:\n  - {weight: 50, hold_seconds: 2}\n"
                                     "  - {name: all, weight: 100}\nrules:\n  feedback_accuracy: {min_feedback: 5}\n")
    (tmp_path / "p.json").write_text(json.dumps({"steps": [{"weight": 100}]}))
    policy = load_policy(tmp_path / "p.yaml")
    assert policy.tick_seconds == 0.5
    assert [(s.name, s.weight, s.hold_seconds) for s in policy.steps] == [("step-0", 50, 2), ("all", 100, 0)]
    assert policy.rules["feedback_accuracy"] == {"alpha": 0.05, "min_feedback": 5}
    assert policy.rules["error_rate"] == DEFAULT_POLICY["rules"]["error_rate"]
    assert load_policy(tmp_path / "p.json").steps[0].weight == 100
    assert parse_policy(policy.to_json()) == policy


@pytest.mark.parametrize("data, message", [
    ([1, 2], "must be a mapping"),
    ({"stepz": []}, "unknown field 'stepz'"),
    ({"steps": []}, "non-empty list"),
    ({"steps": [{"weight": 50}]}, "last step must have weight 100"),
    ({"steps": [{"weight": 50}, {"weight": 25}, {"weight": 100}]}, "steps[1].weight: 25 is lower"),
    ({"steps": [{"weight": 101}]}, "steps[0].weight: must be a percentage 0..100, got 101"),
    ({"steps": [{"weight": "50"}, {"weight": 100}]}, 'steps[0].weight: must be a percentage 0..100, got "50"'),
    ({"steps": [{"weight": True}]}, "steps[0].weight: must be a percentage"),
    ({"steps": [{"weight": 0, "shadow": False}, {"weight": 100}]}, "set shadow: true"),
    ({"steps": [{"hold_seconds": 3}]}, "'weight' is required"),
    ({"steps": [{"weight": 100, "hold": 3}]}, "steps[0]: unknown field 'hold'"),
    ({"steps": [{"weight": 100, "hold_seconds": -1}]}, "hold_seconds: must be seconds >= 0"),
    ({"steps": [{"weight": 100, "hold_seconds": float("inf")}]}, "hold_seconds: must be seconds >= 0"),
    ({"steps": [{"weight": 100, "min_requests": 2.5}]}, "min_requests: must be an integer"),
    ({"steps": [{"name": "a", "weight": 50}, {"name": "a", "weight": 100}]}, "step names must differ"),
    ({"rules": {"accuracy": {}}}, "unknown rule 'accuracy'"),
    ({"rules": {"feedback_accuracy": {"alpha": 0.7}}}, "rules.feedback_accuracy.alpha: must be a level"),
    ({"rules": {"error_rate": {"max_increase": 0.1, "min": 3}}}, "rules.error_rate: unknown field 'min'"),
    ({"rules": {"offline": {"required": "yes"}}}, "rules.offline.required: must be true or false"),
    ({"tick_seconds": 0}, "tick_seconds: must be seconds > 0"),
    ({"candidate_unavailable_seconds": -1}, "candidate_unavailable_seconds: must be seconds >= 0"),
])
def test_bad_policies_are_refused_naming_the_field(data, message):
    with pytest.raises(PolicyError) as info:
        parse_policy(data, "p.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("p.yaml")


def test_unreadable_or_unparsable_policy_files_are_refused(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policy(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------- figures
def test_figures_from_status_turn_rates_back_into_counts():
    status = {"versions": {"2": {"requests": 40, "error_rate": 0.05, "shadow_requests": 30, "shadow_agreement": 0.9,
                                 "p95_ms": 3.0, "misses": 12, "miss_p95_ms": 12.5,
                                 "feedback": {"correct": 7, "total": 9}}}}
    assert figures_from_status(status, 2) == Figures(40, 2, 30, 27, 7, 9, misses=12, miss_p95_ms=12.5)
    assert figures_from_status(status, 3) == Figures()
    assert figures_from_status(status, 2, with_feedback=False).feedback_total == 0


def test_figures_since_a_base_and_after_a_gateway_restart():
    base = Figures(100, 5, 50, 40, 10, 12, 60, 9.0)
    assert Figures(150, 6, 70, 55, 13, 20, 90, 11.0).since(base) == Figures(50, 1, 20, 15, 3, 8, 30, 11.0)
    # the gateway restarted: its per-process counters start again from zero, feedback (in Redis) kept counting
    assert Figures(30, 1, 10, 9, 14, 20, 25, 8.0).since(base) == Figures(30, 1, 10, 9, 4, 8, 25, 8.0)
    assert Figures(1, 0, 0, 0, 0, 0, 1, 5.0).plus(Figures(2, 1, 0, 0, 1, 1, 2, 7.0)) == \
        Figures(3, 1, 0, 0, 1, 1, 3, 7.0)
    assert Figures.from_json(base.to_json()) == base
    # saved by a controller that judged the p95 of every answer: that figure is dropped, the counts kept
    assert Figures.from_json({"requests": 100, "errors": 5, "p95_ms": 9.0}) == Figures(100, 5)


def test_replica_figures_count_each_replica_from_its_own_baseline_and_the_feedback_once():
    from services.rollout.replica_figures import FEEDBACK, ReplicaFigures, replica_key

    def body(instance, requests, errors, correct, total):
        return {"instance": {"id": instance, "started": 0.0}, "versions": {"2": {
            "requests": requests, "error_rate": errors / requests, "feedback": {"correct": correct, "total": total}}}}

    at_start = ReplicaFigures({"http://a": body("a1", 100, 10, 5, 8), "http://b": body("b1", 100, 10, 5, 8)})
    baseline = at_start.baseline(2)
    assert set(baseline) == {"http://a#a1", "http://b#b1", FEEDBACK}
    later = ReplicaFigures({"http://a": body("a1", 150, 11, 9, 12), "http://b": body("b2", 20, 1, 9, 12)})
    # b restarted: its 20 whole (these rows count no misses: every answer taken as computed)
    assert later.since(2, baseline) == Figures(50 + 20, 1 + 1, 0, 0, 4, 4, misses=49 + 19)
    flat = Figures(200, 20, 0, 0, 5, 8).to_json()  # a state saved before baselines were kept per source
    assert later.since(2, flat) == Figures(170, 12, 0, 0, 4, 4, misses=158)  # the sum below the base: taken whole
    assert replica_key("http://c", {"versions": {}}) == "http://c"  # a gateway whose status names no instance


# ---------------------------------------------------------------------------------------------- rules
def test_sequential_evidence_is_the_normal_mixture_ratio():
    """mSPRT's log ratio for a difference of 0.1 measured with variance 0.001, mixture N(0, 0.05^2), by hand."""
    v, t2 = 0.001, 0.0025
    assert sequential_log_evidence(0.1, v) == pytest.approx(0.5 * math.log(v / (v + t2)) + 0.01 * t2 / (2 * v * (v + t2)))
    assert sequential_log_evidence(0.0, v) < 0  # nothing measured: the ratio is below 1
    assert sequential_log_evidence(0.2, v) > sequential_log_evidence(0.1, v)  # more difference, more evidence
    with pytest.raises(ValueError):
        sequential_log_evidence(0.1, 0.0)


def computed(requests: int, errors: int) -> Figures:
    """A version's figures with no cache hits: every request computed, ``errors`` of them failed."""
    return Figures(requests=requests, errors=errors, misses=requests - errors)


def test_error_rate_rule():
    params = RULES["error_rate"]  # max_increase 0.01, alpha 0.01, min_requests 100
    stable = computed(1000, 10)
    assert judge.judge_error_rate(computed(99, 50), stable, params).outcome == INSUFFICIENT
    assert judge.judge_error_rate(computed(100, 2), stable, params).outcome == PASS
    # 4 % against 1 % + 1 %: above the limit, but 4 errors in 100 requests are no evidence yet
    noisy = judge.judge_error_rate(computed(100, 4), stable, params)
    assert noisy.outcome == PASS and noisy.figures["sequential_p"] > 0.01
    breach = judge.judge_error_rate(computed(100, 20), stable, params)
    assert breach.outcome == BREACH and "error rate 20.00% of 100 cache misses vs stable 1.00% + 1.00%" in \
        breach.reason
    assert judge.judge_error_rate(computed(1000, 60), stable, params).outcome == BREACH
    assert judge.judge_error_rate(computed(100, 1), Figures(), params).outcome == PASS
    assert judge.judge_error_rate(computed(100, 100), Figures(), params).outcome == BREACH


def test_a_new_version_with_a_cold_cache_is_judged_on_the_errors_of_its_misses():
    """The model server fails 2 % of the calls, whatever the version: the stable version, answered 96 % from the
    cache, shows 0.08 % of its requests failed, the new one, whose cache starts empty, 2 %. Of what each had to
    compute, both failed 2 %: no breach. A version that fails more of its own misses is still breached."""
    status = {"versions": {
        "1": {"requests": 50000, "error_rate": 0.0008, "cache_hit_rate": 0.96, "misses": 1960},
        "2": {"requests": 5000, "error_rate": 0.02, "cache_hit_rate": 0.0, "misses": 4900}}}
    verdict = judge.judge_error_rate(figures_from_status(status, 2), figures_from_status(status, 1),
                                     RULES["error_rate"])
    assert verdict.outcome == PASS, verdict.reason
    status["versions"]["2"].update(error_rate=0.06, misses=4700)
    assert judge.judge_error_rate(figures_from_status(status, 2), figures_from_status(status, 1),
                                  RULES["error_rate"]).outcome == BREACH
    # A gateway that does not count its misses: every answer taken as computed, as before.
    assert figures_from_status({"versions": {"2": {"requests": 100, "error_rate": 0.03}}}, 2).computing == 100


def test_p95_latency_rule():
    params = RULES["p95_latency"]  # 1.5 x stable + 25 ms, min 100
    stable = Figures(requests=500, misses=500, miss_p95_ms=20.0)
    assert judge.judge_p95_latency(Figures(requests=100, misses=100, miss_p95_ms=55.0), stable, params).outcome \
        == PASS
    breach = judge.judge_p95_latency(Figures(requests=100, misses=100, miss_p95_ms=55.1), stable, params)
    assert breach.outcome == BREACH and "cache-miss p95 55.1 ms > 1.5 x stable 20.0 ms + 25 ms" == breach.reason
    slow = Figures(requests=1000, misses=99, miss_p95_ms=500.0)  # 100 answered, but 99 computed
    assert judge.judge_p95_latency(slow, stable, params).outcome == INSUFFICIENT
    assert judge.judge_p95_latency(Figures(requests=100, misses=100, miss_p95_ms=5.0), Figures(), params).outcome \
        == INSUFFICIENT


def test_a_new_version_with_a_cold_cache_is_judged_on_its_misses_against_the_stable_ones():
    """A popular service answers the stable version mostly from the cache; the new version's cache starts empty.
    Both compute an answer in the same time: the latency rule must not take the empty cache for a slow version."""
    status = {"versions": {
        "1": {"requests": 5000, "p95_ms": 3.0, "cache_hit_rate": 0.96, "misses": 200, "miss_p95_ms": 40.0},
        "2": {"requests": 150, "p95_ms": 40.0, "cache_hit_rate": 0.0, "misses": 150, "miss_p95_ms": 40.0}}}
    verdict = judge.judge_p95_latency(figures_from_status(status, 2), figures_from_status(status, 1),
                                      RULES["p95_latency"])
    assert verdict.outcome == PASS, verdict.reason
    status["versions"]["2"]["miss_p95_ms"] = 90.0  # slower at computing: breached
    assert judge.judge_p95_latency(figures_from_status(status, 2), figures_from_status(status, 1),
                                   RULES["p95_latency"]).outcome == BREACH


def test_shadow_agreement_rule():
    params = RULES["shadow_agreement"]  # 0.9, min 100
    assert judge.judge_shadow_agreement(Figures(), params).outcome == SKIPPED
    assert judge.judge_shadow_agreement(Figures(shadow_requests=99, shadow_agreements=0), params).outcome \
        == INSUFFICIENT
    assert judge.judge_shadow_agreement(Figures(shadow_requests=100, shadow_agreements=90), params).outcome == PASS
    breach = judge.judge_shadow_agreement(Figures(shadow_requests=100, shadow_agreements=89), params)
    assert breach.outcome == BREACH and "89.0% of 100 mirrored requests < 90%" in breach.reason


def test_feedback_accuracy_rule_is_one_sided():
    params = {"alpha": 0.05, "min_feedback": 30}
    stable = Figures(feedback_correct=800, feedback_total=1000)
    assert judge.judge_feedback_accuracy(Figures(feedback_correct=0, feedback_total=29), stable, params).outcome \
        == INSUFFICIENT
    assert judge.judge_feedback_accuracy(Figures(feedback_correct=30, feedback_total=30), Figures(
        feedback_correct=0, feedback_total=29), params).outcome == INSUFFICIENT
    worse = judge.judge_feedback_accuracy(Figures(feedback_correct=120, feedback_total=200), stable, params)
    assert worse.outcome == BREACH and worse.figures["sequential_p"] < 0.05 and "sequential p" in worse.reason
    slightly = judge.judge_feedback_accuracy(Figures(feedback_correct=75, feedback_total=100), stable, params)
    assert slightly.outcome == PASS  # 75 % vs 80 %: not enough evidence
    better = judge.judge_feedback_accuracy(Figures(feedback_correct=990, feedback_total=1000), stable, params)
    assert better.outcome == PASS and better.figures["sequential_p"] == 1.0  # a better version never breaches


def test_offline_rule_reads_metrics_json(tmp_path):
    params = dict(RULES["offline"])  # test_accuracy, max_drop 0.02, not required
    for name, accuracy in (("1", 0.90), ("2", 0.89), ("3", 0.85)):
        (tmp_path / name / "assets.extra").mkdir(parents=True)
        (tmp_path / name / "assets.extra" / "metrics.json").write_text(json.dumps({"test_accuracy": accuracy}))
    (tmp_path / "4" / "assets.extra").mkdir(parents=True)
    (tmp_path / "4" / "assets.extra" / "metrics.json").write_text("{not json")
    scores = {v: judge.read_offline_scores(tmp_path / v) for v in "12345"}
    assert scores["4"] is None and scores["5"] is None and judge.read_offline_scores(None) is None
    assert judge.judge_offline(scores["2"], scores["1"], params).outcome == PASS
    breach = judge.judge_offline(scores["3"], scores["1"], params)
    assert breach.outcome == BREACH and "0.8500 < stable 0.9000 - 0.02" in breach.reason
    assert judge.judge_offline(None, scores["1"], params).outcome == SKIPPED
    assert judge.judge_offline(scores["3"], None, params).outcome == SKIPPED
    assert judge.judge_offline(None, scores["1"], {**params, "required": True}).outcome == BREACH


# ---------------------------------------------------------------------------------------------- decisions
def _verdict(rule, outcome):
    return Verdict(rule, outcome, f"{rule} {outcome}", {})


def test_decide_rolls_back_at_the_first_breach_whatever_the_timers():
    verdicts = [_verdict("error_rate", PASS), _verdict("shadow_agreement", BREACH),
                _verdict("feedback_accuracy", BREACH)]
    decision = decide(verdicts, held_seconds=0, hold_seconds=600, step_requests=0, min_requests=100)
    assert (decision.outcome, decision.rule, decision.reason) == (ROLLBACK, "shadow_agreement",
                                                                 "shadow_agreement breach")


@pytest.mark.parametrize("held, requests, outcome", [(5, 100, HOLD), (10, 99, HOLD), (10, 100, ADVANCE)])
def test_decide_advances_only_after_hold_time_and_request_count(held, requests, outcome):
    verdicts = [_verdict("error_rate", PASS), _verdict("feedback_accuracy", INSUFFICIENT)]
    assert decide(verdicts, held, 10, requests, 100).outcome == outcome


def test_online_rules_in_a_fixed_order():
    verdicts = judge.judge_online(Figures(), Figures(), RULES)
    assert [v.rule for v in verdicts] == ["error_rate", "p95_latency", "shadow_agreement", "feedback_accuracy"]


def test_new_versions_are_appended_to_a_specific_list_and_nothing_else_changes(tmp_path):
    from services.rollout.serving_config import serve_new_versions
    from devstack.configs import model_config_text, read_model_config

    base = tmp_path / "registry" / "m"
    for name in ("1", "2", ".tmp-host-3-x", "notes"):
        (base / name).mkdir(parents=True)
    config = tmp_path / "models.config"
    config.write_text(model_config_text("m", base, [1, 2], labels={"stable": 1}))
    assert serve_new_versions(config, "m") == []
    (base / "3").mkdir()
    (base / "4").mkdir()
    assert serve_new_versions(config, "m") == [3, 4]
    assert read_model_config(config) == ("m", base, [1, 2, 3, 4], {"stable": 1})
    assert serve_new_versions(config, "m") == []  # idempotent
    latest = tmp_path / "latest.config"
    latest.write_text(model_config_text("m", base, []))  # no version yet: a latest policy serves new ones itself
    before = latest.read_text()
    assert serve_new_versions(latest, "m") == [] and latest.read_text() == before


def test_the_writable_model_config_is_seeded_once_and_never_overwritten(tmp_path):
    import subprocess
    import sys

    from services.rollout.serving_config import seed_config
    from training_job.paths import PROJECT_ROOT

    seed, config = tmp_path / "seed.config", tmp_path / "volume" / "models.config"
    seed.write_text("model_config_list { }\n")
    config.parent.mkdir()
    assert seed_config(seed, config) and config.read_text() == seed.read_text()
    config.write_text("written by the controller\n")
    seed.write_text("a new seed\n")
    assert not seed_config(seed, config) and config.read_text() == "written by the controller\n"
    assert [p.name for p in config.parent.iterdir()] == ["models.config"]  # no staging file left behind
    # the initContainers' command line
    fresh = tmp_path / "volume" / "fresh.config"
    done = subprocess.run([sys.executable, "-m", "services.rollout.serving_config", "--seed", str(seed), str(fresh)],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert done.returncode == 0 and "seeded" in done.stdout and fresh.read_text() == "a new seed\n"


IDLE_ROUTING = {"weights": {"3": 100.0}, "shadow": None, "resolved": {"3": 3}, "effective": {"3": 100.0}}


def test_retirement_keeps_the_newest_the_stable_the_routed_the_shadow_and_the_labelled():
    from services.rollout.serving_config import retirable

    listed, on_disk = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]
    # idle, stable 3 routed alone: 5 and 6 are the newest two on disk, everything else goes
    assert retirable(listed, on_disk, {}, stable=3, routing=IDLE_ROUTING, rolling=False) == [1, 2, 4]
    assert retirable(listed, on_disk, {}, stable=3, routing=IDLE_ROUTING, rolling=False, newest=3) == [1, 2]
    assert retirable(listed, on_disk, {"old": 4}, stable=3, routing=IDLE_ROUTING, rolling=False) == [1, 2]
    # an operator's hand-set split and shadow, by number and by label; a weight on a version the gateway does not
    # see AVAILABLE now (not in "effective") counts too
    routed = {"weights": {"stable": 80.0, "2": 20.0}, "shadow": "canary",
              "resolved": {"stable": 3, "2": 2, "canary": 1}, "effective": {"3": 80.0}}
    assert retirable(listed, on_disk, {}, stable=3, routing=routed, rolling=False) == [4]
    # an entry with weight 0 is still named by the table (the gateway refuses a table naming an unloaded version)
    zero = {"weights": {"3": 100.0, "4": 0.0}, "shadow": None, "resolved": {"3": 3, "4": 4}, "effective": {"3": 100.0}}
    assert retirable(listed, on_disk, {}, stable=3, routing=zero, rolling=False) == [1, 2]
    assert retirable(listed, on_disk, {}, stable=3, rolling=False,
                     routing={"weights": {"3": 100}, "shadow": 2}) == [1, 4]  # the controller's own table


def test_nothing_is_retired_during_a_rollout_without_routing_or_registry_or_when_the_list_would_empty():
    from services.rollout.serving_config import retirable

    listed, on_disk = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]
    assert retirable(listed, on_disk, {}, stable=3, routing=IDLE_ROUTING, rolling=True) == []
    assert retirable(listed, on_disk, {}, stable=3, routing=None, rolling=False) == []  # routing unreadable
    assert retirable(listed, on_disk, {}, stable=None, routing=IDLE_ROUTING, rolling=False) == []
    assert retirable(listed, [], {}, stable=3, routing=IDLE_ROUTING, rolling=False) == []  # registry not mounted
    # what stays would not be listed (nothing newer is listed yet, the stable version was hand-removed)
    assert retirable([1, 2], [1, 2, 7, 8], {}, stable=9, routing={"weights": {"9": 100}}, rolling=False) == []


def test_retired_versions_leave_the_specific_list_and_nothing_else_changes(tmp_path):
    from services.rollout.serving_config import retire_versions
    from devstack.configs import model_config_text, read_model_config

    base = tmp_path / "registry" / "m"
    for v in range(1, 6):
        (base / str(v)).mkdir(parents=True)
    config = tmp_path / "models.config"
    config.write_text(model_config_text("m", base, [1, 2, 3, 4, 5], labels={"old": 2}))
    assert retire_versions(config, "m", stable=3, routing=IDLE_ROUTING, rolling=True) == []
    assert retire_versions(config, "m", stable=3, routing=None) == []
    assert read_model_config(config)[2] == [1, 2, 3, 4, 5]
    assert retire_versions(config, "m", stable=3, routing=IDLE_ROUTING) == [1]
    assert read_model_config(config) == ("m", base, [2, 3, 4, 5], {"old": 2})
    assert 'model_platform: "tensorflow"' in config.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.config", "registry"]  # no staging file left
    assert retire_versions(config, "m", stable=3, routing=IDLE_ROUTING) == []  # idempotent
    latest = tmp_path / "latest.config"
    latest.write_text(model_config_text("m", base, []))  # a latest policy unloads old versions by itself
    before = latest.read_text()
    assert retire_versions(latest, "m", stable=3, routing=IDLE_ROUTING) == [] and latest.read_text() == before
    assert retire_versions(config, "other", stable=3, routing=IDLE_ROUTING) == []
