"""Request bodies of the project's HTTP servers (the gateway, the model server's REST API, the rollout controller),
decoded from their Content-Encoding here, a bounded piece at a time, and counted as decoded: a body's limit holds
for what it expands to, and reading stops there.

The servers run with ``RUNNER_OPTIONS``, which turn aiohttp's own decoding off. aiohttp decodes a body on the event
loop as it arrives and, once a handler has refused it (413), reads and decodes the rest for up to 10 s to keep the
connection ("lingering"). A compressed byte of zeros decodes to about a thousand, so a few megabytes of gzip held
the gateway's event loop for seconds, answering nobody else, and grew the model server by gigabytes
(bench/compressed_bodies.py). Here the rest of a refused body is read as it came, compressed.

Accepted: identity, gzip (x-gzip, concatenated members too), deflate (zlib-wrapped or raw, as aiohttp takes it), br
(with the Brotli package, which the project's locust brings); another coding, or several, is 415 (``ACCEPTED`` goes
in the answer's Accept-Encoding, RFC 7694). TF Serving's REST API takes gzip bodies too.
"""
from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterator

from aiohttp import hdrs, web

from services.http_errors import UNDECODABLE, undecodable_body

RUNNER_OPTIONS = {"auto_decompress": False}  # for web.AppRunner: bodies are decoded by read_body
PIECE_BYTES = 64 * 1024  # decoded at most this much at once: the limit is checked between pieces
YIELD_BYTES = 1024 * 1024  # after decoding this much, the event loop runs its other tasks before going on
ACCEPTED = "gzip, deflate, br"
IDENTITY = ("", "identity")
GZIP_MAGIC = b"\x1f\x8b"


class BodyRefused(Exception):
    """A body that is not read, answered with HTTP ``status``, the error ``code`` of the gateway's and rollout
    controller's JSON errors, and ``headers``."""
    status, code, headers = 400, "bad_encoding", {}


class BodyTooLarge(BodyRefused):
    status, code = 413, "too_large"

    def __init__(self, limit: int, what: str):
        super().__init__(f"{what} is over the limit of {limit} bytes")


class EncodingNotAccepted(BodyRefused):
    status, code, headers = 415, "unsupported_encoding", {"Accept-Encoding": ACCEPTED}


class BodyUndecodable(BodyRefused):
    pass


def _undecodable(reason) -> BodyUndecodable:
    return BodyUndecodable(f"the body cannot be decoded: {reason}")


class _Identity:
    def pieces(self, data: bytes) -> Iterator[bytes]:
        yield data

    def finish(self) -> None:
        pass


class _Zlib:
    """gzip (``wbits`` 31; a member after the first is decoded in turn, as gzip does) or deflate (zlib-wrapped, or
    raw when the first byte is no zlib header)."""

    def __init__(self, gzip: bool):
        self.gzip = gzip
        self.decoder = zlib.decompressobj(31) if gzip else None

    def pieces(self, data: bytes) -> Iterator[bytes]:
        if self.decoder is None and data:
            self.decoder = zlib.decompressobj(15 if data[0] & 0x0F == 8 else -15)
        try:
            while data and self.decoder is not None:
                yield self.decoder.decompress(data, PIECE_BYTES)
                while self.decoder.unconsumed_tail and not self.decoder.eof:
                    yield self.decoder.decompress(self.decoder.unconsumed_tail, PIECE_BYTES)
                data = self.decoder.unused_data
                if data:
                    if not (self.gzip and (data.startswith(GZIP_MAGIC) or GZIP_MAGIC.startswith(data))):
                        raise _undecodable("data after the end of the compressed stream")
                    self.decoder = zlib.decompressobj(31)
        except zlib.error as exc:
            raise _undecodable(exc) from None

    def finish(self) -> None:
        if self.decoder is not None and not self.decoder.eof:
            raise _undecodable("the body ends before its compressed stream does")


class _Brotli:
    def __init__(self):
        import brotli

        self.error = brotli.error
        self.decoder = brotli.Decompressor()

    def pieces(self, data: bytes) -> Iterator[bytes]:
        try:
            piece = self.decoder.process(data, output_buffer_limit=PIECE_BYTES)
            while piece:  # drained before more input: empty once it needs some
                yield piece
                piece = self.decoder.process(b"", output_buffer_limit=PIECE_BYTES)
        except self.error as exc:
            raise _undecodable(exc) from None

    def finish(self) -> None:
        if not self.decoder.is_finished():
            raise _undecodable("the body ends before its brotli stream does")


def _coding(content_encoding: str | None) -> str:
    """A Content-Encoding header as compared: trimmed, lower case, "" when absent."""
    return (content_encoding or "").strip().lower()


def decoder_for(content_encoding: str | None):
    """The decoder of a body sent with this Content-Encoding header; EncodingNotAccepted for another."""
    encoding = _coding(content_encoding)
    if encoding in IDENTITY:
        return _Identity()
    if encoding in ("gzip", "x-gzip"):
        return _Zlib(gzip=True)
    if encoding == "deflate":
        return _Zlib(gzip=False)
    if encoding == "br":
        try:
            return _Brotli()
        except ImportError:
            pass
    raise EncodingNotAccepted(f"Content-Encoding {content_encoding!r} is not accepted: send the body as it is, or "
                              f"in one of {ACCEPTED}")


def encoded(request: web.BaseRequest) -> bool:
    """Whether ``request``'s body comes with a Content-Encoding other than identity."""
    return _coding(request.headers.get(hdrs.CONTENT_ENCODING)) not in IDENTITY


async def read_body(request: web.BaseRequest, limit: int, what: str = "the body") -> bytes:
    """``request``'s body decoded from its Content-Encoding; BodyTooLarge as soon as more than ``limit`` bytes are
    decoded (the rest is not decoded), BodyUndecodable when it is not what its Content-Encoding says (or its chunked
    transfer is broken), EncodingNotAccepted for a coding not in ACCEPTED."""
    decoder = decoder_for(request.headers.get(hdrs.CONTENT_ENCODING))
    chunks, size, unyielded = [], 0, 0
    try:
        async for data in request.content.iter_any():
            for piece in decoder.pieces(data):
                size += len(piece)
                if size > limit:
                    raise BodyTooLarge(limit, what)
                chunks.append(piece)
                unyielded += len(piece)
                if unyielded >= YIELD_BYTES:
                    unyielded = 0
                    await asyncio.sleep(0)
        decoder.finish()
    except UNDECODABLE as exc:  # a broken chunked transfer, which aiohttp still decodes
        raise BodyUndecodable(undecodable_body(exc)) from None
    return b"".join(chunks)
