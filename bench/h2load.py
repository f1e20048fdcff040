"""gRPC unary calls from h2load, nghttp2's HTTP/2 load generator (C, Debian's nghttp2-client): load on a server whose
own cost is the figure, from a client whose cost per call is a small fraction of a Python gRPC client's.

A unary gRPC call is an HTTP/2 POST to ``/<package.Service>/<Method>`` with ``content-type: application/grpc``,
``te: trailers`` and one length-prefixed message as the body (``grpc_body``); h2load sends the same body on every
stream. It reads the HTTP status only, and gRPC answers its errors with HTTP 200 and a ``grpc-status`` trailer, so
``run`` cannot tell a failed call from an answered one: the caller counts the server's answers on its side (the model
server's ``request_count`` by status) and compares them with ``Load.calls``.

Usage from a bench: ``run(target, "/tensorflow.serving.PredictionService/Predict", request, concurrency=32,
seconds=10, workdir=tmp)``.
"""
from __future__ import annotations

import resource
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

H2LOAD = "h2load"
PREDICT = "/tensorflow.serving.PredictionService/Predict"


def available() -> bool:
    return shutil.which(H2LOAD) is not None


def grpc_body(message) -> bytes:
    """One gRPC message as the body of a call: not compressed (0), its length (4 bytes, big-endian), the bytes."""
    data = message.SerializeToString()
    return b"\0" + struct.pack(">I", len(data)) + data


@dataclass
class Load:
    calls: int  # HTTP 200 answers (gRPC's errors included: see the module's docstring)
    other_statuses: int  # answers with another HTTP status, and streams h2load reports failed
    seconds: float  # from the first call's start to the end of the last answer
    latencies_s: np.ndarray  # one per answered call, in order of their start
    cpu_s: float  # h2load's own CPU time (user + system)

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


def parse_log(text: str) -> tuple[list[float], int, float]:
    """h2load's ``--log-file`` (per call: start in microseconds since the epoch, HTTP status, microseconds until its
    answer ended) -> (latencies in seconds of the status-200 calls by start, other statuses, seconds from the first
    start to the last end)."""
    rows = []
    for line in text.splitlines():
        if line.strip():
            start, status, duration = line.split("\t")[:3]
            rows.append((int(start), int(status), int(duration)))
    rows.sort()
    ok = [duration / 1e6 for _, status, duration in rows if status == 200]
    span = (max(start + duration for start, _, duration in rows) - rows[0][0]) / 1e6 if rows else 0.0
    return ok, len(rows) - len(ok), span


def run(target: str, path: str, message, *, concurrency: int, workdir: Path, seconds: float | None = None,
        calls: int | None = None, timeout_s: float = 60.0) -> Load:
    """``message`` sent to ``path`` on ``target`` (host:port, plain HTTP/2) by one h2load connection with
    ``concurrency`` streams in flight, for ``seconds`` or ``calls`` calls (one of the two)."""
    if (seconds is None) == (calls is None):
        raise ValueError("give seconds or calls, not both")
    workdir = Path(workdir)
    body, log = workdir / "h2load-body", workdir / "h2load.log"
    body.write_bytes(grpc_body(message))
    log.unlink(missing_ok=True)
    argv = [H2LOAD, "--clients=1", f"--max-concurrent-streams={concurrency}", f"--data={body}",
            "--header=content-type: application/grpc", "--header=te: trailers", f"--log-file={log}",
            *([f"--duration={seconds:g}"] if seconds is not None else [f"--requests={calls}"]),
            f"http://{target}{path}"]
    cpu_before = _children_cpu_s()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=(seconds or 0) + timeout_s)
    cpu_s = _children_cpu_s() - cpu_before  # h2load is the only child reaped in between
    if done.returncode != 0:
        raise RuntimeError(f"h2load exited {done.returncode}: {done.stderr.strip() or done.stdout[-500:]}")
    ok, other, span = parse_log(log.read_text() if log.exists() else "")
    failed = _failed_streams(done.stdout)
    if not ok:
        raise RuntimeError(f"h2load got no answer from {target}{path}: {done.stdout[-500:]}")
    return Load(len(ok), other + failed, span, np.asarray(ok), cpu_s)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _failed_streams(report: str) -> int:
    """The ``N failed`` of h2load's ``requests:`` line: streams that got no answer at all (never in its log)."""
    for line in report.splitlines():
        if line.startswith("requests:"):
            parts = line.replace(",", "").split()
            return int(parts[parts.index("failed") - 1])
    return 0
