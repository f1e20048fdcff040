"""Classify bodies whose structure, not their size, is costly to read: a multipart upload of many empty parts before
its photo, and a JSON body of many values beside it. The gateway reads both on its event loop: what one costs, and
what its other clients wait meanwhile.

One Redis, model server and gateway (bench/stack.py) on the newest published version. The JSON body is about the
gateway's limit (20 MB), the multipart one a tenth of it (2 MB: before its limit, the gateway spent more than two
minutes on one of 20 MB, which the bench does not wait for); each is gzipped as a client would send it
(``Content-Encoding: gzip``). Sent once alone: the answer, its time and the gateway's CPU seconds over it and the
--settle seconds after; then again while another client sends cached classify calls back to back: the slowest of
those beside the slowest in as long a time before.

Usage: python -m bench.costly_forms [--registry DIR] [--settle 2]
"""
from __future__ import annotations

import base64
import gzip
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import (
    cpu_seconds, others_wait, post, published_version_of, sample_photos, stack_bench_parser, write_result,
)
from bench.stack import Stack

BOUNDARY = b"b"


def many_parts(photo: bytes, megabytes: int) -> tuple[bytes, str]:
    """A multipart body of empty parts (10 bytes each) up to ``megabytes``, then the photo."""
    empty = b"--" + BOUNDARY + b"\r\n\r\n\r\n"
    return (empty * (megabytes * 1_000_000 // len(empty)) + b"--" + BOUNDARY
            + b'\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n\r\n' + photo
            + b"\r\n--" + BOUNDARY + b"--\r\n", f"multipart/form-data; boundary={BOUNDARY.decode()}")


def many_values(photo: bytes, megabytes: int) -> tuple[bytes, str]:
    """A JSON body of the photo and a field of as many distinct keys as fit in ``megabytes``."""
    keys = megabytes * 1_000_000 // 12
    padding = ",".join(f'"{i:x}":0' for i in range(keys))
    return (f'{{"image_b64": "{base64.b64encode(photo).decode()}", "note": {{{padding}}}}}'.encode(),
            "application/json")


BODIES = {"multipart_empty_parts": (many_parts, 2), "json_many_keys": (many_values, 20)}  # (builder, megabytes)


def send(url: str, body: bytes, content_type: str) -> int:
    return post(url, body, {"Content-Type": content_type, "Content-Encoding": "gzip"})


def main(argv=None) -> int:
    p = stack_bench_parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    version_dir = published_version_of(args)
    photo = sample_photos(1)[0].read_bytes()
    result = {"settle_s": args.settle}
    with Stack(version_dir, args.model_name) as stack:
        gateway = stack.start_gateway(grpc=False)
        url, pid = f"{gateway.http_url}/v1/classify", gateway.process.pid
        for name, (build, megabytes) in BODIES.items():
            body, content_type = build(photo, megabytes)
            sent = gzip.compress(body, 9)
            cpu, started = cpu_seconds(pid), time.perf_counter()
            status = send(url, sent, content_type)
            answered = time.perf_counter() - started
            time.sleep(args.settle)
            cell = {"decoded_bytes": len(body), "sent_bytes": len(sent), "status": status,
                    "answered_s": round(answered, 3), "cpu_s": round(cpu_seconds(pid) - cpu, 3)}
            cell.update(others_wait(gateway.http_url, [photo], True, args.settle,
                                    lambda: send(url, sent, content_type)))
            result[name] = cell
            print(name, cell, flush=True)
    write_result("costly_forms", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
