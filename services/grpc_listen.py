"""A gRPC server's listening address bound, or a clear error: the one check both servers (the gateway, the model
server) make before they start."""
from __future__ import annotations

import grpc


def listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """``server`` bound to ``address`` (TLS with ``credentials``); its port. OSError when it cannot be bound (the port
    taken by another process, which gRPC refuses once SO_REUSEPORT is off, or a path that is no socket's)."""
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:  # grpcio raises where it used to return 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {address} (a port another process listens on, or a path that is "
                      "no socket's?)")
    return bound
