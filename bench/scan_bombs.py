"""Progressive JPEGs of many scans ("scan bombs", bench.common.jpeg_scan_bomb) and a GIF of many blocks
(bench.common.gif_of_blocks) against the gateway's classify and the model server's REST predict of encoded photos:
what one costs, and what the gateway's other clients wait meanwhile.

One Redis, model server and gateway (bench/stack.py) on the newest published version. Three bombs:
- small: 1,000 x 1,000 pixels of 2,000 scans (30 KB), a photo the gateway opens on its event loop;
- large: 3,000 x 3,000 pixels of 20,000 scans (513 KB), a photo it decodes in its preprocessing pool;
- gif: 64 x 64 pixels after 4 million one-byte comments (20 MB), a photo it opens in its preprocessing pool;
- gif_pictures: 200 pictures of 2,000 x 2,000 pixels (786 KB), of which the contract decodes the first alone.
Each is sent alone to the gateway's /v1/classify: its answer, how long it took and the gateway's CPU seconds over it
and the --settle seconds after. Then, while another client sends the gateway classify calls back to back, the
slowest of those beside the slowest in as long a time before:
- the small bomb, the other client's calls cache hits (what every client of the gateway waits while it decodes);
- as many large (or gif) bombs at once as the gateway has preprocessing threads, the other client's calls cache
  misses (distinct photos, the cache flushed first).
The model server's REST :predict gets each bomb alone on ``predict_image_bytes`` (base64 JSON), which decodes in
the model's graph, once a photo has had that signature's first call: its answer, time and the model server's CPU.

Usage: python -m bench.scan_bombs [--registry DIR] [--settle 2]
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import (
    cpu_seconds, gif_of_blocks, gif_of_pictures, jpeg_scan_bomb, others_wait, post, published_version_of, sample_photos,
    stack_bench_parser, write_result,
)
from bench.stack import Stack, distinct_photos

BOMBS = {"small": (1000, 2000), "large": (3000, 20000)}  # side, scans
GIF_COMMENTS = 4_000_000  # one-byte comments before the gif bomb's picture, five bytes each
GIF_PICTURES = (200, 2000)  # the gif_pictures bomb's pictures, and their side
PREPROCESS_THREADS = 2  # the gateway's preprocessing pool (services/gateway/classifier.py)
JPEG = {"Content-Type": "image/jpeg"}
GIF = {"Content-Type": "image/gif"}
JSON = {"Content-Type": "application/json"}
_sent = itertools.count()


def another(bomb: bytes) -> bytes:
    """``bomb`` with bytes of its own after its end (of image, or its trailer): the same picture, another photo to
    the cache and to single-flight (which would answer a copy sent again without decoding it)."""
    return bomb + b"sent %d" % next(_sent)


def encoded_photos_body(photo: bytes) -> bytes:
    """A TF Serving REST :predict body asking ``predict_image_bytes`` about ``photo``."""
    return json.dumps({"signature_name": "predict_image_bytes",
                       "instances": [{"b64": base64.b64encode(photo).decode()}]}).encode()


def alone(url: str, pid: int, body: bytes, headers: dict, settle: float) -> dict:
    """``body`` sent to ``url`` with nothing else sent: its answer, its time and process ``pid``'s CPU."""
    cpu = cpu_seconds(pid)
    started = time.perf_counter()
    status = post(url, body, headers)
    answered = time.perf_counter() - started
    time.sleep(settle)
    return {"status": status, "answered_s": round(answered, 3), "cpu_s": round(cpu_seconds(pid) - cpu, 3)}


def at_once(url: str, bomb: bytes, copies: int, headers: dict) -> list[int]:
    """``copies`` of ``bomb`` (each another photo) sent together: their statuses."""
    statuses = []
    senders = [threading.Thread(target=lambda copy: statuses.append(post(url, copy, headers)), args=(another(bomb),))
               for _ in range(copies)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    return sorted(statuses)


def main(argv=None) -> int:
    p = stack_bench_parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    version_dir = published_version_of(args)
    bombs = {name: jpeg_scan_bomb(side, scans) for name, (side, scans) in BOMBS.items()}
    bombs["gif"] = gif_of_blocks(b"!\xfe\x01x\x00", GIF_COMMENTS)
    bombs["gif_pictures"] = gif_of_pictures(*GIF_PICTURES)
    headers = {"small": JPEG, "large": JPEG, "gif": GIF, "gif_pictures": GIF}
    photos = distinct_photos(sample_photos(1000))
    result = {"bombs": {name: {"side": side, "scans": scans, "bytes": len(bombs[name])}
                        for name, (side, scans) in BOMBS.items()}, "settle_s": args.settle}
    result["bombs"]["gif"] = {"side": 64, "comments": GIF_COMMENTS, "bytes": len(bombs["gif"])}
    result["bombs"]["gif_pictures"] = {"side": GIF_PICTURES[1], "pictures": GIF_PICTURES[0],
                                       "bytes": len(bombs["gif_pictures"])}
    result["model_version"] = version_dir.name  # its SavedModel holds the bytes signature's graph
    with Stack(version_dir, args.model_name) as stack:
        gateway = stack.start_gateway(grpc=False)
        classify = f"{gateway.http_url}/v1/classify"
        result["gateway_classify"] = {
            name: alone(classify, gateway.process.pid, another(bomb), headers[name], args.settle)
            for name, bomb in bombs.items()}
        for name, copies, probe_photos, cached in (("small", 1, photos[:1], True),
                                                   ("large", PREPROCESS_THREADS, photos[1:], False),
                                                   ("gif", PREPROCESS_THREADS, photos[1:], False)):
            statuses = []
            stack.flush_cache()
            result["gateway_classify"][name].update(
                others_wait(gateway.http_url, probe_photos, cached, args.settle,
                            lambda: statuses.extend(at_once(classify, bombs[name], copies, headers[name]))),
                bombs_at_once=copies, statuses=statuses)
        predict = f"{stack.server.rest_url}/v1/models/{args.model_name}:predict"
        post(predict, encoded_photos_body(photos[0]), JSON)  # the signature's first call, costlier, not measured
        result["model_server_predict_image_bytes"] = {
            name: alone(predict, stack.server.process.pid, encoded_photos_body(another(bomb)), JSON, args.settle)
            for name, bomb in bombs.items()}
    print(json.dumps(result, indent=1))
    write_result("scan_bombs", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
