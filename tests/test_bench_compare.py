"""bench/compare.py: which figures of a new bench report are worse than the old one's, by direction."""
import json

from bench.compare import changes, main


def report(miss_c32_rps: float, miss_c32_p50: float, cpu_ms: float, ratio: float, text: str) -> dict:
    cell = {"requests_per_s": miss_c32_rps, "p50_ms": miss_c32_p50, "errors": 0}
    return {"machine": {"revision": "x"},
            "gateway_cells": [{"protocol": "http", "cache": "miss", "c32": cell}],
            "rows": [{"what": "gateway CPU per miss", "measured": cpu_ms, "target": "<= 2 ms"},
                     {"what": "throughput ratio", "measured": ratio, "target": ">= 0.9"},
                     {"what": "a text row", "measured": text, "target": "-"}]}


def test_each_figure_is_judged_in_its_own_direction():
    before, after = report(100, 300, 2.0, 1.0, "a"), report(90, 330, 1.5, 1.2, "b")
    found, skipped = changes(before, after)
    worse = {c.what: round(c.worse_by, 3) for c in found}
    assert worse == {"gateway http cache miss c32 req/s": 0.1, "gateway http cache miss c32 p50 ms": 0.1,
                     "gateway CPU per miss": -0.25, "throughput ratio": -0.2}
    assert skipped == ["a text row"]


def test_exit_status_says_whether_anything_is_worse_than_the_tolerance(tmp_path, capsys):
    old, slightly, much = tmp_path / "old.json", tmp_path / "slightly.json", tmp_path / "much.json"
    old.write_text(json.dumps(report(100, 300, 2.0, 1.0, "a")))
    slightly.write_text(json.dumps(report(97, 309, 2.04, 0.98, "a")))
    much.write_text(json.dumps(report(100, 300, 2.2, 1.0, "a")))
    assert main([str(old), str(slightly)]) == 0
    assert main([str(old), str(much)]) == 1
    assert "| gateway CPU per miss | 2 | 2.2 | +10.0% | **yes** |" in capsys.readouterr().out
