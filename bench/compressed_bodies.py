"""A compression bomb against the gateway and the model server's REST API: what one request costs each, and what
the gateway's other clients wait meanwhile.

One Redis, model server and gateway (bench/stack.py) on the newest published version. The bomb is --mebibytes MiB
of zero bytes gzipped (about a thousandth of that sent), POSTed with ``Content-Encoding: gzip`` to the gateway's
/v1/classify and to the model server's :predict. For each target: the answer and how long it took, the target
process's CPU seconds and peak memory growth (VmHWM) over the request and the --settle seconds after it (aiohttp
reads what is left of a refused body for up to 10 s), with nothing else sent; then the bomb again while another
client sends the gateway cached classify calls back to back, and the slowest of those (every other client of the
gateway waits as long), beside the slowest in as long a time before the bomb.

Usage: python -m bench.compressed_bodies [--registry DIR] [--mebibytes 4096] [--settle 3]
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import (
    cpu_seconds, others_wait, peak_memory_mib, post, published_version_of, sample_photos, stack_bench_parser,
    write_result, zeros_gzipped,
)
from bench.stack import Stack


def gzipped(content_type: str) -> dict:
    return {"Content-Type": content_type, "Content-Encoding": "gzip"}


def bomb_one(url: str, pid: int, bomb: bytes, content_type: str, settle: float) -> dict:
    """The bomb sent to ``url`` alone: its answer, and the CPU and peak memory growth of process ``pid``."""
    cpu, peak = cpu_seconds(pid), peak_memory_mib(pid)
    started = time.perf_counter()
    status = post(url, bomb, gzipped(content_type))
    answered = time.perf_counter() - started
    time.sleep(settle)
    return {"status": status, "answered_s": round(answered, 3), "cpu_s": round(cpu_seconds(pid) - cpu, 3),
            "peak_memory_growth_mib": round(peak_memory_mib(pid) - peak, 1)}


def main(argv=None) -> int:
    p = stack_bench_parser(__doc__.split("\n\n")[0], settle=3.0)
    p.add_argument("--mebibytes", type=int, default=4096, help="decoded size of the bomb")
    args = p.parse_args(argv)
    version_dir = published_version_of(args)
    bomb = zeros_gzipped(args.mebibytes)
    photo = sample_photos(1)[0].read_bytes()
    with Stack(version_dir, args.model_name) as stack:
        gateway = stack.start_gateway(grpc=False)
        rest = f"{stack.server.rest_url}/v1/models/{args.model_name}:predict"
        result = {
            "bomb": {"decoded_mib": args.mebibytes, "sent_bytes": len(bomb)}, "settle_s": args.settle,
            "gateway_classify": {**bomb_one(f"{gateway.http_url}/v1/classify", gateway.process.pid, bomb,
                                             "image/jpeg", args.settle),
                                 **others_wait(gateway.http_url, [photo], True, args.settle, lambda: post(
                                     f"{gateway.http_url}/v1/classify", bomb, gzipped("image/jpeg")))},
            "model_server_predict": {**bomb_one(rest, stack.server.process.pid, bomb, "application/json",
                                                args.settle),
                                     **others_wait(gateway.http_url, [photo], True, args.settle,
                                                   lambda: post(rest, bomb, gzipped("application/json")))},
        }
    print(result)
    write_result("compressed_bodies", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
