"""bench/faults.py counts what it claims to: the lost-request rule and the recovery time on hand-made answers, new
photos that are new bytes of a valid photo, the smallest real run (one Redis SIGSTOP under a few dozen requests,
two tiny model versions) with its counts adding up and every process it started gone afterwards, and a rolling
update of the gateway under load that loses nothing."""
from __future__ import annotations

import io
import os
import shutil

import pytest
from PIL import Image

from bench.faults import (
    LOST, OK, UNAVAILABLE, Answer, Photos, Timing, classify_outcome, recovery_seconds, run_bench, summarise,
    timeline, with_comment,
)


@pytest.mark.parametrize("status, retry_after, outcome", [
    (200, None, OK),
    (503, "2", UNAVAILABLE),
    (503, " 1 ", UNAVAILABLE),
    (503, "Wed, 21 Oct 2026 07:28:00 GMT", UNAVAILABLE),
    (503, None, LOST),  # a 503 that does not say when to come back
    (503, "", LOST),
    (503, "soon", LOST),
    (500, "2", LOST),
    (404, None, LOST),  # e.g. a pinned version that vanished
    (400, None, LOST),
    (None, None, LOST),  # refused, reset or timed out: no answer at all
])
def test_lost_is_anything_but_success_or_503_with_retry_after(status, retry_after, outcome):
    assert classify_outcome(status, retry_after) == outcome


def answer(sent, done, outcome=OK, version=1, cached=False, detail="200"):
    return Answer(sent, done, outcome, detail, version if outcome == OK else None, cached)


def test_recovery_runs_from_the_dependency_back_to_the_last_failure():
    back = 10.0
    answers = [answer(9.0, 9.1), answer(9.5, 10.4, UNAVAILABLE, detail="503"),
               answer(10.0, 11.5, LOST, detail="ServerTimeoutError"), answer(11.6, 11.7)]
    assert recovery_seconds(answers, back) == pytest.approx(1.5)
    # failures that all came before the dependency was back cost no recovery time
    assert recovery_seconds([answer(9.0, 9.5, LOST, detail="500"), answer(10.1, 10.2)], back) == 0.0
    # a request stranded until its deadline counts its whole wait, though later ones were served meanwhile
    stranded = [answer(9.9, 20.0, UNAVAILABLE, detail="503"), answer(10.5, 10.6), answer(11.0, 11.1)]
    assert recovery_seconds(stranded, back) == pytest.approx(10.0)
    # no success for a request sent after the last failed one: not recovered within the window
    assert recovery_seconds([answer(10.0, 10.1), answer(10.2, 12.0, LOST, detail="500")], back) is None
    assert recovery_seconds([answer(10.0, 10.1)], back) == 0.0
    assert recovery_seconds([], back) is None


def test_summary_counts_each_answer_once_and_flags_the_ones_off_the_pinned_version():
    answers = [answer(0.0, 0.1, cached=True), answer(1.0, 1.2), answer(1.1, 1.3, UNAVAILABLE, detail="503"),
               answer(1.2, 2.5, LOST, detail="500"), answer(2.1, 2.2, version=2), answer(2.6, 2.7, cached=True)]
    figures = summarise(answers, fault_at=1.0, back_at=2.0, pinned=1)
    assert (figures["requests"], figures["ok"], figures["unavailable_503"], figures["lost"]) == (6, 4, 1, 1)
    assert figures["lost_by_kind"] == {"500": 1}
    assert figures["recovery_s"] == pytest.approx(0.5)
    assert figures["answered_by_version"] == {"1": 3, "2": 1}
    assert figures["answers_off_pinned_version"] == 1
    assert figures["cached_answers_during_fault"] == 0
    assert figures["cache_hits_resume_s"] == pytest.approx(0.7)


def test_the_timeline_bins_each_answer_once_by_when_it_came_and_how():
    answers = [answer(-0.9, -0.8), answer(-0.7, -0.6), answer(0.1, 0.3, UNAVAILABLE, detail="503"),
               answer(0.2, 1.1, LOST, detail="500"), answer(1.0, 1.05), answer(1.2, 1.3)]
    line = timeline(answers, fault_at=0.0, back_at=1.0, recovery_s=0.1, bin_s=0.5)
    assert (line["first_s"], line["back_s"], line["recovered_s"]) == (-1.0, 1.0, pytest.approx(1.1))
    assert line[OK] == [2, 0, 0, 0, 2] and line[UNAVAILABLE] == [0, 0, 1, 0, 0] and line[LOST] == [0, 0, 0, 0, 1]
    assert line["slowest_ms"] == [pytest.approx(100.0), 0.0, pytest.approx(200.0), 0.0, pytest.approx(900.0)]
    assert timeline(answers, 0.0, 1.0, None)["recovered_s"] is None


