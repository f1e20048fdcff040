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
