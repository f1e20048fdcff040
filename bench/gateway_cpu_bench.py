"""CPU time of the gateway process per cache-miss request (issue 13's "gateway CPU per miss"), split into the
preprocessing contract (``preprocess_bytes``) and the rest (HTTP, the gRPC call, Redis, the answer, metrics, asyncio).

The stack serves a tiny model (training_job/tiny_model.py, input size --image-size), so the model server's CPU stays
small and the gateway's overhead is what is measured. Each round flushes the cache and sends every photo once over HTTP
at --concurrency (all misses, checked against the gateway's own cache counter); the gateway's CPU seconds
(/proc/<pid>/stat, all its threads) over the round divided by the answered requests is that round's figure. The
preprocess share is ``preprocess_bytes`` on the same photos in this process, one thread (``time.process_time``);
"rest" is the median round minus it.

--compare-to DIR runs a second gateway from another checkout's code (DIR, e.g. a `git archive` of the commit before a
change) beside this one on the same stack, rounds alternating ABBA, and adds its figures and the paired differences.

--profile FILE runs the gateway under cProfile (its event loop thread; services/gateway/__main__.py) and writes the
profile there, with the top functions per request printed; a profiled run writes no result.

Usage: python -m bench.gateway_cpu_bench [--photos 1000] [--rounds 3] [--concurrency 32] [--compare-to DIR]
       [--profile FILE]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import alternating_rounds, cpu_seconds, median, sample_photos, write_result
from bench.stack import Stack, distinct_photos, load, measured
from training_job.paths import shared_data_dir
from training_job.preprocessing import Limits, preprocess_bytes

TARGET_MS = 2.0  # issue 13: gateway CPU per miss
MODEL_NAME = "mushrooms"


def preprocess_cpu_ms(photos: list[bytes], size: int) -> float:
    """Mean CPU ms of ``preprocess_bytes`` per photo, one thread, each photo's least disturbed of two runs."""
    limits, total = Limits(), 0.0
    for photo in photos:
        runs = []
        for _ in range(2):
            start = time.process_time()
            preprocess_bytes(photo, size, limits)
            runs.append(time.process_time() - start)
        total += min(runs)
    return total * 1000 / len(photos)


def miss_round(stack: Stack, gateway, photos: list[bytes], concurrency: int) -> dict:
    """The cache flushed, every photo sent once: the gateway's and the model server's CPU ms per answered request."""
    stack.flush_cache()
    pid = gateway.process.pid
    # the gateway's main thread (its event loop): /proc/<pid>/task/<pid>/stat, read as cpu_seconds reads a process
    clocks = {"gateway_ms": lambda: cpu_seconds(pid),
              "gateway_loop_thread_ms": lambda: cpu_seconds(f"{pid}/task/{pid}"),
              "model_server_ms": lambda: cpu_seconds(stack.server.process.pid)}
    skipped_before = cache_skipped(gateway)
    before = {name: clock() for name, clock in clocks.items()}
    row = measured(gateway, "http", photos, concurrency, count=len(photos))
    answered = max(row["n"], 1)
    row["cache_skipped"] = cache_skipped(gateway) - skipped_before
    return {**{name: (clock() - before[name]) * 1000 / answered for name, clock in clocks.items()},
            "requests_per_s": row["requests_per_s"], "p50_ms": row["p50_ms"], "p95_ms": row["p95_ms"],
            "errors": row["errors"], "cache_hit_share": row["cache_hit_share"], "cache_skipped": row["cache_skipped"]}


def cache_skipped(gateway) -> float:
    """Cache lookups the gateway did not make (Redis failing, or its circuit breaker open): a round with any spent
    less CPU on Redis than a miss costs."""
    return sum(gateway.metric("mushroom_gateway_cache_total", outcome=outcome) for outcome in ("error", "bypass"))


def summary(rounds: list[dict], preprocess_ms: float) -> dict:
    gateway_ms = median([r["gateway_ms"] for r in rounds])
    return {"gateway_cpu_ms_per_miss": {"rounds": [r["gateway_ms"] for r in rounds], "median": gateway_ms,
                                        "preprocess": preprocess_ms, "rest": gateway_ms - preprocess_ms},
            "gateway_loop_thread_cpu_ms_per_miss": median([r["gateway_loop_thread_ms"] for r in rounds]),
            "model_server_cpu_ms_per_miss": median([r["model_server_ms"] for r in rounds]),
            **{key: median([r[key] for r in rounds]) for key in ("requests_per_s", "p50_ms", "p95_ms")}}


