"""bench/gateway_cpu_bench.py: the gateway's CPU per cache miss against a tiny model, split into preprocess and the
rest, on photos made here (so the test needs no shared folder); and its row in bench/run_all.py."""
from __future__ import annotations

import io

import pytest
from PIL import Image

import bench.gateway_cpu_bench as gateway_cpu_bench
import bench.run_all as run_all


@pytest.fixture
def photo_folder(tmp_path):
    for i in range(6):
        img = Image.linear_gradient("L").resize((400, 300)).convert("RGB")
        img.paste((40 * i, 200, 30), (50, 50, 150, 150))  # each photo its own pixels, so each is a miss
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        folder = tmp_path / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(buf.getvalue())
    return tmp_path


def test_the_bench_writes_cpu_per_miss_split_into_preprocess_and_rest(photo_folder, monkeypatch):
    written = {}
    monkeypatch.setattr(gateway_cpu_bench, "write_result", lambda name, result: written.update({name: result}))
    assert gateway_cpu_bench.main(["--data", str(photo_folder), "--photos", "6", "--rounds", "2",
                                   "--concurrency", "2"]) == 0
    result = written["gateway_cpu"]
    assert (result["photos"], result["rounds"], result["concurrency"]) == (6, 2, 2)
    assert result["errors"] == 0 and result["cache_hit_share_max"] == 0.0, "every request a cache miss"
    assert result["cache_lookups_skipped"] == 0, "every miss looked up and stored in Redis"
    cpu = result["gateway_cpu_ms_per_miss"]
    assert len(cpu["rounds"]) == 2 and all(ms > 0 for ms in cpu["rounds"])
    assert cpu["preprocess"] > 0
    assert cpu["rest"] == pytest.approx(cpu["median"] - cpu["preprocess"])
    assert result["met"] == (cpu["median"] <= result["target_ms"])
    assert 0 <= result["gateway_loop_thread_cpu_ms_per_miss"] and result["model_server_cpu_ms_per_miss"] > 0


def test_run_all_lists_the_gateway_cpu_bench_and_reports_its_row(monkeypatch):
    assert run_all.SCRIPTS["gateway_cpu"] == ["-m", "bench.gateway_cpu_bench"]
    stored = {"gateway_cpu": {"photos": 700, "concurrency": 32, "gateway_cpu_ms_per_miss": {
        "rounds": [3.5, 3.4, 3.6], "median": 3.5, "preprocess": 1.7, "rest": 1.8}}}
    monkeypatch.setattr(run_all, "load", lambda name: stored.get(name, {}))
    rows = [row for row in run_all.rows() if row["source"] == "gateway_cpu.json"]
    assert len(rows) == 1 and "3.50 ms = 1.70 + 1.80 ms" in rows[0]["measured"]


def test_a_profiled_run_writes_the_gateways_profile_and_no_result(photo_folder, tmp_path, monkeypatch):
    import pstats

    monkeypatch.setattr(gateway_cpu_bench, "write_result", lambda name, result: pytest.fail("wrote a result"))
    profile = tmp_path / "gateway.prof"
    assert gateway_cpu_bench.main(["--data", str(photo_folder), "--photos", "6", "--rounds", "1",
                                   "--concurrency", "2", "--profile", str(profile)]) == 0
    functions = {(path.rsplit("/", 1)[-1], name) for path, _, name in pstats.Stats(str(profile)).stats}
    assert ("classifier.py", "classify") in functions