def test_the_fault_plot_draws_each_answer_where_it_came_and_marks_the_fault_and_the_recovery():
    import xml.etree.ElementTree as ElementTree

    from bench.plots import LABEL_W, PLOT_W, fault_timelines

    frozen = {"bin_s": 0.5, "first_s": -1.0, "back_s": 1.0, "recovered_s": 2.0, OK: [2, 2, 0, 0, 4, 4],
              UNAVAILABLE: [0, 0, 1, 1, 0, 0], LOST: [0, 0, 0, 1, 0, 0], "slowest_ms": [5, 5, 9, 9, 5, 5]}
    published = {"bin_s": 0.5, "first_s": -1.0, "back_s": 0.0, "recovered_s": None, OK: [2, 2, 2, 2, 2, 2],
                 UNAVAILABLE: [0] * 6, LOST: [0] * 6, "slowest_ms": [5] * 6}
    unmeasured = {key: value for key, value in published.items() if key != "recovered_s"}
    svg = ElementTree.fromstring(fault_timelines([("frozen", frozen), ("published", published),
                                                  ("unmeasured", unmeasured)], "title"))
    ns = "{http://www.w3.org/2000/svg}"
    strips = svg.findall(f"{ns}g")
    assert [g.get("data-label") for g in strips] == ["frozen", "published", "unmeasured"]
    x = lambda seconds: LABEL_W + (seconds + 1.0) / 3.0 * PLOT_W  # noqa: E731 - the axis runs from -1 to 2 s
    ok = [r for r in strips[0].findall(f"{ns}rect") if r.get("class") == "ok"]
    assert [round(float(r.get("x"))) for r in ok] == [round(x(t)) for t in (-1.0, -0.5, 1.0, 1.5)]
    heights = [float(r.get("height")) for r in ok]
    assert heights[2] == pytest.approx(2 * heights[0], rel=1e-3)  # 4 answers a bin against 2: twice as high
    lost = [r for r in strips[0].findall(f"{ns}rect") if r.get("class") == "lost"]
    assert len(lost) == 1 and round(float(lost[0].get("x"))) == round(x(0.5))
    fault = next(r for r in strips[0].findall(f"{ns}rect") if r.get("class") == "fault")
    assert (round(float(fault.get("x"))), round(float(fault.get("width")))) == (round(x(0)), round(x(1) - x(0)))
    recovered = strips[0].find(f"{ns}line[@class='recovered']")
    assert round(float(recovered.get("x1"))) == round(x(2.0))
    # a publish has no span to shade, and a run that did not recover says so
    assert strips[1].find(f"{ns}line[@class='fault']") is not None
    assert any(t.text == "not recovered" for t in strips[1].findall(f"{ns}text"))
    # a timeline whose recovery was not measured (an overload phase with none after it) claims nothing
    assert not any(t.text == "not recovered" for t in strips[2].findall(f"{ns}text"))
    assert strips[2].find(f"{ns}line[@class='recovered']") is None


def test_new_photos_are_new_bytes_of_the_same_valid_photo():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buffer, "JPEG")
    photos = Photos([buffer.getvalue()] * 3, hot_count=2)
    sent = [photos.next_mixed() for _ in range(8)]
    hot = [data for data, new in sent if not new]
    fresh = [data for data, new in sent if new]
    assert len(hot) == len(fresh) == 4 and len(set(hot)) == 2 and len(set(fresh)) == 4
    for data in fresh + [with_comment(buffer.getvalue(), "x" * 300)]:
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (32, 24) and image.convert("RGB").getpixel((5, 5))[0] > 150


def test_a_redis_sigstop_run_counts_every_request_and_stops_its_processes():
    pids_before = set(os.listdir("/proc"))
    result = run_bench(["redis_sigstop"], Timing(warm_s=1.0, down_s=1.5, after_s=1.5), concurrency=2, tiny=True,
                       think_s=0.05, max_requests=120)
    row = result["scenarios"]["redis_sigstop"]
    assert 30 <= row["requests"] <= 120, row
    assert row["ok"] + row["unavailable_503"] + row["lost"] == row["requests"], row
    assert row["lost"] == sum(row["lost_by_kind"].values()), row
    assert sum(row["answered_by_version"].values()) == row["ok"], row
    assert row["new_photo_share"] == pytest.approx(0.5, abs=0.05), row
    # the freeze took: nothing answered while Redis was stopped came from the cache; the cache answered again after
    assert row["fault_to_back_s"] >= 1.5 and row["cached_answers_during_fault"] == 0, row
    assert row["cache_hits_resume_s"] is not None, row
    assert row["redis_keys_per_request"] is not None and row["routing_table_kept"] in (True, False), row
    assert row["gateway_rss_mb"][0] > 0 and row["model_server_rss_mb"][1] > 0, row
    assert sum(row["readyz_during_outage"].values()) >= 1 and set(row["admin_during_outage"]) == {
        "audit", "feedback"}, row
    # feedback on a real answer, sent while Redis is frozen: refused so the client retries, then recorded when it
    # does (its probe used to send no token, so it read HTTP 400 whatever the gateway did)
    assert row["admin_during_outage"]["feedback"] == "HTTP 503 + Retry-After", row
    assert row["feedback_sent_again_after"] == "HTTP 200", row
    assert result["targets"]["feedback_kept"]["met"], result["targets"]
    assert "lost" in result["targets"] and "recovery" in result["targets"], result["targets"]
    shutil.rmtree(result["logs"], ignore_errors=True)
    left = {pid for pid in set(os.listdir("/proc")) - pids_before if pid.isdigit()}
    started_by_us = [pid for pid in left if _parent(pid) == os.getpid()]
    assert started_by_us == [], started_by_us


