"""Starts our model server on free loopback ports for the conformance suite — or points the suite at a real
TensorFlow Serving when TF_SERVING_GRPC / TF_SERVING_REST / TF_SERVING_MODEL_BASE are set (see README)."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devstack import servers
from devstack.configs import write_model_list as write_config
from devstack.servers import stop_process, version_states, wait_until

__all__ = ["MODEL", "ServerUnderTest", "write_config", "start_server", "serve_registry", "external_server",
           "stop_server", "version_states", "wait_until"]

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


def start_server(models_dir: Path, config_file: Path, *extra: str) -> ServerUnderTest:
    """Our model server on ``config_file``, run as the stack and deploy/ run TF Serving (version labels allowed
    before their versions load), with ``extra`` flags."""
    server = servers.start_model_server(f"--model_config_file={config_file}", servers.ALLOW_LABELS_BEFORE_LOAD,
                                        *extra)
    return ServerUnderTest(server.grpc_target, server.rest_url, models_dir, config_file, server.process,
                           server.log_file)


def serve_registry(registry: Path, versions, labels: dict[str, int] | None = None, *extra: str) -> ServerUnderTest:
    """Our model server on ``registry``'s MODEL (policy ``all``, these version ``labels``), returned once each of
    ``versions`` is AVAILABLE; stopped again if they never are."""
    from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

    config = registry / "models.config"
    write_config(config, {MODEL: registry / MODEL}, labels={MODEL: labels or {}}, policy="all {}")
    server = start_server(registry, config, *extra)
    try:
        wait_until(lambda: all(version_states(server.grpc_target, MODEL).get(v, (0,))[0]
                               == ModelVersionStatus.AVAILABLE for v in versions),
                   what=f"versions {', '.join(map(str, versions))}")
    except BaseException:
        stop_server(server)
        raise
    return server


def external_server() -> ServerUnderTest | None:
    if not os.environ.get("TF_SERVING_GRPC"):
        return None
    return ServerUnderTest(os.environ["TF_SERVING_GRPC"], f"http://{os.environ['TF_SERVING_REST']}",
                           Path(os.environ["TF_SERVING_MODEL_BASE"]), None)


def stop_server(server: ServerUnderTest) -> None:
    if server.process is not None:
        stop_process(server.process, timeout=20)


def save_session_model(graph, version_dir, signature) -> None:
    """A TF1 SavedModel of ``graph`` (its variables initialised) with ``signature`` as serving_default, as TF1's
    exporters (an Estimator's) write one: no object graph, served through a Session."""
    import tensorflow as tf

    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        session.run(tf.compat.v1.global_variables_initializer())
        builder = tf.compat.v1.saved_model.Builder(str(version_dir))
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"serving_default": signature})
        builder.save()
