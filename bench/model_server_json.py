"""A REST :predict body whose structure, not its size, is costly to parse: distinct JSON keys under the size the
model server parses in a worker process (services/model_server/json_worker.py). Its REST and gRPC APIs share one
event loop: what the body costs, and what the gateway's cache misses (gRPC Predict calls) wait meanwhile.

One Redis, model server and gateway (bench/stack.py) on the newest published version. The body (3.7 MB) is sent
gzipped to the model server's :predict once alone: the answer, its time and the model server's CPU seconds over it
and the --settle seconds after (a first one also starts the worker process). Then again while another client sends
the gateway classify calls of distinct photos (cache misses, the cache flushed) back to back: the slowest of those
beside the slowest in as long a time before.

Usage: python -m bench.model_server_json [--registry DIR] [--settle 2]
"""
from __future__ import annotations

import gzip
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import (
    cpu_seconds, others_wait, post, published_version_of, sample_photos, stack_bench_parser, write_result,
)
from bench.stack import Stack, distinct_photos

KEYS = 380_000  # distinct keys beside "instances": 3.7 MB, under json_worker.LARGE_JSON_BYTES


def many_keys() -> bytes:
    return ("{" + ",".join(f'"{i:x}":0' for i in range(KEYS)) + ', "instances": [[1]]}').encode()


def main(argv=None) -> int:
    p = stack_bench_parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    version_dir = published_version_of(args)
    body = many_keys()
    sent = gzip.compress(body, 9)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    photos = distinct_photos(sample_photos(1000))
    with Stack(version_dir, args.model_name) as stack:
        gateway = stack.start_gateway(grpc=False)
        url, pid = f"{stack.server.rest_url}/v1/models/{args.model_name}:predict", stack.server.process.pid
        cpu, started = cpu_seconds(pid), time.perf_counter()
        status = post(url, sent, headers)
        answered = time.perf_counter() - started
        time.sleep(args.settle)
        result = {"decoded_bytes": len(body), "sent_bytes": len(sent), "status": status,
                  "answered_s": round(answered, 3), "cpu_s": round(cpu_seconds(pid) - cpu, 3),
                  "settle_s": args.settle}
        stack.flush_cache()
        result.update(others_wait(gateway.http_url, photos, False, args.settle, lambda: post(url, sent, headers)))
    print(result)
    write_result("model_server_json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
