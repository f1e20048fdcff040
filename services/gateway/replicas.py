"""The model server replicas behind one target, and the versions they agree on.

The gateway's channel spreads its calls over every address its target names (upstream._channel: a headless
Kubernetes Service, ``dns:///tfserving-pods:8500``, or a static ``ipv4:a:p,b:p`` list). Each replica loads a version
when it sees it, so for a while after a version is published (or unloaded) the replicas disagree, and one status
call, which reaches one of them, says AVAILABLE or not by the replica it happened to reach: the gateway's versions
changed from one poll to the next, and so did whether a routing table naming the new version was accepted.

So the status is asked of every replica (upstream.ModelServerClient.version_states), and a version is AVAILABLE when every replica
that serves the model (has one of its versions AVAILABLE) has it AVAILABLE: a new version is routed to once all of
them serve it, and an unloaded one no longer once the first of them lets it go. A replica that does not answer, or
serves none of the model's versions yet (just started), is left out: it gets no calls of the gateway's either, or
fails them, until it does. ``partial`` names the versions AVAILABLE on some of the replicas only.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

AVAILABLE, START = ModelVersionStatus.AVAILABLE, ModelVersionStatus.START
DEFAULT_PORT = "443"  # gRPC's, for a target without one


@dataclass(frozen=True)
class Partial:
    available_on: int  # replicas that have the version AVAILABLE
    serving: int  # replicas that serve the model


def _host_port(name: str) -> tuple[str, str]:
    """``host:port``, ``[v6]:port``, ``host`` -> (host, port)."""
    if name.startswith("["):
        host, _, rest = name[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else DEFAULT_PORT
    host, sep, port = name.rpartition(":")
    return (host, port) if sep and ":" not in host else (name, DEFAULT_PORT)


def _address(ip: str, port: str) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def resolve(target: str) -> list[str]:
    """The addresses of the replicas ``target`` names, as gRPC's resolvers read it: ``ipv4:``/``ipv6:`` lists,
    ``dns:[//authority/]host[:port]`` or ``host[:port]`` (every address the name resolves to); a target of another
    scheme (``unix:``) is its own one address."""
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return [address for address in rest.split(",") if address]
    if scheme == "dns":
        name = rest.split("/", 3)[3] if rest.startswith("//") else rest
    elif scheme in ("unix", "unix-abstract", "vsock") or "/" in target:
        return [target]
    else:
        name = target
    host, port = _host_port(name)
    try:
        return [_address(str(ipaddress.ip_address(host)), port)]  # an address: no DNS
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({_address(info[4][0], port) for info in infos})


def agreed(states_by_replica: list[dict[int, int]]) -> tuple[dict[int, int], dict[int, Partial]]:
    """({version: state} the replicas agree on, {version: Partial} for versions AVAILABLE on some only) from the
    ``{version: state}`` of each replica that answered. A version AVAILABLE on every replica serving the model is
    AVAILABLE; else it has the state of the first serving replica that lists it otherwise, or START (TF Serving's
    state of a version it is about to load) when the others do not list it at all."""
    serving = [states for states in states_by_replica if AVAILABLE in states.values()]
    if not serving:
        return (states_by_replica[0] if states_by_replica else {}), {}
    merged, partial = {}, {}
    for version in sorted({v for states in serving for v in states}):
        on = sum(states.get(version) == AVAILABLE for states in serving)
        if on == len(serving):
            merged[version] = AVAILABLE
            continue
        otherwise = [states[version] for states in serving if states.get(version, AVAILABLE) != AVAILABLE]
        merged[version] = otherwise[0] if otherwise else START
        if on:
            partial[version] = Partial(on, len(serving))
    return merged, partial
