"""Bringing the stack up into a run folder and taking it down again.

The run folder holds every log, the generated configs, ``stack.json`` (pids, ports, URLs) and the admin token;
``var/run/latest`` points at the newest one."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devstack import configs, servers
from devstack.health import StackError, http_ok, model_available, tcp_open, wait_healthy
from devstack.processes import ProcessRecord, is_alive, port_is_free, spawn, stop
from training_job.paths import PROJECT_ROOT, var_dir

STATE_FILE = "stack.json"
# Stopped in reverse: whatever depends on a process goes down before it.
BATCHING_CONFIG = PROJECT_ROOT / "deploy" / "tfserving" / "batching.config"  # the one docker-compose's TF Serving uses
START_ORDER = ("redis", "model_server", "gateway", "rollout", "prometheus", "tensorboard")
ROLLOUT_OPERATOR = "rollout-controller"  # the name the gateway's audit gives the rollout controller's changes


@dataclass
class Ports:
    """The stack's loopback ports; each has its flag of `scripts/stack.py up` (``flag``)."""
    redis: int = 6390
    model_server_grpc: int = 8500
    model_server_rest: int = 8501
    gateway_http: int = 8080
    gateway_grpc: int = 50051
    prometheus: int = 9090
    tensorboard: int = 6006
    rollout: int = 8095

    @staticmethod
    def flag(name: str) -> str:
        """The `scripts/stack.py up` flag of the port ``name`` (a field): --gateway-http-port for gateway_http."""
        return f"--{name.replace('_', '-')}-port"


@dataclass
class Stack:
    run_dir: Path
    model_name: str
    ports: Ports
    admin_token: str
    processes: dict[str, ProcessRecord] = field(default_factory=dict)

    @property
    def urls(self) -> dict[str, str]:
        p = self.ports
        urls = {
            "gateway": f"http://127.0.0.1:{p.gateway_http}",
            "web page": f"http://127.0.0.1:{p.gateway_http}/",
            "gateway gRPC": f"127.0.0.1:{p.gateway_grpc}",
            "model server REST": f"http://127.0.0.1:{p.model_server_rest}",
            "model server gRPC": f"127.0.0.1:{p.model_server_grpc}",
            "Prometheus": f"http://127.0.0.1:{p.prometheus}",
            "Redis": f"redis://127.0.0.1:{p.redis}/0",
        }
        if "rollout" in self.processes:
            urls["rollout controller"] = f"http://127.0.0.1:{p.rollout}"
        if "tensorboard" in self.processes:
            urls["TensorBoard"] = f"http://127.0.0.1:{p.tensorboard}"
        return urls

    def save(self) -> None:
        state = {"model_name": self.model_name, "ports": asdict(self.ports), "urls": self.urls,
                 "processes": {name: r.to_json() for name, r in self.processes.items()}}
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> "Stack":
        state = json.loads((run_dir / STATE_FILE).read_text())
        token_file = run_dir / "admin_token"
        return cls(run_dir, state["model_name"], Ports(**state["ports"]),
                   token_file.read_text().strip() if token_file.exists() else "",
                   {name: ProcessRecord(**r) for name, r in state["processes"].items()})

    def alive(self) -> list[str]:
        return [name for name, record in self.processes.items() if is_alive(record)]


def runs_root() -> Path:
    return var_dir() / "run"


def new_run_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir = root / stamp
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = root / f"{stamp}-{n}"
    run_dir.mkdir()
    latest = root / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.name)
    return run_dir


def latest_run(root: Path | None = None) -> Path | None:
    latest = (root or runs_root()) / "latest"
    return latest.resolve() if latest.is_symlink() and (latest.resolve() / STATE_FILE).exists() else None


def _python_env() -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"}


def _free_port_after(port: int, taken: set[int]) -> int:
    """The first port above ``port`` that is free now and none of the stack's (``taken``)."""
    candidate = port + 1
    while candidate in taken or not port_is_free(candidate):
        candidate += 1
    return candidate


