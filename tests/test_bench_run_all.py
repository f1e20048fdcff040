"""bench/run_all.py runs every benchmark it lists; a listed script that is missing is a failure, not a skip."""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import bench.run_all as run_all


def test_every_listed_benchmark_exists():
    for name, args in run_all.SCRIPTS.items():
        found = importlib.util.find_spec(args[1]) is not None if args[0] == "-m" else Path(args[0]).is_file()
        assert found, (name, args)


def test_a_missing_benchmark_script_fails_the_run_instead_of_being_skipped(monkeypatch):
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1)

    monkeypatch.setattr(run_all, "SCRIPTS", {"ghost": ["-m", "bench.ghost_bench"]})
    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    assert run_all.run("ghost", 1.0) is False
    assert calls and calls[0][1:3] == ["-m", "bench.ghost_bench"]
