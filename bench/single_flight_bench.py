"""Identical concurrent cache misses with and without single-flight, through the real gateway, in one run.

One Redis and one model server (batching on, as deployed); two gateways on them, one as shipped (single-flight on)
and one started with --no-single-flight. Each round picks a photo, empties the result cache and sends that photo from
--concurrency clients at once (HTTP /v1/classify) to one gateway, then again, cache emptied, to the other. Upstream
Predict calls are read from the model server's own Prometheus counter (and the gateway's upstream histogram), before
and after each burst; wall time is from the first request sent to the last answer.

Usage: python -m bench.single_flight_bench [--registry DIR] [--concurrency 32] [--rounds 5]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import published_version_or_exit, sample_photos, write_result
from bench.stack import Stack, distinct_photos, http_load
from training_job.paths import default_registry

MODES = {"single_flight_on": (), "single_flight_off": ("--no-single-flight",)}


async def burst(stack: Stack, gateway, session, photo: bytes, concurrency: int) -> dict:
    stack.flush_cache()
    before = (stack.predict_calls(), gateway.metric("mushroom_gateway_upstream_seconds_count"),
              gateway.metric("mushroom_gateway_cache_total", outcome="hit"))
    load = await http_load(gateway.http_url, [photo], concurrency, count=concurrency, session=session)
    after = (stack.predict_calls(), gateway.metric("mushroom_gateway_upstream_seconds_count"),
             gateway.metric("mushroom_gateway_cache_total", outcome="hit"))
    return {"model_server_predict_calls": after[0] - before[0], "gateway_upstream_calls": after[1] - before[1],
            "cache_hits": after[2] - before[2], "wall_ms": load["wall_s"] * 1000, "p50_ms": load["p50_ms"],
            "errors": load["errors"], "requests": load["n"]}


async def measure(stack: Stack, warmup: list[bytes], photos: list[bytes], concurrency: int) -> dict:
    import aiohttp

    bursts = {mode: [] for mode in MODES}
    gateways = {mode: stack.start_gateway(*flags, grpc=False) for mode, flags in MODES.items()}
    sessions = {mode: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) for mode in MODES}
    try:
        for mode, gateway in gateways.items():
            # untimed: the model's first calls, then `concurrency` kept-alive connections open (cache hits), so a
            # burst's requests reach the gateway together rather than one TCP handshake apart
            await http_load(gateway.http_url, warmup, 4, count=len(warmup), session=sessions[mode])
            await http_load(gateway.http_url, warmup[:1], concurrency, count=concurrency, session=sessions[mode])
        for photo in photos:  # interleaved, so the two modes see the same machine
            for mode, gateway in gateways.items():
                bursts[mode].append(await burst(stack, gateway, sessions[mode], photo, concurrency))
    finally:
        for session in sessions.values():
            await session.close()
    return bursts


def summary(bursts: list[dict]) -> dict:
    def median(key):
        return float(np.median([b[key] for b in bursts]))

    return {"bursts": bursts, "predict_calls_per_burst": median("model_server_predict_calls"),
            "gateway_upstream_calls_per_burst": median("gateway_upstream_calls"), "wall_ms": median("wall_ms"),
            "p50_ms": median("p50_ms"), "cache_hits_per_burst": median("cache_hits"),
            "errors": sum(b["errors"] for b in bursts)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--model_name", default="mushrooms")
    parser.add_argument("--concurrency", type=int, default=32, help="identical requests sent at once")
    parser.add_argument("--rounds", type=int, default=5, help="bursts per mode (a different photo each round)")
    args = parser.parse_args(argv)
    version_dir = published_version_or_exit(args.registry, args.model_name)
    photos = distinct_photos(sample_photos(args.rounds + 4))
    warmup, photos = photos[:4], photos[4:4 + args.rounds]

    with Stack(version_dir, args.model_name) as stack:
        bursts = asyncio.run(measure(stack, warmup, photos, args.concurrency))
    result = {"model": str(version_dir), "concurrency": args.concurrency, "rounds": len(photos),
              **{mode: summary(rows) for mode, rows in bursts.items()}}
    on, off = result["single_flight_on"], result["single_flight_off"]
    result["wall_time_off_vs_on"] = off["wall_ms"] / on["wall_ms"]
    for mode in MODES:
        row = result[mode]
        print(f"{mode}: {row['predict_calls_per_burst']:.0f} model server Predict calls per burst of "
              f"{args.concurrency} (gateway upstream calls {row['gateway_upstream_calls_per_burst']:.0f}), burst wall "
              f"{row['wall_ms']:.0f} ms, p50 {row['p50_ms']:.0f} ms, errors {row['errors']}")
    write_result("single_flight", result)
    return 0 if on["errors"] == off["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
