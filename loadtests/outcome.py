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


def problems_of(requests_by_user: dict[str, int], photos_answered: int | None, failures: list[dict],
                exceptions: list[dict]) -> list[str]:
    """Why a run with these counts failed: a user class whose users made no request (they crashed, or the run had
    fewer users than classes), users that classify but no photo answered, any failed request, any exception."""
    found = []
    for user, requests in requests_by_user.items():
        if requests == 0:
            found.append(f"{user} made no request")
    if photos_answered == 0:
        found.append("no photo was answered with predictions")
    failed = sum(failure["occurrences"] for failure in failures)
    if failed:
        found.append(f"{failed} request{'s' if failed != 1 else ''} failed")
    raised = sum(exception["count"] for exception in exceptions)
    if raised:
        found.append(f"users raised {raised} exception{'s' if raised != 1 else ''}")
    return found
