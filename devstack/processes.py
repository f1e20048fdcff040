"""Starting detached processes with their log in the run folder, and stopping them (with their children) by pid."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_time: str  # field 22 of /proc/<pid>/stat: guards against signalling a recycled pid
    argv: list[str]
    log: str

    def to_json(self) -> dict:
        return asdict(self)


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def is_alive(record: ProcessRecord) -> bool:
    return _proc_start_time(record.pid) == record.start_time and not _is_zombie(record.pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def spawn(name: str, argv: list[str], log_file: Path, env: dict | None = None, cwd: Path | None = None) -> ProcessRecord:
    """Start ``argv`` in its own session (so stopping its process group also stops its children)."""
    with open(log_file, "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd, start_new_session=True)
    _CHILDREN[process.pid] = process
    return ProcessRecord(name, process.pid, _proc_start_time(process.pid) or "", argv, str(log_file))


# Popen objects of processes started by this interpreter, reaped on stop so no zombie stays behind.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _reap(pid: int) -> None:
    process = _CHILDREN.pop(pid, None)
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1)


def stop(record: ProcessRecord, timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``timeout`` seconds."""
    if not is_alive(record):
        _reap(record.pid)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (is_alive(record) or _group_alive(record.pid)):
        if record.pid in _CHILDREN:
            with contextlib.suppress(subprocess.TimeoutExpired):
                _CHILDREN[record.pid].wait(timeout=0.1)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, signal.SIGKILL)
    _reap(record.pid)


def _group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")  # Linux: the ports outgoing connections get


def free_port() -> int:
    """A loopback port nothing listens on, for a server about to start. It is drawn below the kernel's ephemeral
    range: a port from bind(0) is one the kernel may give, before the server binds it, to the local end of an
    outgoing connection (any process's: a test's client, another test worker's), and the server then fails with
    "address already in use". Drawn at random, so that parallel workers rarely draw the same one; checked free."""
    try:
        low = int(EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low > 11_000:
        for _ in range(200):
            port = random.randint(10_000, low - 1)
            if port_is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
