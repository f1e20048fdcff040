"""The tests' gateway harness: its readiness wait must outlast a gateway that is still starting.

A gateway whose HTTP port already listens can still refuse or reset a connection while it starts; the wait must
count that as "not ready yet", not fail the test that started it.
"""
from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading

import pytest

from devstack.servers import free_port
from tests.gateway_harness import GatewayProcess


class _ResetThenReady:
    """A loopback HTTP server that resets its first ``resets`` connections, then answers 200 to every request."""

    def __init__(self, resets: int):
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.resets = resets
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                if self.resets > 0:
                    self.resets -= 1
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    continue
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                                   b"Connection: close\r\n\r\n{}")

    def close(self) -> None:
        self.listener.close()


def _harness_at(port: int, process: subprocess.Popen) -> GatewayProcess:
    """A harness pointed at ``port`` without starting a gateway: only its client and readiness wait are used."""
    harness = GatewayProcess.__new__(GatewayProcess)
    harness.url, harness.process = f"http://127.0.0.1:{port}", process
    return harness


@pytest.fixture
def idle_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_a_reset_connection_while_starting_means_not_ready_yet(idle_process):
    server = _ResetThenReady(resets=2)
    try:
        _harness_at(server.port, idle_process).wait_ready(timeout=10)
        assert server.resets == 0
    finally:
        server.close()


def test_the_wait_fails_at_once_when_the_gateway_exits():
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    with pytest.raises(RuntimeError, match="exited"):
        _harness_at(free_port(), exited).wait_ready(timeout=30)
