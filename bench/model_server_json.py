"""REST bodies whose structure, not their size, is costly to parse: under the size the model server parses in a
worker process (services/model_server/json_worker.py), each holding what Python code converts piece by piece. Its
REST and gRPC APIs share one event loop: what the body costs, and what the gateway's cache misses (gRPC Predict
calls) wait meanwhile. The bodies (--body):
  many_keys  a :predict body of 380,000 distinct keys beside its "instances" (3.7 MB): json.loads spends far
             longer on an object member than on a number
  ragged     a :predict body whose "inputs" is a nest of 740,000 one-value lists, the last of two values (3.0 MB):
             a nest numpy cannot take whole is converted value by value, and refused at its end
  examples   a :classify body of one tf.Example holding 740,000 float values (3.0 MB): each value is added to the
             Example one by one (the published model has no classify signature: the parse happens first)
  photo      a :predict body of one photo of 224 x 224 as numbers (0.8 MB), the way a REST client sends pixels,
             sent plain and back to back for --settle seconds (one at a time) where the others are sent once

One Redis, model server and gateway (bench/stack.py) on the newest published version. The body is sent gzipped to
the model server once alone: the answer, its time and the model server's CPU seconds over it and the --settle
seconds after (a first one also starts the worker process). Then again while another client sends the gateway
classify calls of distinct photos (cache misses, the cache flushed) back to back: the slowest and the median of those
beside the same in as long a time before.

Usage: python -m bench.model_server_json [--body many_keys|ragged|examples|photo] [--registry DIR] [--settle 2]
                                         [--result-name NAME]
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import (
    cpu_seconds, median, others_wait, post, published_version_of, sample_photos, stack_bench_parser, write_result,
)
from bench.stack import Stack, distinct_photos

KEYS = 380_000  # distinct keys beside "instances": 3.7 MB, under json_worker.LARGE_JSON_BYTES
VALUES = 740_000  # one-value lists, or float values: 3.0 MB


def many_keys() -> bytes:
    return ("{" + ",".join(f'"{i:x}":0' for i in range(KEYS)) + ', "instances": [[1]]}').encode()


def ragged() -> bytes:
    return ('{"inputs": [' + "[0]," * VALUES + "[0, 0]]}").encode()


def examples() -> bytes:
    return ('{"examples": [{"x": [' + "0.5," * VALUES + "0.5]}]}").encode()


def photo() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    return json.dumps({"instances": pixels.tolist()}).encode()


BODIES = {"many_keys": (":predict", many_keys), "ragged": (":predict", ragged), "examples": (":classify", examples),
          "photo": (":predict", photo)}
REPEATED = {"photo"}  # sent back to back for --settle seconds, plain: a client's everyday body, not an attack's


def main(argv=None) -> int:
    p = stack_bench_parser(__doc__.split("\n\n")[0])
    p.add_argument("--body", choices=sorted(BODIES), default="many_keys")
    p.add_argument("--result-name", default=None,
                   help="default: model_server_json (many_keys), model_server_json_<body> (the others)")
    args = p.parse_args(argv)
    version_dir = published_version_of(args)
    verb, build = BODIES[args.body]
    body = build()
    repeated = args.body in REPEATED
    sent = body if repeated else gzip.compress(body, 9)
    headers = {"Content-Type": "application/json", **({} if repeated else {"Content-Encoding": "gzip"})}
    photos = distinct_photos(sample_photos(2000))  # every shared photo: the cache misses last the whole run
    with Stack(version_dir, args.model_name) as stack:
        gateway = stack.start_gateway(grpc=False)
        url, pid = f"{stack.server.rest_url}/v1/models/{args.model_name}{verb}", stack.server.process.pid
        cpu, started = cpu_seconds(pid), time.perf_counter()
        status = post(url, sent, headers)
        answered = time.perf_counter() - started
        time.sleep(args.settle)
        result = {"body": args.body, "decoded_bytes": len(body), "sent_bytes": len(sent), "status": status,
                  "answered_s": round(answered, 3), "cpu_s": round(cpu_seconds(pid) - cpu, 3),
                  "settle_s": args.settle}
        stack.flush_cache()
        sends: list[float] = []

        def send() -> None:
            until = time.perf_counter() + (args.settle if repeated else 0)
            while not sends or time.perf_counter() < until:
                started = time.perf_counter()
                post(url, sent, headers)
                sends.append(time.perf_counter() - started)

        result.update(others_wait(gateway.http_url, photos, False, args.settle, send))
        result.update({"bodies_sent": len(sends), "body_p50_ms": round(median(sends) * 1000, 1)})
    print(result)
    write_result(args.result_name or ("model_server_json" if args.body == "many_keys"
                                      else f"model_server_json_{args.body}"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
