"""Our servers as child processes on loopback ports: the one launcher of Redis, the model server and the gateway.

The stack (launch.py, detached processes with records), the benchmarks (bench/stack.py) and the tests start them
through these command lines and helpers, so a flag is spelled in one place. Every process started here is stopped
by its own Popen handle (``stop_process``), never by name.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devstack.processes import free_port
from training_job.paths import PROJECT_ROOT

__all__ = ["free_port", "wait_for_port", "wait_until", "stop_process", "python_env", "redis_argv", "RedisServer",
           "model_server_argv", "ModelServerProcess", "start_model_server", "version_states", "gateway_argv",
           "start_gateway"]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0, process=None) -> None:
    """Until something accepts connections on ``host:port``; with ``process``, until that process listens there
    (where the kernel says which process holds a socket: another one on the port, a server started on the same
    free port meanwhile, is not taken for it), failing early when it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        owned = listens_on(process.pid, port) if process is not None else None
        if owned is None:
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
                return
        elif owned:
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on TCP ``port`` (IPv4 or IPv6); None where /proc does not
    tell (not Linux)."""
    listening = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as rows:
                for row in list(rows)[1:]:
                    fields = row.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        listening.add(f"socket:[{fields[9]}]")
    except OSError:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # it has exited
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in listening:
                return True
    return False


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` seconds pass (TimeoutError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; reaps the process."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment our Python servers run in: this checkout importable, TensorFlow's C++ logging quiet."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            "PYTHONPATH": str(PROJECT_ROOT), **(extra or {})}


# Operator state (routing table, audit, feedback tallies; keys without a TTL) survives a Redis restart (append-only
# file, fsync every second) and is never evicted: only keys with a TTL (the cache) are (volatile-lru). The same
# settings as docker-compose.yml and deploy/k8s/redis.yaml; DEVELOPERS.md "Redis layout" says why.
REDIS_STATE_ARGS = ("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory", "256mb",
                    "--maxmemory-policy", "volatile-lru")


def redis_argv(port: int, data_dir: Path, *extra: str) -> list[str]:
    """redis-server on loopback with no snapshots; ``extra`` arguments come last, so they win."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run scripts/setup.sh (apt-get install redis-server)")
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *extra, "--dir", str(data_dir)]


