"""Helpers the tests share: the shared photos, the launcher's free ports, waits and real Redis instances
(devstack/servers.py, the one launcher the stack and the benchmarks use too), and HTTP keep-alive clients."""
from __future__ import annotations

import http.client
import io
import select
import socket
import struct
import threading
import time

import numpy as np
from PIL import Image

from devstack.servers import RedisServer, free_port, stop_process, wait_for_port
from training_job.paths import shared_data_dir
from training_job.preprocessing import gif_colour_table_bytes, gif_header_bytes

__all__ = ["SHARED_DATA", "MUSHROOMS", "NOT_MUSHROOMS", "IMAGENET_FUNGI", "RedisServer", "free_port", "stop_process",
           "wait_for_port", "KeepAliveClients", "drawn_jpeg", "drawn_gif", "gif_in_sub_blocks_of",
           "XMP_TRAILER", "exif_of_tags", "mpf_index", "jpeg_with_segment"]

SHARED_DATA = shared_data_dir()
MUSHROOMS = SHARED_DATA / "mushrooms"
NOT_MUSHROOMS = SHARED_DATA / "not-mushrooms"
IMAGENET_FUNGI = SHARED_DATA / "imagenet-fungi"


class KeepAliveClients:
    """``clients`` threads, each sending ``requests`` ((method, path, body, headers) in turn) back to back on its own
    keep-alive connection to 127.0.0.1:``port``, a new one when the server closed the last (as a browser or a
    connection pool does), until the ``with`` block ends. Every request is recorded in ``outcomes`` with how it
    ended: ``refused`` when a new connection was refused (nothing was sent), ``lost (<error>)`` when the request was
    sent and the connection closed or reset under it, otherwise its HTTP status."""

    def __init__(self, port: int, requests: list[tuple[str, str, bytes | None, dict]], clients: int = 8):
        self.port, self.requests = port, requests
        self.outcomes: list[str] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i, clients)) for i in range(clients)]

    def _client(self, index: int, clients: int) -> None:
        connection, n = None, index
        while not self._stop.is_set():
            (method, path, body, headers), n = self.requests[n % len(self.requests)], n + clients
            fresh = connection is None
            if fresh:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                if fresh:
                    connection.connect()
            except ConnectionRefusedError:
                outcome, connection = "refused", None
            else:
                try:
                    connection.request(method, path, body=body, headers=headers)
                    response = connection.getresponse()
                    response.read()
                    outcome = str(response.status)
                    if response.will_close:
                        connection.close()
                        connection = None
                except (http.client.HTTPException, OSError) as exc:
                    outcome, connection = f"lost ({type(exc).__name__})", None
            with self._lock:
                self.outcomes.append(outcome)
            if outcome == "refused":
                time.sleep(0.02)

    def __enter__(self) -> "KeepAliveClients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(60)


def drawn_jpeg(seed: int, height: int = 96, width: int = 128) -> bytes:
    """A small JPEG of random pixels, the same for a seed and different across seeds (a new photo, so a cache
    miss), for tests that need many distinct photos without the shared ones."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def drawn_gif(seed: int, height: int = 120, width: int = 160, frames: int = 1) -> bytes:
    """A GIF of ``frames`` pictures of noise (its data does not compress: tens of KB), of one picture and no
    extensions when ``frames`` is 1."""
    rng = np.random.default_rng(seed)
    pictures = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(frames)]
    out = io.BytesIO()
    pictures[0].save(out, "GIF", save_all=frames > 1, append_images=pictures[1:])
    return out.getvalue()


# The magic trailer the XMP specification ends a GIF's XMP packet with: read as sub-blocks from any byte of the
# packet, it leads to the empty sub-block that ends the extension.
XMP_TRAILER = b"\x01" + bytes(range(255, -1, -1)) + b"\x00"


def gif_in_sub_blocks_of(data: bytes, size: int) -> bytes:
    """``data``, a GIF of one picture and no extensions, with the picture's data in sub-blocks of ``size`` bytes
    (encoders write 255)."""
    descriptor = gif_header_bytes(data)
    at = start = descriptor + 10 + gif_colour_table_bytes(data[descriptor + 9]) + 1  # after the code size
    compressed = b""
    while data[at]:
        compressed += data[at + 1:at + 1 + data[at]]
        at += 1 + data[at]
    pieces = (compressed[i:i + size] for i in range(0, len(compressed), size))
    return data[:start] + b"".join(bytes([len(piece)]) + piece for piece in pieces) + data[at:]


def exit_code_within(process, seconds: float) -> int | None:
    """``process``'s exit code if it exits within ``seconds``, else None; stopped either way."""
    import subprocess

    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None
    finally:
        stop_process(process)


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> tuple[float | None, bytes | None]:
    """(seconds until the server closes or resets ``sock``, None if it is still open after ``seconds``; what the
    server sent before a close, None after a reset), sending ``trickle`` every 0.2 s meanwhile."""
    start, received = time.monotonic(), b""
    while time.monotonic() - start < seconds:
        try:
            if trickle:
                sock.sendall(trickle)
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                data = sock.recv(65536)
                if data == b"":
                    return time.monotonic() - start, received
                received += data
        except OSError:  # reset by the server
            return time.monotonic() - start, None
    return None, received


