"""What only the locust process knows once its users have stopped, and why a run failed.

The locustfile writes it to ``<report folder>/outcome.json`` when locust quits (after --stop-timeout, so every request
that was in flight is in it) and run.py reads it back. Locust's CSV files are no substitute: they are rewritten once
a second while the users run, so they miss the last second and whatever ended while the users were being stopped.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "outcome.json"


@dataclass
class Outcome:
    requests_by_user: dict[str, int]  # every user class of the run -> requests its users made (0 included)
    photos_answered: int | None  # photos answered with predictions; None when no user of the run classifies
    failures: list[dict]  # locust's failures as it groups them: {"method", "name", "error", "occurrences"}
    exceptions: list[dict]  # raised by users outside a request (on_start, a task): {"count", "msg", "traceback"}
    problems: list[str]  # why the run failed, in words; empty when it passed

    def write(self, folder: Path) -> None:
        (folder / FILE).write_text(json.dumps(asdict(self), indent=1))


def read(folder: Path) -> Outcome | None:
    """The outcome the locustfile wrote into ``folder``, or None when it wrote none (locust did not get that far)."""
    path = folder / FILE
    return Outcome(**json.loads(path.read_text())) if path.exists() else None


# The gateway's error codes for a cache miss refused because more are offered than it answers in time
# (services/gateway/admission.py): the load, not a fault, is what such a run found.
SHED_CODES = ("overloaded", "deadline_unreachable")
SHED = "shed by the gateway"


def failure_name(status: str, code: str | None, detail: str) -> str:
    """How a request answered with an error is named among locust's failures, which are grouped by name: its status
    (HTTP number or gRPC code) and the gateway's stable error ``code`` when it sent one, not its message, which
    names figures of the moment (misses in progress, a rate) and would make each failure a group of its own; else
    the start of ``detail``. A refusal under overload starts with SHED."""
    if code is None:
        return f"{status}: {detail[:200]}"
    return f"{SHED}: {status} {code}" if code in SHED_CODES else f"{status} {code}"


def http_failure(status: int, body: str) -> str:
    """``failure_name`` of an HTTP answer: the gateway's errors are {"error": {"code": ..., "message": ...}}."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return failure_name(str(status), code if isinstance(code, str) else None, body)


def grpc_failure(status: str, details: str) -> str:
    """``failure_name`` of a gRPC status: the gateway's details start with its error code ("overloaded: ...")."""
    code, colon, _ = details.partition(": ")
    return failure_name(status, code if colon and code.isidentifier() else None, details)


def problems_of(requests_by_user: dict[str, int], photos_answered: int | None, failures: list[dict],
                exceptions: list[dict]) -> list[str]:
    """Why a run with these counts failed: a user class whose users made no request (they crashed, or the run had
    fewer users than classes), users that classify but no photo answered, any failed request (those the gateway
    shed as overloaded said apart), any exception."""
    found = []
    for user, requests in requests_by_user.items():
        if requests == 0:
            found.append(f"{user} made no request")
    if photos_answered == 0:
        found.append("no photo was answered with predictions")
    shed = sum(failure["occurrences"] for failure in failures if SHED in failure["error"])
    failed = sum(failure["occurrences"] for failure in failures) - shed
    if failed:
        found.append(f"{failed} request{'s' if failed != 1 else ''} failed")
    if shed:
        found.append(f"{shed} request{'s were' if shed != 1 else ' was'} {SHED} as overloaded (more cache misses "
                     "offered than it answers in time: fewer users, or more model server replicas)")
    raised = sum(exception["count"] for exception in exceptions)
    if raised:
        found.append(f"users raised {raised} exception{'s' if raised != 1 else ''}")
    return found