class RedisServer:
    """A real redis-server on a free loopback port, with no persistence unless ``extra_args`` turn it on (later
    arguments win); restartable on the same port and data. Its folder is removed when leaving the ``with`` block, or
    else when the Python process that made it exits."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.port = port  # a free one drawn at the first start when None; kept for the restarts
        self.extra_args = tuple(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        atexit.register(shutil.rmtree, self.dir, True)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.process, (self.port,) = _start_on_ports(
            lambda port: redis_argv(port, self.dir, "--appendonly", "no", *self.extra_args), (self.port,), 0,
            self.dir / "redis.log", None, 30.0)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# As compose and k8s run TF Serving: a config file holding version labels can start the server (TF Serving checks
# labels before it loads anything) and a new label may arrive with its version in one edit.
ALLOW_LABELS_BEFORE_LOAD = "--allow_version_labels_for_unavailable_models"


def model_server_argv(grpc_port: int, rest_port: int, *extra: str) -> list[str]:
    """services.model_server on loopback, looking for new versions every second, its gRPC port its own (gRPC, as TF
    Serving, binds with SO_REUSEPORT unless told not to, and would share a port another process serves); ``extra``
    flags come last (a --grpc_channel_arguments of theirs replaces this one)."""
    return [sys.executable, "-m", "services.model_server", f"--port={grpc_port}", f"--rest_api_port={rest_port}",
            "--host=127.0.0.1", "--file_system_poll_wait_seconds=1", "--grpc_channel_arguments=grpc.so_reuseport=0",
            *extra]


@dataclass
class ModelServerProcess:
    grpc_target: str
    rest_url: str
    process: subprocess.Popen
    log_file: Path

    def log(self) -> str:
        return self.log_file.read_text()


def start_model_server(*extra: str, grpc_port: int | None = None, rest_port: int | None = None,
                       log_file: Path | None = None, timeout: float = 90.0) -> ModelServerProcess:
    """The model server with ``extra`` flags (its config, batching, ...) on these ports (free ones when not given);
    returns once its REST port listens (its gRPC port listens by then), before any model is loaded."""
    log_file = log_file or Path(tempfile.mkstemp(prefix="model-server-", suffix=".log")[1])
    process, (grpc_port, rest_port) = _start_on_ports(
        lambda grpc, rest: model_server_argv(grpc, rest, *extra), (grpc_port or None, rest_port or None), 1, log_file,
        None, timeout)
    return ModelServerProcess(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{rest_port}", process, log_file)


# What a process that could not bind a port says, lowercased (aiohttp's OSError, the servers' own gRPC message,
# Redis's bind error).
PORT_TAKEN = ("address already in use", "cannot listen for grpc")
FREE_PORT_ATTEMPTS = 3


def _start_on_ports(argv: Callable[..., list[str]], ports: tuple[int | None, ...], listening: int, log_file: Path,
                    env: dict | None, timeout: float) -> tuple[subprocess.Popen, tuple[int, ...]]:
    """``argv(*ports)`` started (free ports for the ones None), returned with its ports once ``ports[listening]``
    listens. free_port's port is only free when asked: another process may take it before this one binds it. A
    process that exits saying a port is taken is started again on new free ports, FREE_PORT_ATTEMPTS times in all,
    when free ones were asked for."""
    for attempt in range(1, FREE_PORT_ATTEMPTS + 1):
        chosen = tuple(free_port() if port is None else port for port in ports)
        with open(log_file, "w") as log:
            process = subprocess.Popen(argv(*chosen), stdout=log, stderr=subprocess.STDOUT, env=python_env(env),
                                       cwd=PROJECT_ROOT)
        try:
            wait_for_port(chosen[listening], timeout=timeout, process=process)
            return process, chosen
        except RuntimeError:  # it exited before listening
            stop_process(process)
            said = log_file.read_text().lower()
            taken = any(words in said for words in PORT_TAKEN)
            if not (taken and None in ports and attempt < FREE_PORT_ATTEMPTS):
                raise
        except BaseException:
            stop_process(process)
            raise
    raise AssertionError("unreachable")


def version_states(target: str, model: str) -> dict[int, tuple[int, str]]:
    """{version: (ModelVersionStatus.State, error message)} from GetModelStatus; {} for a model it does not know."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        try:
            response = stub.GetModelStatus(request, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return {}
            raise
    return {s.version: (s.state, s.status.error_message) for s in response.model_version_status}


def gateway_argv(http_port: int, grpc_port: int, model_server: str, redis_url: str, model_name: str,
                 *extra: str) -> list[str]:
    """services.gateway on loopback, its flags spelled as services/gateway/main.py defines them; ``extra`` last."""
    return [sys.executable, "-m", "services.gateway", "--host=127.0.0.1", f"--http-port={http_port}",
            f"--grpc-port={grpc_port}", f"--model-server={model_server}", f"--redis-url={redis_url}",
            f"--model-name={model_name}", *extra]


def start_gateway(model_server: str, redis_url: str, model_name: str, *extra: str, env: dict | None = None,
                  http_port: int | None = None, grpc_port: int | None = None, log_file: Path | None = None,
                  timeout: float = 90.0) -> tuple[subprocess.Popen, int, int, Path]:
    """A gateway (``grpc_port=0``: HTTP only) with ``env`` on top of python_env(); returns (process, http port,
    grpc port, log file) once its HTTP port listens (its gRPC port listens by then), before it is ready."""
    log_file = log_file or Path(tempfile.mkstemp(prefix="gateway-", suffix=".log")[1])
    process, (http_port, grpc_port) = _start_on_ports(
        lambda http, grpc: gateway_argv(http, grpc, model_server, redis_url, model_name, *extra),
        (http_port or None, grpc_port), 0, log_file, env, timeout)
    return process, http_port, grpc_port, log_file
