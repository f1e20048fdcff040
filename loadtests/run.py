"""Run the locust load test headless against the local stack for a bounded time.

    python -m loadtests.run [--users 20] [--spawn-rate 5] [--run-time 60s] [--request-timeout 5] [--operator]
                            [--host URL] [--grpc HOST:PORT]

HTTP and gRPC users classify photos; with --operator one more user moves the gateway's A/B weights every ~9 s, and
the table it found is put back when the run stops.

Writes locust's CSV files and HTML report into var/loadtests/<timestamp>/ and prints the traffic's mix (traffic.txt)
and, from what locust and the locustfile write once every user has stopped (final_stats.json, outcome.json), a row
per request name, the requests each user class made, the failures and exceptions, and why the run failed.
Before locust starts, the gateway must answer: its /readyz 200 (waited for up to READY_WAIT_S while it says why it is
not ready, as while the stack starts) and its gRPC port a connection; otherwise the run is not started (status 2).
Exit status: 0 when every user class made requests, photos were answered, and no request failed and no user raised."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc

from loadtests import outcome
from loadtests.phone_photos import phone_photos
from loadtests.traffic import DEFAULT_REQUEST_TIMEOUT_S, describe_mix, photo_paths, stack_state
from training_job.paths import PROJECT_ROOT, var_dir

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
FINAL_STATS = "final_stats"  # locust --json-file: <out>/final_stats.json, written after the users stopped
TRAFFIC = "traffic.txt"  # the mix of the run's requests, in words (``describe_mix``)
PERCENTILES = (0.5, 0.95, 0.99)
CLASSIFY_USERS = ["PhotoClassifier", "GrpcPhotoClassifier"]  # the locustfile's users of every run
OPERATOR_USER = "RoutingOperator"  # only with --operator: it changes the gateway's routing table while the run lasts
READY_WAIT_S = 30.0  # how long a gateway that answers "not ready" is waited for before the run is given up
ANSWER_TIMEOUT_S = 5.0  # how long the gateway's /readyz and gRPC port each have to answer before the run


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
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                        help="seconds a request may take before it counts as failed (default %(default)s)")
    parser.add_argument("--operator", action="store_true",
                        help="also run the operator user, who moves the gateway's A/B weights (admin token needed); "
                             "the routing table is put back when the run stops")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default var/loadtests/<timestamp>)")
    return parser.parse_args(argv)


def stop_timeout_s(request_timeout: float) -> int:
    """How long locust lets users finish their task once the run time is up: a task makes at most two requests (the
    operator's GET then PUT), each bounded by the request timeout, so every request in flight at the end is answered
    or timed out, and counted, before locust stops waiting."""
    return math.ceil(2 * request_timeout) + 5  # whole seconds: locust takes no fractions here


def run_locust(host: str, grpc_target: str, users: int, spawn_rate: float, run_time: str, out: Path,
               admin_token: str | None = None, user_classes: list[str] | None = None,
               request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> int:
    """Runs locust headless and returns its exit status; ``user_classes``: the locustfile's users to run
    (default CLASSIFY_USERS). The phone-size photos are made first when missing (``phone_photos``), and the
    traffic's mix is written to <out>/traffic.txt."""
    out.mkdir(parents=True, exist_ok=True)
    photos = photo_paths()
    phones = phone_photos(photos)
    (out / TRAFFIC).write_text(describe_mix(photos, phones) + "\n")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "LOADTEST_GRPC_TARGET": grpc_target,
           "LOADTEST_REQUEST_TIMEOUT_S": str(request_timeout), "LOADTEST_OUTCOME_DIR": str(out),
           "LOADTEST_PHONE_PHOTOS": os.pathsep.join(map(str, phones)), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if admin_token:
        env["LOADTEST_ADMIN_TOKEN"] = admin_token
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host, "-u", str(users),
            "-r", str(spawn_rate), "--run-time", run_time, "--stop-timeout", str(stop_timeout_s(request_timeout)),
            "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--json-file", str(out / FINAL_STATS),
            "--only-summary", "--logfile", str(out / "locust.log"), *(user_classes or CLASSIFY_USERS)]
    with open(out / "locust.out", "w") as log:
        return subprocess.run(argv, env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode


def _readiness(host: str) -> tuple[bool, str]:
    """(answered, why not ready): whether anything answered {host}/readyz, and "" when it said it is ready."""
    try:
        with urllib.request.urlopen(f"{host.rstrip('/')}/readyz", timeout=ANSWER_TIMEOUT_S):
            return True, ""
    except urllib.error.HTTPError as exc:
        body = exc.read()[:300].decode("utf-8", "replace")
        try:
            body = json.loads(body).get("reason", body)
        except (ValueError, AttributeError):
            pass
        return True, f"{exc.code} {body}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))


def gateway_problem(host: str, grpc_target: str, ready_wait: float = READY_WAIT_S) -> str | None:
    """Why a run against the gateway at ``host`` (HTTP) and ``grpc_target`` would measure nothing but failures, or
    None: nothing answers /readyz, it is still not ready after ``ready_wait`` seconds, or nothing accepts a gRPC
    connection."""
    deadline = time.monotonic() + ready_wait
    while True:
        answered, why = _readiness(host)
        if not answered:
            return f"nothing answers {host.rstrip('/')}/readyz ({why})"
        if not why:
            break
        if time.monotonic() >= deadline:
            return f"the gateway at {host} is not ready after {ready_wait:g} s: {why}"
        time.sleep(1.0)
    with grpc.insecure_channel(grpc_target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=ANSWER_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            return f"nothing accepts a gRPC connection at {grpc_target} within {ANSWER_TIMEOUT_S:g} s"
    return None


def percentile(response_times: dict[int, int], fraction: float) -> int:
    """The response time (ms, rounded as locust rounds them) under which ``fraction`` of the requests were answered,
    by locust's own rule (``stats.calculate_response_time_percentile``), so the figures match its HTML report."""
    total = sum(response_times.values())
    wanted = int(total * fraction)
    processed = 0
    for ms in sorted(response_times, reverse=True):
        processed += response_times[ms]
        if total - processed <= wanted:
            return ms
    return 0


@dataclass
class Row:
    """One request name's final figures; times in ms."""

    method: str
    name: str
    requests: int
    failures: int
    response_times: dict[int, int]  # rounded ms -> requests
    max_ms: float
    first: float  # unix time of its first request
    last: float  # unix time of its last request

    @classmethod
    def from_locust(cls, entry: dict) -> "Row":
        return cls(entry["method"], entry["name"], entry["num_requests"], entry["num_failures"],
                   {int(float(ms)): n for ms, n in entry["response_times"].items()}, entry["max_response_time"] or 0,
                   entry["start_time"], entry["last_request_timestamp"] or entry["start_time"])


def final_rows(out: Path) -> list[Row]:
    """Every request name's figures from locust's final statistics, written once its users had stopped."""
    entries = json.loads((out / f"{FINAL_STATS}.json").read_text())
    return sorted((Row.from_locust(entry) for entry in entries), key=lambda row: (row.method, row.name))


def total(rows: list[Row]) -> Row:
    times: dict[int, int] = {}
    for row in rows:
        for ms, n in row.response_times.items():
            times[ms] = times.get(ms, 0) + n
    return Row("", "all", sum(r.requests for r in rows), sum(r.failures for r in rows), times,
               max((r.max_ms for r in rows), default=0), min((r.first for r in rows), default=0),
               max((r.last for r in rows), default=0))


def table(rows: list[Row]) -> list[str]:
    """A line per request name with its percentiles, then the sum of every name's requests and failures (no
    percentiles: they would mix cache hits, bad inputs and admin calls)."""
    width = max([len(row.name) for row in rows] + [4])
    lines = [f"{'type':<6} {'name':<{width}} {'requests':>8} {'failures':>8}   p50 ms   p95 ms   p99 ms   max ms"]
    for row in rows:
        cells = "".join(f" {percentile(row.response_times, p):>8}" for p in PERCENTILES) if row.requests else ""
        lines.append(f"{row.method:<6} {row.name:<{width}} {row.requests:>8} {row.failures:>8}{cells}"
                     + (f" {row.max_ms:>8.0f}" if row.requests else ""))
    every = total(rows)
    rate = f"   {every.requests / (every.last - every.first):.1f} requests/s" if every.last > every.first else ""
    lines.append(f"{'':<6} {'all':<{width}} {every.requests:>8} {every.failures:>8}{rate}")
    return lines


def summary(out: Path) -> str:
    """What the run did and, when it failed, why: the traffic's mix, the final figures per request name, the requests
    each user class made, the failures, the exceptions users raised, and the problems (``outcome.problems_of``)."""
    lines = [f"traffic: {(out / TRAFFIC).read_text().strip()}"] if (out / TRAFFIC).exists() else []
    if (out / f"{FINAL_STATS}.json").exists():
        lines += table(final_rows(out))
    else:
        lines.append(f"locust wrote no final statistics; see {out / 'locust.out'}")
    result = outcome.read(out)
    if result is None:
        lines.append(f"FAILED: the locustfile wrote no outcome; see {out / 'locust.out'}")
        return "\n".join(lines)
    lines.append("requests by user class: " + ", ".join(f"{user} {n}" for user, n in result.requests_by_user.items()))
    if result.failures:
        lines.append("failures:")
        lines += [f"  {f['occurrences']} x {f['method']} {f['name']}: {f['error']}" for f in result.failures]
    if result.exceptions:
        lines.append(f"exceptions raised by users (tracebacks in {out / 'locust_exceptions.csv'}):")
        lines += [f"  {e['count']} x {e['msg']}" for e in result.exceptions]
    if result.problems:
        lines.append("FAILED: " + "; ".join(result.problems))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.host or not args.grpc:
        print("No local stack found (var/run/latest): `make run` first, or pass --host and --grpc.", file=sys.stderr)
        return 1
    problem = gateway_problem(args.host, args.grpc)
    if problem:
        print(f"Not starting the load test: {problem}. Start the local stack with `make run`, or pass --host and "
              "--grpc of a running gateway.", file=sys.stderr)
        return 2
    out = args.out or var_dir() / "loadtests" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    users = CLASSIFY_USERS + ([OPERATOR_USER] if args.operator else [])
    print(f"locust: {args.users} users ({', '.join(users)}) for {args.run_time} against {args.host} (gRPC "
          f"{args.grpc}), requests time out after {args.request_timeout:g} s -> {out}")
    code = run_locust(args.host, args.grpc, args.users, args.spawn_rate, args.run_time, out, args.admin_token,
                      users, args.request_timeout)
    print(summary(out))
    if outcome.read(out) is None:
        code = code or 1
    if code != 0:
        print(f"locust exited with status {code}; its log: {out / 'locust.out'}")
    print(f"HTML report: {out / 'report.html'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