def start_stack(registry: Path, model_name: str, run_dir: Path, ports: Ports | None = None,
                scrape_interval_s: float = 5.0, tensorboard_logdir: Path | None = None,
                admin_token: str | None = None, timeout: float = 180.0, rollout: bool = False,
                rollout_policy: Path | None = None) -> Stack:
    """Start every process on loopback and wait until each is healthy. On failure everything started is stopped.
    ``rollout``: also the rollout controller (services/rollout), with ``rollout_policy`` or the default policy."""
    ports = ports or Ports()
    optional = {"tensorboard": tensorboard_logdir is not None, "rollout": rollout}
    busy = {name: port for name, port in asdict(ports).items() if optional.get(name, True) and not port_is_free(port)}
    if busy:
        taken = set(asdict(ports).values())
        moves = " ".join(f"{Ports.flag(name)} {_free_port_after(port, taken)}" for name, port in busy.items())
        raise StackError(f"ports already in use: {', '.join(f'{n}={p}' for n, p in busy.items())}. Is a stack "
                         f"already up? `make stop`. Or move them to ports free now: `scripts/stack.py up {moves}` "
                         f"(`make run STACK_ARGS='{moves}'`)")
    for binary in ("redis-server", "prometheus"):
        if shutil.which(binary) is None:
            raise StackError(f"{binary} is not installed: run `make setup` (scripts/setup.sh)")
    token = admin_token or os.environ.get("GATEWAY_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    # Mode 600 from its creation (never readable by others, not even between a write and a chmod).
    _write_private(run_dir / "admin_token", token + "\n")
    feedback_secret = feedback_secret_file(run_dir)
    if not feedback_secret.exists():
        _write_private(feedback_secret, secrets.token_urlsafe(32) + "\n")
    if rollout:  # the controller's own operator token, so the gateway's audit names it
        rollout_token = secrets.token_urlsafe(24)
        _write_private(run_dir / "rollout_token", rollout_token + "\n")
        _write_private(run_dir / "operators", f"{ROLLOUT_OPERATOR}:{rollout_token}\n")
    stack = Stack(run_dir, model_name, ports, token)
    try:
        _start_all(stack, registry, scrape_interval_s, tensorboard_logdir, timeout, rollout, rollout_policy)
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def _write_private(path: Path, text: str) -> None:
    """Mode 600 from its creation (never readable by others, not even between a write and a chmod)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _start_all(stack: Stack, registry: Path, scrape_interval_s: float, tensorboard_logdir: Path | None,
               timeout: float, rollout: bool = False, rollout_policy: Path | None = None) -> None:
    run_dir, ports, env = stack.run_dir, stack.ports, _python_env()

    def launch(name: str, argv: list[str], **kwargs) -> ProcessRecord:
        record = spawn(name, argv, run_dir / f"{name}.log", cwd=PROJECT_ROOT, **kwargs)
        stack.processes[name] = record
        stack.save()
        return record

    redis_dir = run_dir.parent / "redis-data"  # next to the runs: the state outlives one run of the stack
    redis_dir.mkdir(exist_ok=True)
    redis = launch("redis", servers.redis_argv(ports.redis, redis_dir, *servers.REDIS_STATE_ARGS))

    model_config, monitoring_config = run_dir / "models.config", run_dir / "monitoring.config"
    configs.write_model_config(model_config, stack.model_name, (registry / stack.model_name).resolve())
    configs.write_monitoring_config(monitoring_config)
    model_server = launch("model_server", servers.model_server_argv(
        ports.model_server_grpc, ports.model_server_rest, f"--model_config_file={model_config}",
        "--model_config_file_poll_wait_seconds=1", servers.ALLOW_LABELS_BEFORE_LOAD,  # `stack.py pin` rewrites it
        f"--monitoring_config_file={monitoring_config}", "--enable_batching",
        f"--batching_parameters_file={BATCHING_CONFIG}",
        "--prefer_tflite_model"), env=env)  # a version whose model.tflite disagrees with it keeps its SavedModel

    prometheus_config = run_dir / "prometheus.yml"
    configs.write_prometheus_config(prometheus_config, f"127.0.0.1:{ports.gateway_http}",
                                    f"127.0.0.1:{ports.model_server_rest}", scrape_interval_s,
                                    f"127.0.0.1:{ports.rollout}" if rollout else None)
    prometheus = launch("prometheus", [
        shutil.which("prometheus"), f"--config.file={prometheus_config}",
        f"--storage.tsdb.path={run_dir / 'prometheus-data'}", f"--web.listen-address=127.0.0.1:{ports.prometheus}"])
    if tensorboard_logdir is not None:
        tensorboard_logdir.mkdir(parents=True, exist_ok=True)
        launch("tensorboard", [str(Path(sys.executable).with_name("tensorboard")), f"--logdir={tensorboard_logdir}",
                               "--host=127.0.0.1", f"--port={ports.tensorboard}"], env=env)

    wait_healthy(redis, lambda: tcp_open(ports.redis), 30, "listening")
    rest = f"http://127.0.0.1:{ports.model_server_rest}"
    wait_healthy(model_server, lambda: model_available(rest, stack.model_name), timeout, "serving the model")

    operators = run_dir / "operators"
    with_rollout = {"operator-tokens": operators, "rollout-url": f"http://127.0.0.1:{ports.rollout}"}
    gateway = launch("gateway", gateway_argv(stack, registry, with_rollout if rollout else None),
                     env={**env, "GATEWAY_ADMIN_TOKEN": stack.admin_token})
    gateway_url = f"http://127.0.0.1:{ports.gateway_http}"
    wait_healthy(gateway, lambda: http_ok(f"{gateway_url}/readyz"), timeout, "ready")
    if rollout:
        controller = launch("rollout", [
            sys.executable, "-m", "services.rollout", "--host=127.0.0.1", f"--http-port={ports.rollout}",
            f"--redis-url=redis://127.0.0.1:{ports.redis}/0", f"--gateway-url={gateway_url}",
            f"--model-server-rest={rest}", f"--model-name={stack.model_name}",
            f"--model-base-path={(registry / stack.model_name).resolve()}",
            f"--gateway-token-file={run_dir / 'rollout_token'}", f"--operator-tokens={operators}",
            f"--serve-new-versions={run_dir / 'models.config'}",  # the stack lists versions: see configs.py
            *([f"--policy={rollout_policy}"] if rollout_policy else [])],
            env={**env, "GATEWAY_ADMIN_TOKEN": stack.admin_token})  # the admin operator may use its API too
        wait_healthy(controller, lambda: http_ok(f"http://127.0.0.1:{ports.rollout}/healthz"), 60, "listening")
    wait_healthy(prometheus, lambda: http_ok(f"http://127.0.0.1:{ports.prometheus}/-/ready"), 60, "ready")
    if "tensorboard" in stack.processes:
        wait_healthy(stack.processes["tensorboard"], lambda: tcp_open(ports.tensorboard), 90, "listening")


def gateway_argv(stack: Stack, registry: Path, extra: dict | None = None) -> list[str]:
    """The gateway's command line, its flags spelled as services/gateway/main.py defines them; ``extra``: more
    flags by name (without the leading dashes) and value."""
    ports = stack.ports
    return servers.gateway_argv(ports.gateway_http, ports.gateway_grpc, f"127.0.0.1:{ports.model_server_grpc}",
                                f"redis://127.0.0.1:{ports.redis}/0", stack.model_name,
                                f"--model-base-path={(registry / stack.model_name).resolve()}",
                                f"--feedback-secret-file={feedback_secret_file(stack.run_dir)}",
                                *(f"--{name}={value}" for name, value in (extra or {}).items()))


def feedback_secret_file(run_dir: Path) -> Path:
    """The file of the secret that signs the gateway's feedback tokens: beside the runs, made by the first
    ``start_stack`` and kept (as Redis's state is), so that an answer given before the stack restarted can still get
    its feedback."""
    return run_dir.parent / "feedback_secret"


def stop_stack(stack: Stack) -> list[str]:
    """Stop every process of the stack (newest first); returns the names that had been running."""
    running = stack.alive()
    for name in reversed(list(stack.processes)):
        stop(stack.processes[name])
    return running