def print_profile(path: Path, requests: int, top: int = 30) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    rows = sorted(stats.stats.items(), key=lambda item: item[1][3], reverse=True)  # cumulative time
    print(f"top {top} by cumulative time, ms per request ({requests} requests; cProfile inflates small calls):")
    for (file, line, name), (_, calls, own, cumulative, _) in rows[:top]:
        print(f"{cumulative * 1000 / requests:8.3f} cum {own * 1000 / requests:7.3f} own {calls / requests:6.1f} "
              f"calls  {Path(file).name}:{line} {name}")
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # own time
    print(f"top {top} by own time:")
    for (file, line, name), (_, calls, own, cumulative, _) in rows[:top]:
        print(f"{own * 1000 / requests:8.3f} own {cumulative * 1000 / requests:7.3f} cum {calls / requests:6.1f} "
              f"calls  {Path(file).name}:{line} {name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=shared_data_dir() / "mushrooms")
    parser.add_argument("--photos", type=int, default=1000, help="distinct photos, each sent once per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="the tiny model's input size")
    parser.add_argument("--profile", type=Path, help="run the gateway under cProfile, write the profile here")
    parser.add_argument("--compare-to", type=Path, help="another checkout (e.g. a `git archive` of the commit before a "
                        "change): its gateway runs beside this one's on the same stack, rounds alternating")
    args = parser.parse_args(argv)

    photos = distinct_photos(sample_photos(args.photos, args.data))
    from training_job.tiny_model import write_tiny_model  # TensorFlow, only to write the model

    work = Path(tempfile.mkdtemp(prefix="gateway-cpu-bench-"))
    version_dir = write_tiny_model(work / MODEL_NAME / "1", image_size=args.image_size)
    preprocess_ms = preprocess_cpu_ms(photos, args.image_size)
    print(f"{len(photos)} photos; preprocess_bytes {preprocess_ms:.3f} ms CPU per photo", flush=True)
    env = {"MUSHROOM_GATEWAY_PROFILE": str(args.profile.resolve())} if args.profile else None
    with Stack(version_dir, MODEL_NAME) as stack:
        gateways = {"this": stack.start_gateway(grpc=False, env=env)}
        if args.compare_to:  # that checkout's code: its folder first on the path, not this one (the cwd)
            gateways["compared"] = stack.start_gateway(grpc=False, env={
                "PYTHONPATH": str(args.compare_to.resolve()), "PYTHONSAFEPATH": "1"})
        for gateway in gateways.values():
            load("http", gateway, photos[:64], 8, count=64)  # connections, threads, first calls: untimed

        def round_on(name: str):
            def one_round() -> dict:
                row = miss_round(stack, gateways[name], photos, args.concurrency)
                print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
                return row
            return one_round

        runs = alternating_rounds({name: round_on(name) for name in gateways}, args.rounds, abba=True)
        for gateway in list(gateways.values()):
            stack.stop_gateway(gateway)  # SIGTERM: a profiled gateway writes its profile
    if args.profile:
        print_profile(args.profile, 64 + len(photos) * args.rounds)
        return 0
    result = {"photos": len(photos), "rounds": args.rounds, "concurrency": args.concurrency,
              "image_size": args.image_size, "model": "tiny (training_job/tiny_model.py)",
              "errors": sum(r["errors"] for r in runs["this"]),
              "cache_hit_share_max": max(r["cache_hit_share"] for r in runs["this"]),
              "cache_lookups_skipped": sum(r["cache_skipped"] for r in runs["this"]),
              **summary(runs["this"], preprocess_ms), "target_ms": TARGET_MS}
    result["met"] = result["gateway_cpu_ms_per_miss"]["median"] <= TARGET_MS
    if args.compare_to:
        compared = summary(runs["compared"], preprocess_ms)
        differences = [a["gateway_ms"] - b["gateway_ms"] for a, b in zip(runs["this"], runs["compared"])]
        result["compared_to"] = {"checkout": str(args.compare_to), **compared,
                                 "cache_lookups_skipped": sum(r["cache_skipped"] for r in runs["compared"]),
                                 "this_minus_compared_ms": {"rounds": differences, "median": median(differences)}}
        print(f"this {result['gateway_cpu_ms_per_miss']['median']:.3f} vs compared "
              f"{compared['gateway_cpu_ms_per_miss']['median']:.3f} ms CPU per miss; median of paired differences "
              f"{median(differences):+.3f} ms", flush=True)
    write_result("gateway_cpu", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
