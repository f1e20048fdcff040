"""Starts our model server on free loopback ports for the conformance suite — or points the suite at a real
TensorFlow Serving when TF_SERVING_GRPC / TF_SERVING_REST / TF_SERVING_MODEL_BASE are set (see README)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from tests.support import free_port, stop_process, wait_for_port
from training_job.paths import PROJECT_ROOT

MODEL = "mushrooms"


@dataclass
class ServerUnderTest:
    grpc_target: str
    rest_url: str
    models_dir: Path  # the folder holding <model>/<version>/, as the server sees it
    config_file: Path | None
    process: subprocess.Popen | None = None
    log_file: Path | None = None

    @property
    def external(self) -> bool:
        return self.process is None

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file else ""


def write_config(path: Path, models: dict[str, Path], labels: dict[str, dict[str, int]] | None = None,
                 policy: str = "latest { num_versions: 1 }") -> None:
    parts = []
    for name, base in models.items():
        label_text = "".join(f' version_labels {{ key: "{k}" value: {v} }}'
                             for k, v in (labels or {}).get(name, {}).items())
        parts.append(f'config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" '
                     f'model_version_policy {{ {policy} }}{label_text} }}')
    path.write_text("model_config_list { " + " ".join(parts) + " }\n")


def start_server(models_dir: Path, config_file: Path, *extra: str) -> ServerUnderTest:
    grpc_port, rest_port = free_port(), free_port()
    log_file = Path(tempfile.mkstemp(prefix="model-server-", suffix=".log")[1])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.model_server", f"--port={grpc_port}", f"--rest_api_port={rest_port}",
         "--host=127.0.0.1", f"--model_config_file={config_file}", "--file_system_poll_wait_seconds=1", *extra],
        stdout=open(log_file, "w"), stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT,
    )
    wait_for_port(rest_port, timeout=90, process=process)
    return ServerUnderTest(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{rest_port}", models_dir, config_file,
                           process, log_file)


def external_server() -> ServerUnderTest | None:
    if not os.environ.get("TF_SERVING_GRPC"):
        return None
    return ServerUnderTest(os.environ["TF_SERVING_GRPC"], f"http://{os.environ['TF_SERVING_REST']}",
                           Path(os.environ["TF_SERVING_MODEL_BASE"]), None)


def stop_server(server: ServerUnderTest) -> None:
    if server.process is not None:
        stop_process(server.process, timeout=20)


def version_states(target: str, model: str) -> dict[int, tuple[int, str]]:
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


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
