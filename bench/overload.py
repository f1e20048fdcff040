"""The gateway under more cache-miss traffic than the machine can serve: does it keep serving what it can, in time?

Phase "capacity": closed-loop cache misses at concurrency 32 for --capacity-seconds: the miss throughput C.
Phase "overload": open-loop arrivals (Poisson) at --load x C for --seconds, each a distinct cache miss, each client
giving up after --client-timeout seconds (as apps and browsers do), each request on its own connection. A request
counts as ``served`` (200 within the client's timeout), ``refused`` (503 with a Retry-After: the client was told at
once to come back later), ``timed_out`` (the client gave up) or ``failed`` (anything else). Goodput is served
requests per second over the phase, as a share of C.
Phase "after": right after the overload, one client at a time for --after-seconds: how long until a request is
answered as fast as before the overload (the backlog the overload left behind).

With --short-timeout, clients with two deadlines: a --short-share of them give up after --short-timeout, the rest
after --client-timeout, in overload phases alternating (--rounds each, the same arrivals) between clients whose
deadline the gateway is not told and clients that tell it (Envoy's x-envoy-expected-rq-timeout-ms header, as behind
Istio): told, the gateway refuses at once a miss it would not answer in time (504 deadline_unreachable, outcome
``deadline_refused``) instead of taking it on until its client leaves. Written as overload_deadlines.json.

Photos are the shared mushroom photos, each made a distinct cache miss by bytes appended after the image's end (which
decoders ignore), so every request costs a decode and a Predict.

Usage: python -m bench.overload [--registry DIR] [--load 2] [--seconds 20] [--client-timeout 2] [--after-seconds 30]
       [--gateway-arg=--max-queue-wait=0.5] [--short-timeout 0.5 [--short-share 0.5] [--rounds 2]]
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
from bench.faults import LOST, OK, UNAVAILABLE, Answer, timeline
from bench.stack import Stack, distinct_photos, load, rss_mb
from training_job.paths import default_registry, shared_data_dir

SERVED, REFUSED, DEADLINE_REFUSED, TIMED_OUT, FAILED = "served", "refused", "deadline_refused", "timed_out", "failed"
# An outcome as a timeline (bench/faults.timeline) counts it: answered, told at once to come back later, or not.
AS_FAULT_OUTCOME = {SERVED: OK, REFUSED: UNAVAILABLE, DEADLINE_REFUSED: UNAVAILABLE, TIMED_OUT: LOST, FAILED: LOST}
OUTCOMES = (SERVED, REFUSED, DEADLINE_REFUSED, TIMED_OUT, FAILED)
EXPECTED_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"  # as Envoy sends it (services/gateway/http_api.py)


def unique(photos: list[bytes], index: int) -> bytes:
    """Photo ``index % len(photos)`` made a distinct cache key: its bytes with ``index`` appended after the image's
    end, where decoders stop reading."""
    return photos[index % len(photos)] + b"\0overload-bench\0" + str(index).encode()


def tally(outcomes: list[tuple[str, float]], seconds: float) -> dict:
    """Shares of each outcome, served per second over ``seconds``, latencies of the served and the refused."""
    by = {name: [lat for outcome, lat in outcomes if outcome == name] for name in OUTCOMES}
    return {"sent": len(outcomes), "offered_per_s": len(outcomes) / seconds,
            **{f"{name}_share": len(lat) / max(len(outcomes), 1) for name, lat in by.items()},
            "served_per_s": len(by[SERVED]) / seconds,
            "served_latency": percentiles_ms(by[SERVED]) if by[SERVED] else None,
            "refused_latency": percentiles_ms(by[REFUSED]) if by[REFUSED] else None,
            "deadline_refused_latency": percentiles_ms(by[DEADLINE_REFUSED]) if by[DEADLINE_REFUSED] else None}


async def open_loop(url: str, photos: list[bytes], rate: float, seconds: float, client_timeout: float,
                    first_index: int, pid: int, short_share: float = 0.0, short_timeout: float | None = None,
                    tell: bool = False) -> dict:
    """Requests arriving at ``rate`` per second (exponential gaps) for ``seconds``, each on its own connection with
    ``client_timeout`` (or, for a ``short_share`` of them, ``short_timeout``; the same ones for the same arguments),
    telling the gateway that timeout when ``tell``; returns the outcomes, latencies by outcome (also by client kind,
    ``short`` and ``long``, when there are two), the gateway's peak resident memory, the seconds until the last answer
    (``drained_s``) and the answers' timeline (bench/faults.timeline: the overload as its fault, from its start to
    its end)."""
    import aiohttp

    outcomes: list[tuple[str, str, float]] = []  # (kind, outcome, latency)
    answers: list[Answer] = []  # the same, as bench/faults.py counts them, for the phase's timeline
    rss_peak = rss_mb(pid)

    async def one(photo: bytes, kind: str, timeout: float) -> None:
        headers = {"Content-Type": "image/jpeg"}
        if tell:
            headers[EXPECTED_TIMEOUT_HEADER] = str(round(timeout * 1000))
        start = time.perf_counter()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                async with session.post(f"{url}/v1/classify?top_k=1", data=photo, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        outcome = SERVED
                    elif response.status == 503 and response.headers.get("Retry-After"):
                        outcome = REFUSED
                    elif response.status == 504:
                        outcome = DEADLINE_REFUSED
                    else:
                        outcome = FAILED
        except asyncio.TimeoutError:
            outcome = TIMED_OUT
        except aiohttp.ClientError:
            outcome = FAILED
        done = time.perf_counter()
        outcomes.append((kind, outcome, done - start))
        answers.append(Answer(start, done, AS_FAULT_OUTCOME[outcome], outcome))

    rng, kinds = random.Random(1), random.Random(2)
    tasks = []
    began = time.perf_counter()
    next_at, index = began, first_index
    while next_at < began + seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        short = short_timeout is not None and kinds.random() < short_share
        tasks.append(asyncio.create_task(one(unique(photos, index), "short" if short else "long",
                                             short_timeout if short else client_timeout)))
        index += 1
        next_at += rng.expovariate(rate)
        if index % 50 == 0:
            rss_peak = max(rss_peak, rss_mb(pid))
    while any(not t.done() for t in tasks):
        rss_peak = max(rss_peak, rss_mb(pid))
        await asyncio.sleep(0.1)
    result = {**tally([(outcome, lat) for _, outcome, lat in outcomes], seconds), "gateway_rss_peak_mb": rss_peak,
              "next_index": index, "drained_s": max((a.done for a in answers), default=began) - began,
              "timeline": timeline(answers, began, began + seconds, None)}
    del result["timeline"]["recovered_s"]  # measured after the spike, by main, where it is
    if short_timeout is not None:
        result["by_kind"] = {kind: tally([(outcome, lat) for k, outcome, lat in outcomes if k == kind], seconds)
                             for kind in ("short", "long")}
    return result


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
    parser.add_argument("--short-timeout", type=float, default=None,
                        help="a share of clients give up after this many seconds: the told/untold comparison")
    parser.add_argument("--short-share", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2, help="untold and told overload phases, each, alternating")
    parser.add_argument("--quiet-seconds", type=float, default=12.0,
                        help="between two overload phases: longer than the gateway's answer-rate memory (10 s)")
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
        if args.short_timeout is not None:
            return told_against_untold(args, gateway, photos, capacity)
        overload = asyncio.run(open_loop(gateway.http_url, photos, args.load * capacity, args.seconds,
                                         args.client_timeout, 2_000_000, gateway.process.pid))
        print(f"overload: {overload}", flush=True)
        rows = asyncio.run(closed_loop(gateway.http_url, photos, 1, args.after_seconds, overload["next_index"]))
        recovered = recovery_s(rows, normal_s)
        # the timeline's "full service": a request answered as fast as before (None: none was)
        overload["timeline"]["recovered_s"] = None if recovered is None else overload["drained_s"] + recovered
    result = {"capacity_per_s": capacity, "load": args.load, "client_timeout_s": args.client_timeout,
              "seconds": args.seconds, "overload": overload, "goodput": overload["served_per_s"] / capacity,
              "normal_c1_p50_ms": normal_s * 1000, "recovery_s": recovered,
              "after_p50_ms": median([lat for _, lat, _ in rows]) * 1000, "gateway_args": args.gateway_arg}
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write_result("overload", result)
    return 0


def told_against_untold(args, gateway, photos: list[bytes], capacity: float) -> int:
    """The overload phases of --short-timeout, alternating untold and told, the same arrivals in each; writes
    overload_deadlines.json."""
    phases = {"untold": [], "told": []}
    index = 3_000_000
    for round_ in range(args.rounds):
        for name in ("untold", "told"):
            time.sleep(args.quiet_seconds)
            spike = asyncio.run(open_loop(gateway.http_url, photos, args.load * capacity, args.seconds,
                                          args.client_timeout, index, gateway.process.pid, args.short_share,
                                          args.short_timeout, tell=name == "told"))
            index = spike["next_index"]
            spike["goodput"] = spike["served_per_s"] / capacity
            phases[name].append(spike)
            print(f"round {round_ + 1} {name}: goodput {spike['goodput']:.3f}; by kind "
                  + "; ".join(f"{kind}: served {row['served_share']:.2f}, timed out {row['timed_out_share']:.2f}, "
                              f"refused {row['refused_share']:.2f}, deadline refused {row['deadline_refused_share']:.2f}"
                              for kind, row in spike["by_kind"].items()), flush=True)
    summary = {name: {"goodput": median([p["goodput"] for p in runs]),
                      **{f"{kind}_{outcome}_share": median([p["by_kind"][kind][f"{outcome}_share"] for p in runs])
                         for kind in ("short", "long") for outcome in OUTCOMES}}
               for name, runs in phases.items()}
    result = {"capacity_per_s": capacity, "load": args.load, "seconds": args.seconds,
              "client_timeout_s": args.client_timeout, "short_timeout_s": args.short_timeout,
              "short_share": args.short_share, "rounds": args.rounds, "phases": phases, "median": summary,
              "gateway_args": args.gateway_arg}
    print(json.dumps(summary, indent=2))
    if not args.no_write:
        write_result("overload_deadlines", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
