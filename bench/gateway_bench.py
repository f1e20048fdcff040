"""The gateway against its references, in one run: the raw model, the model server called directly, and the gateway
over HTTP and gRPC, cache miss and cache hit, at concurrency 1, 8 and 32 (12 cells); gateway memory after 1,000 and
10,000 requests. The model server runs with batching on, as deployed.

Usage: python -m bench.gateway_bench [--registry DIR] [--seconds 8]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import (
    load_serving_signature, percentiles_ms, published_version_or_exit, raw_throughput, write_result,
)
from bench.stack import Stack, distinct_photos, load
from training_job.paths import default_registry, shared_data_dir
from training_job.preprocessing import load_image_file

PROTOCOLS = ("http", "grpc")
CONCURRENCY = (1, 8, 32)
HOT_SET = 200  # photos cached for the hit cells; the rest (about 1,000) are the miss cells' cold set


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def direct_c1(target: str, model: str, pixels: np.ndarray, n: int) -> dict:
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from services.gateway.upstream import pixels_tensor

    times = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for i in range(n):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model
            request.inputs["images"].CopyFrom(pixels_tensor(pixels[i % len(pixels)][None]))
            start = time.perf_counter()
            await stub.Predict(request, timeout=60)
            times.append(time.perf_counter() - start)
    return percentiles_ms(times[3:])


def cells(stack: Stack, gateway, cold: list[bytes], hot: list[bytes], seconds: float) -> dict:
    """The 12 cells: {http, grpc} x {miss, hit} x concurrency {1, 8, 32}. A miss cell starts on an empty cache and
    sends each of ``cold`` at most once; a hit cell sends ``hot``, cached just before."""
    def measured(photos, concurrency, **limits) -> dict:
        """One cell, with the share of its requests the gateway itself counted as cache hits (a check)."""
        hits = gateway.metric("mushroom_gateway_cache_total", outcome="hit")
        row = load(protocol, gateway, photos, concurrency, seconds=seconds, **limits)
        row["cache_hit_share"] = (gateway.metric("mushroom_gateway_cache_total", outcome="hit") - hits) / row["n"]
        return row

    out = {}
    for protocol in PROTOCOLS:
        for concurrency in CONCURRENCY:
            stack.flush_cache()
            out[f"{protocol}_miss_c{concurrency}"] = measured(cold, concurrency, count=len(cold))
            load(protocol, gateway, hot, 32, count=len(hot))  # cache the hot set (untimed)
            out[f"{protocol}_hit_c{concurrency}"] = measured(hot, concurrency)
            for kind in ("miss", "hit"):
                row = out[f"{protocol}_{kind}_c{concurrency}"]
                print(f"{protocol:4s} {kind:4s} c{concurrency:<2d}: {row['requests_per_s']:7.1f} req/s  p50 "
                      f"{row['p50_ms']:7.2f} ms  errors {row['errors']}  cache hits {row['cache_hit_share']:.0%}",
                      flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--model_name", default="mushrooms")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time of each cell")
    args = parser.parse_args(argv)
    version_dir = published_version_or_exit(args.registry, args.model_name)

    paths = sorted((shared_data_dir() / "mushrooms").glob("*/*"))
    photos = distinct_photos(paths)
    hot, cold = photos[:HOT_SET], photos[HOT_SET:]
    pixels = np.stack([load_image_file(p) for p in paths[:64]])
    raw_b32 = raw_throughput(load_serving_signature(version_dir), pixels, 32, args.seconds)["images_per_s"]
    result = {"model": str(version_dir), "raw_b32_images_per_s": raw_b32, "seconds_per_cell": args.seconds,
              "hot_set": len(hot), "cold_set": len(cold)}

    with Stack(version_dir, args.model_name) as stack:
        logs = stack.work
        gateway = stack.start_gateway()
        for protocol in PROTOCOLS:  # connections, threads and the model's first calls, untimed
            load(protocol, gateway, hot[:8], 4, count=8)
        stack.flush_cache()
        result["direct_model_server_c1"] = asyncio.run(direct_c1(stack.server.grpc_target, args.model_name, pixels,
                                                                 200))
        result["cells"] = cells(stack, gateway, cold, hot, args.seconds)
        load("http", gateway, hot, 8, count=1000)
        result["rss_mb_after_1000"] = rss_mb(gateway.process.pid)
        load("http", gateway, hot, 8, count=9000)
        result["rss_mb_after_10000"] = rss_mb(gateway.process.pid)

    c = result["cells"]
    miss1, hit1, miss32, hit32 = c["http_miss_c1"], c["http_hit_c1"], c["http_miss_c32"], c["http_hit_c32"]
    rss_growth = result["rss_mb_after_10000"] / result["rss_mb_after_1000"] - 1
    rows = [
        ("gateway_minus_model_server_p50", "gateway p50 (HTTP, cache miss, c1) minus model server p50 (gRPC, "
         "preprocessed pixels, c1)", miss1["p50_ms"] - result["direct_model_server_c1"]["p50_ms"], "<= 2 ms", "ms",
         lambda v: v <= 2),
        ("cache_hit_p50", "cache-hit p50 over HTTP", hit1["p50_ms"], "<= 2 ms", "ms", lambda v: v <= 2),
        ("hit_vs_miss_throughput", "cache-hit vs cache-miss throughput at concurrency 32",
         hit32["requests_per_s"] / miss32["requests_per_s"], ">= 20x", "x", lambda v: v >= 20),
        ("miss_c32_vs_raw_b32", "cache-miss throughput at concurrency 32 / raw model at batch 32",
         miss32["requests_per_s"] / result["raw_b32_images_per_s"], ">= 0.85", "", lambda v: v >= 0.85),
        ("single_photo_p50", "single-photo p50 end to end at concurrency 1 (cache miss)", miss1["p50_ms"], "<= 25 ms",
         "ms", lambda v: v <= 25),
        ("rss_growth", "gateway resident memory after 10,000 requests vs after 1,000", rss_growth * 100, "< +10 %",
         "%", lambda v: v < 10),
    ]
    result["targets"] = {key: {"what": what, "value": round(value, 3), "target": target, "unit": unit,
                               "met": bool(check(value))} for key, what, value, target, unit, check in rows}
    for row in result["targets"].values():
        print(f"{row['what']}: {row['value']} {row['unit']} (target {row['target']}: "
              f"{'met' if row['met'] else 'NOT met'})")
    write_result("gateway", result)
    errors = sum(row["errors"] for row in c.values())
    if errors:
        print(f"{errors} requests failed: see the logs in {logs}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