class BlackholingProxy:
    """A TCP proxy to ``127.0.0.1:upstream_port`` whose ``blackhole()`` silently drops every byte of the connections
    open then, both ways, and keeps them open: a peer gone without a reset (a pod replaced behind its Service, a NAT
    or load balancer that dropped the flow). Connections made afterwards reach the upstream again."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[dict] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            connection = {"dropping": False, "sockets": (client, upstream)}
            with self._lock:
                self.open.append(connection)
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target, connection), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, connection: dict) -> None:
        try:
            while data := source.recv(65536):
                if not connection["dropping"]:
                    target.sendall(data)
        except OSError:
            pass

    def blackhole(self) -> int:
        """Drop the traffic of every connection open now; how many there are."""
        with self._lock:
            for connection in self.open:
                connection["dropping"] = True
            return len(self.open)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for connection in self.open:
                for sock in connection["sockets"]:
                    sock.close()


def exif_of_tags(tags: int, orientation: int = 6) -> bytes:
    """EXIF (``Exif\\0\\0`` and a little-endian TIFF structure) whose first directory holds the orientation tag and
    ``tags`` - 1 private ones after it."""
    entries = [(0x0112, 3, 1, orientation)] + [(40000 + i % 20000, 3, 1, 0) for i in range(tags - 1)]
    return (b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, len(entries))
            + b"".join(struct.pack("<HHIHH", tag, kind, count, value, 0) for tag, kind, count, value in entries)
            + struct.pack("<I", 0))


def mpf_index(images: int, tags: int = 3) -> bytes:
    """A JPEG's APP2 MPF data: a directory of the MP version, the number of images and their entries (16 bytes
    each), ``tags`` - 3 private tags besides."""
    entries_at = 8 + 2 + 12 * tags + 4
    listed = b"".join(struct.pack("<LLLHH", 0x030000 if i else 0x20030000, 1000, 0, 0, 0) for i in range(images))
    directory = [struct.pack("<HHI4s", 0xB000, 7, 4, b"0100"), struct.pack("<HHII", 0xB001, 4, 1, images),
                 struct.pack("<HHII", 0xB002, 7, len(listed), entries_at)]
    directory += [struct.pack("<HHIHH", 40000 + i, 3, 1, 0, 0) for i in range(tags - 3)]
    return (b"MPF\x00II*\x00" + struct.pack("<IH", 8, tags) + b"".join(directory) + struct.pack("<I", 0)
            + listed)


def jpeg_with_segment(marker: int, data: bytes) -> bytes:
    """A small red JPEG with a segment of marker FF ``marker`` (E1 is APP1) holding ``data``, first after its start
    of image."""
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (255, 0, 0)).save(out, "JPEG")
    photo = out.getvalue()
    return photo[:2] + struct.pack(">BBH", 0xFF, marker, len(data) + 2) + data + photo[2:]