def test_a_gateway_rolling_update_loses_nothing_and_the_new_gateway_serves_on():
    """The old gateway's SIGTERM under load (the balancer still sending to it for a while, retrying a refused
    connect on the new one): every request answered, the old gateway exited 0, and the scenario after it runs
    against the new gateway."""
    result = run_bench(["gateway_rolling_update", "baseline"], Timing(warm_s=1.0, down_s=1.0, after_s=1.5),
                       concurrency=8, tiny=True, max_requests=5000)
    row = result["scenarios"]["gateway_rolling_update"]
    assert row["requests"] >= 100 and row["ok"] == row["requests"], row
    assert row["old_gateway_exit_code"] == 0 and row["old_gateway_stopped_in_s"] < 5, row
    after = result["scenarios"]["baseline"]
    assert after["ok"] == after["requests"] > 0, after
    shutil.rmtree(result["logs"], ignore_errors=True)


def _parent(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_targets_and_the_report_table_show_what_was_not_met(monkeypatch):
    import bench.run_all as run_all
    from bench.faults import targets

    base = {"requests": 100, "ok": 100, "unavailable_503": 0, "lost": 0, "lost_by_kind": {}, "recovery_s": 0.0,
            "slowest_answer_s": 0.1, "redis_keys_per_request": 1.5, "gateway_rss_mb": [90, 95],
            "model_server_rss_mb": [600, 610], "answers_off_pinned_version": 0}
    scenarios = {
        "redis_sigkill": {**base, "routing_intact": False, "audit_intact": True, "answers_off_pinned_version": 40,
                          "admin_during_outage": {"audit": "HTTP 503 + Retry-After", "feedback": "HTTP 500"},
                          "feedback_sent_again_after": "HTTP 200"},
        "model_server_sigkill": {**base, "ok": 80, "unavailable_503": 15, "lost": 5,
                                 "lost_by_kind": {"HTTP 500": 5}, "recovery_s": None,
                                 "admin_during_outage": {"audit": "HTTP 200", "feedback": "HTTP 200"},
                                 "feedback_sent_again_after": "HTTP 200"},
    }
    hits = {"requests": 50, "cache_hits": 50, "redis_keys_per_cache_hit": 1.0}
    figures = targets(scenarios, hits)
    assert figures["lost"]["value"] == 5 and not figures["lost"]["met"]
    assert figures["recovery"]["value"] == "not recovered" and not figures["recovery"]["met"]
    assert not figures["keys_per_hit"]["met"] and not figures["state_after_restart"]["met"]
    assert targets({"redis_sigstop": base}, {"redis_keys_per_cache_hit": 0.0})["keys_per_hit"]["met"]
    # feedback answered 500 while Redis was down: the client does not know to send it again
    assert figures["feedback_kept"]["value"] == "1 of 2" and not figures["feedback_kept"]["met"]

    result = {"scenarios": scenarios, "order": ["redis_sigkill", "model_server_sigkill"], "targets": figures,
              "cache_hits_only": hits, "concurrency": 8, "timing": {"warm_s": 1, "down_s": 1, "after_s": 1},
              "label": "before the fixes", "machine": {"revision": "abc"}}
    monkeypatch.setattr(run_all, "load", lambda name: result if name == "faults" else {})
    report = {"machine": {"cores": 2, "cpu": "cpu", "python": "3", "revision": "abc", "measured_at": "now"},
              "rows": run_all.rows(), "gateway_cells": [], "faults": run_all.fault_rows()}
    text = run_all.markdown(report)
    assert "| requests lost under faults" in text and "**before the fixes**" in text
    lines = [line for line in text.splitlines() if line.startswith("| Redis SIGKILL") or
             line.startswith("| model server SIGKILL")]
    assert lines[0].startswith("| Redis SIGKILL") and "routing intact: **no**, audit intact: yes" in lines[0]
    assert "feedback HTTP 500 (sent again after: HTTP 200)" in lines[0]
    assert "| **5** | 15 | not recovered |" in lines[1] and "5 × HTTP 500" in lines[1]
    assert "](plots/faults.svg)" not in text  # no timelines in these results: nothing to draw
    for scenario in scenarios.values():
        scenario["timeline"] = timeline([answer(0.0, 0.1)], 0.0, 0.0, 0.0)
    report["faults"] = run_all.fault_rows()
    assert "](plots/faults.svg)" in run_all.markdown(report)
