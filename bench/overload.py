"""The gateway under more cache-miss traffic than the machine can serve: does it keep serving what it can, in time?

Phase "capacity": closed-loop cache misses at concurrency 32 for --capacity-seconds: the miss throughput C.
Phase "overload": open-loop arrivals (Poisson) at --load x C for --seconds, each a distinct cache miss, each client
giving up after --client-timeout seconds (as apps and browsers do), each request on its own connection. A request
counts as ``served`` (200 within the client's timeout), ``refused`` (503 with a Retry-After: the client was told at
once to come back later), ``timed_out`` (the client gave up) or ``failed`` (anything else). Goodput is served
requests per second over the phase, as a share of C.
Phase "after": right after the overload, one client at a time for --after-seconds: how long until a request is
answered as fast as before the overload (the backlog the overload left behind).

Photos are the shared mushroom photos, each made a distinct cache miss by bytes appended after the image's end (which
decoders ignore), so every request costs a decode and a Predict.

Usage: python -m bench.overload [--registry DIR] [--load 2] [--seconds 20] [--client-timeout 2] [--after-seconds 30]
       [--gateway-arg=--max-queue-wait=0.5]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import median, percentiles_ms, published_version_or_exit, sample_photos, write_result
from bench.stack import Stack, distinct_photos, load, rss_mb
from training_job.paths import default_registry, shared_data_dir

SERVED, REFUSED, TIMED_OUT, FAILED = "served", "refused", "timed_out", "failed"


def unique(photos: list[bytes], index: int) -> bytes:
    """Photo ``index % len(photos)`` made a distinct cache key: its bytes with ``index`` appended after the image's
    end, where decoders stop reading."""
    return photos[index % len(photos)] + b"\0overload-bench\0" + str(index).encode()


async def open_loop(url: str, photos: list[bytes], rate: float, seconds: float, client_timeout: float,
                    first_index: int, pid: int) -> dict:
    """Requests arriving at ``rate`` per second (exponential gaps) for ``seconds``, each on its own connection with
    ``client_timeout``; returns the outcomes, latencies by outcome and the gateway's peak resident memory."""
    import aiohttp

    outcomes: list[tuple[str, float]] = []
    rss_peak = rss_mb(pid)

    async def one(photo: bytes) -> None:
        start = time.perf_counter()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=client_timeout)) as session:
                async with session.post(f"{url}/v1/classify?top_k=1", data=photo,
                                        headers={"Content-Type": "image/jpeg"}) as response:
                    await response.read()
                    if response.status == 200:
                        outcome = SERVED
                    elif response.status == 503 and response.headers.get("Retry-After"):
                        outcome = REFUSED
                    else:
                        outcome = FAILED
        except asyncio.TimeoutError:
            outcome = TIMED_OUT
        except aiohttp.ClientError:
            outcome = FAILED
        outcomes.append((outcome, time.perf_counter() - start))

    rng = random.Random(1)
    tasks = []
    began = time.perf_counter()
    next_at, index = began, first_index
    while next_at < began + seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(unique(photos, index))))
        index += 1
        next_at += rng.expovariate(rate)
        if index % 50 == 0:
            rss_peak = max(rss_peak, rss_mb(pid))
    while any(not t.done() for t in tasks):
        rss_peak = max(rss_peak, rss_mb(pid))
        await asyncio.sleep(0.1)
    elapsed = seconds
    by = {name: [lat for outcome, lat in outcomes if outcome == name] for name in (SERVED, REFUSED, TIMED_OUT, FAILED)}
    return {"sent": len(outcomes), "offered_per_s": len(outcomes) / elapsed,
            **{f"{name}_share": len(lat) / max(len(outcomes), 1) for name, lat in by.items()},
            "served_per_s": len(by[SERVED]) / elapsed,
            "served_latency": percentiles_ms(by[SERVED]) if by[SERVED] else None,
            "refused_latency": percentiles_ms(by[REFUSED]) if by[REFUSED] else None,
            "gateway_rss_peak_mb": rss_peak, "next_index": index}


async def closed_loop(url: str, photos: list[bytes], concurrency: int, seconds: float,
                      first_index: int) -> list[tuple[float, float, int]]:
    """``concurrency`` clients sending distinct cache misses back to back for ``seconds`` (each waiting up to 60 s
    for its answer): (time since the start, latency, status) of each request."""
    import aiohttp

    rows = []
    began = time.perf_counter()
    index = first_index

    async def client(session) -> None:
        nonlocal index
        while time.perf_counter() - began < seconds:
            photo = unique(photos, index)
            index += 1
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/classify?top_k=1", data=photo,
                                        headers={"Content-Type": "image/jpeg"}) as response:
                    await response.read()
                    status = response.status
            except (asyncio.TimeoutError, aiohttp.ClientError):
                status = 0
            rows.append((start - began, time.perf_counter() - start, status))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return rows


def recovery_s(rows: list[tuple[float, float, int]], normal_s: float) -> float | None:
    """How long the overload's backlog held up the requests after it: when the first one answered 200 within twice
    ``normal_s`` was sent (None if none was). A gateway still working through requests whose clients left answers
    every request late until that work is done."""
    return next((at for at, latency, status in rows if status == 200 and latency <= 2 * normal_s), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--model-name", default="mushrooms")
    parser.add_argument("--data", type=Path, default=shared_data_dir() / "mushrooms")
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--load", type=float, default=2.0, help="offered load as a multiple of the capacity")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--after-seconds", type=float, default=30.0)
    parser.add_argument("--client-timeout", type=float, default=2.0)
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="print, write no result")
    args = parser.parse_args(argv)

    version_dir = published_version_or_exit(args.registry, args.model_name)
    photos = distinct_photos(sample_photos(args.photos, args.data))
    with Stack(version_dir, args.model_name) as stack:
        gateway = stack.start_gateway(*args.gateway_arg, grpc=False)
        load("http", gateway, photos[:64], 8, count=64)  # connections, threads, first calls: untimed
        rows = asyncio.run(closed_loop(gateway.http_url, photos, 32, args.capacity_seconds, 0))
        capacity = sum(status == 200 for _, _, status in rows) / args.capacity_seconds
        normal = asyncio.run(closed_loop(gateway.http_url, photos, 1, 5, 1_000_000))
        normal_s = median([latency for _, latency, _ in normal])
        print(f"capacity: {capacity:.1f} req/s (c32 misses); c1 p50 {normal_s * 1000:.1f} ms", flush=True)
        overload = asyncio.run(open_loop(gateway.http_url, photos, args.load * capacity, args.seconds,
                                         args.client_timeout, 2_000_000, gateway.process.pid))
        print(f"overload: {overload}", flush=True)
        rows = asyncio.run(closed_loop(gateway.http_url, photos, 1, args.after_seconds, overload["next_index"]))
        recovered = recovery_s(rows, normal_s)
    result = {"capacity_per_s": capacity, "load": args.load, "client_timeout_s": args.client_timeout,
              "seconds": args.seconds, "overload": overload, "goodput": overload["served_per_s"] / capacity,
              "normal_c1_p50_ms": normal_s * 1000, "recovery_s": recovered,
              "after_p50_ms": median([lat for _, lat, _ in rows]) * 1000, "gateway_args": args.gateway_arg}
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write_result("overload", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
