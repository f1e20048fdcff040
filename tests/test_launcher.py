"""One process launcher (devstack/servers.py) for the stack, the benchmarks and the tests; the benchmarks
import nothing from tests/."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from devstack import launch, servers

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmarks_import_nothing_from_the_tests():
    importing_tests = re.compile(r"^\s*(from|import)\s+tests(\.|\s|$)", re.M)
    offenders = [p.name for p in (ROOT / "bench").rglob("*.py") if importing_tests.search(p.read_text())]
    assert offenders == []


def test_the_tests_and_the_benchmarks_start_servers_through_the_launcher():
    import bench.stack
    import tests.model_server_harness
    import tests.support

    assert tests.support.RedisServer is servers.RedisServer and tests.support.free_port is servers.free_port
    assert tests.model_server_harness.version_states is servers.version_states
    assert bench.stack.RedisServer is servers.RedisServer and bench.stack.start_gateway is servers.start_gateway


def test_the_stack_spells_its_command_lines_as_the_launcher_does(tmp_path):
    ports = launch.Ports(redis=6391, model_server_grpc=8502, gateway_http=8081, gateway_grpc=50052)
    stack = launch.Stack(tmp_path, "mushrooms", ports, admin_token="t")
    assert launch.gateway_argv(stack, tmp_path) == servers.gateway_argv(
        8081, 50052, "127.0.0.1:8502", "redis://127.0.0.1:6391/0", "mushrooms",
        f"--model-base-path={(tmp_path / 'mushrooms').resolve()}",
        f"--feedback-secret-file={tmp_path.parent / 'feedback_secret'}")


def test_free_ports_are_drawn_where_outgoing_connections_never_land():
    """A port bind(0) chose could be given to an outgoing connection's local end before the server bound it (a
    model server of the stack tests failed so, "address already in use", in a CI run): free ports come from below
    the kernel's ephemeral range, and are free."""
    from devstack.processes import EPHEMERAL_PORTS, free_port, port_is_free

    low = int(EPHEMERAL_PORTS.read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert all(10_000 <= port < low and port_is_free(port) for port in ports), ports
    assert len(set(ports)) > 40  # drawn at random: parallel workers rarely draw the same


def test_a_redis_servers_folder_goes_with_the_process_that_made_it():
    """Tests and benches stop their Redis with ``stop()``, which keeps its folder for a restart on the same data; the
    folders (an append-only file each, up to megabytes) piled up in /tmp by the hundred, run after run."""
    script = ("from devstack.servers import RedisServer\n"
              "redis = RedisServer(extra_args=('--appendonly', 'yes')).start()\n"
              "redis.stop()\n"
              "redis.start()\n"  # restarted on its data: the folder is still there
              "redis.stop()\n"
              "print(redis.dir)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert not Path(done.stdout.strip()).exists()


def test_a_server_whose_free_port_was_taken_meanwhile_starts_again_on_new_ones(tmp_path, monkeypatch):
    """free_port's port is only free when asked: another process can bind it first (two tests, two workers). The
    launcher handed back a gateway "listening" on a port another process held, and gave up on a model server whose
    gRPC port was taken, or on a Redis. A server that exits saying a port is taken is started again on new free
    ports."""
    import socket

    from devstack.health import http_ok
    from tests.model_server_harness import MODEL
    from tests.support import RedisServer
    from training_job.tiny_model import write_tiny_model

    write_tiny_model(tmp_path / MODEL / "1")
    real_free_port = servers.free_port
    with socket.create_server(("127.0.0.1", 0)) as taken, RedisServer() as redis:
        taken_port = taken.getsockname()[1]
        handed = []

        def first_taken() -> int:  # the first port drawn is one another process holds
            port = taken_port if not handed else real_free_port()
            handed.append(port)
            return port

        monkeypatch.setattr(servers, "free_port", first_taken)
        server = servers.start_model_server(f"--model_name={MODEL}", f"--model_base_path={tmp_path / MODEL}")
        try:
            assert taken_port not in (int(server.grpc_target.rsplit(":", 1)[1]), int(server.rest_url.rsplit(":", 1)[1]))
            handed.clear()
            process, http_port, grpc_port, _ = servers.start_gateway(server.grpc_target, redis.url, MODEL)
            try:
                assert taken_port not in (http_port, grpc_port)
                servers.wait_until(lambda: http_ok(f"http://127.0.0.1:{http_port}/readyz"), timeout=30,
                                   what="the gateway ready")
            finally:
                servers.stop_process(process)
        finally:
            servers.stop_process(server.process)
        handed.clear()
        with RedisServer() as another:
            assert another.port != taken_port and handed[0] == taken_port
            another.stop()
            another.start()  # a restart keeps its port
            assert another.port == handed[-1]
