"""Waiting until the stack's processes answer."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from devstack.processes import ProcessRecord, is_alive


class StackError(RuntimeError):
    """A stack process failed to start or become healthy; the message names it and its log."""


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def model_available(rest_url: str, model_name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{rest_url}/v1/models/{model_name}", timeout=2) as response:
            states = json.loads(response.read()).get("model_version_status", [])
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(s.get("state") == "AVAILABLE" for s in states)


def wait_healthy(record: ProcessRecord, check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(record):
            raise StackError(f"{record.name} exited before it was healthy; see {record.log}:\n{_tail(record.log)}")
        if check():
            return
        time.sleep(0.2)
    raise StackError(f"{record.name} was not {what} after {timeout:.0f}s; see {record.log}:\n{_tail(record.log)}")


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(open(path, errors="replace").read().splitlines()[-lines:])
    except OSError:
        return ""
