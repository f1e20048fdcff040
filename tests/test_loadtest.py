"""A ~30 s headless locust smoke (loadtests/) against a real local stack: HTTP and gRPC users, bad inputs that must be
rejected with a 4xx / INVALID_ARGUMENT, and the operator shifting A/B weights; it must end with 0 unexpected failures."""
from __future__ import annotations

import csv

import pytest

from loadtests.run import aggregated, run_locust
from services.stack.launch import stop_stack
from tests.test_stack import start_test_stack


@pytest.fixture(scope="module")
def stack(published_model, tmp_path_factory):
    stack = start_test_stack(published_model, tmp_path_factory.mktemp("loadtest-stack"))
    yield stack
    stop_stack(stack)


def test_locust_smoke_has_no_unexpected_failures(stack, tmp_path):
    out = tmp_path / "report"
    code = run_locust(stack.urls["gateway"], stack.urls["gateway gRPC"], users=6, spawn_rate=6, run_time="30s",
                      out=out, admin_token=stack.admin_token)
    with open(out / "locust_stats.csv", newline="") as f:
        rows = {(row["Type"], row["Name"]): int(row["Request Count"]) for row in csv.DictReader(f)}
    failures = (out / "locust_failures.csv").read_text()
    total = aggregated(out)
    assert int(total["Failure Count"]) == 0, failures
    assert code == 0, (out / "locust.out").read_text()[-2000:]
    assert int(total["Request Count"]) > 50
    assert any(kind == "gRPC" and count > 0 for (kind, _), count in rows.items()), rows
    assert any(name.startswith("POST /v1/classify [bad:") for _, name in rows), rows
    assert rows.get(("PUT", "PUT /v1/admin/routing"), 0) >= 2, rows
    assert (out / "report.html").stat().st_size > 0
