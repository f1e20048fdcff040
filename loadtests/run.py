"""Run the locust load test headless against the local stack for a bounded time.

    python -m loadtests.run [--users 20] [--spawn-rate 5] [--run-time 60s] [--host URL] [--grpc HOST:PORT]

Writes locust's CSV files and HTML report into var/loadtests/<timestamp>/ and prints the aggregated figures.
Exit status: 0 when no request failed unexpectedly."""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from loadtests.traffic import stack_state
from training_job.paths import PROJECT_ROOT, var_dir

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse_args(argv):
    urls = stack_state().get("urls", {})
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=urls.get("gateway"), help="gateway HTTP URL (default: the local stack's)")
    parser.add_argument("--grpc", default=urls.get("gateway gRPC"), help="gateway gRPC target host:port")
    parser.add_argument("--admin-token", default=None, help="gateway admin token (default: the local stack's)")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--spawn-rate", type=float, default=5)
    parser.add_argument("--run-time", default="60s", help="locust duration, e.g. 30s, 5m")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default var/loadtests/<timestamp>)")
    return parser.parse_args(argv)


def run_locust(host: str, grpc_target: str, users: int, spawn_rate: float, run_time: str, out: Path,
               admin_token: str | None = None, user_classes: list[str] | None = None) -> int:
    """Runs locust headless; ``user_classes`` (e.g. ["RoutingOperator"]) limits the run to those users."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "LOADTEST_GRPC_TARGET": grpc_target,
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    if admin_token:
        env["LOADTEST_ADMIN_TOKEN"] = admin_token
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host, "-u", str(users),
            "-r", str(spawn_rate), "--run-time", run_time, "--stop-timeout", "10", "--csv", str(out / "locust"),
            "--html", str(out / "report.html"), "--only-summary", "--logfile", str(out / "locust.log"),
            *(user_classes or [])]
    with open(out / "locust.out", "w") as log:
        return subprocess.run(argv, env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode


def aggregated(out: Path) -> dict[str, str]:
    with open(out / "locust_stats.csv", newline="") as f:
        return next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")


def summary(out: Path) -> str:
    row = aggregated(out)
    return (f"requests {row['Request Count']}, failures {row['Failure Count']}, "
            f"{float(row['Requests/s']):.1f} req/s, p50 {row['50%']} ms, p95 {row['95%']} ms, p99 {row['99%']} ms")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.host or not args.grpc:
        print("No local stack found (var/run/latest): `make run` first, or pass --host and --grpc.", file=sys.stderr)
        return 1
    out = args.out or var_dir() / "loadtests" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    print(f"locust: {args.users} users for {args.run_time} against {args.host} (gRPC {args.grpc}) -> {out}")
    code = run_locust(args.host, args.grpc, args.users, args.spawn_rate, args.run_time, out, args.admin_token)
    if not (out / "locust_stats.csv").exists():
        print(f"locust produced no statistics; see {out / 'locust.out'}", file=sys.stderr)
        return code or 1
    print(summary(out))
    print(f"HTML report: {out / 'report.html'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
