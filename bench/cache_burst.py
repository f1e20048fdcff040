"""A burst of cache hits: how many connections the gateway opens to Redis for it, and whether hits stay hits.

One Redis, model server and gateway (bench/stack.py) on the newest published version. --photos photos are
classified once (cached from then on), then sent --rounds times in bursts of each --bursts size, every request of
a burst at once on its own connection. For each burst: the connections Redis accepted meanwhile and the clients it
holds afterwards, the answers that came from the cache, the gateway's cache lookups that failed or skipped Redis
(its breaker), the Predict calls that reached the model server, and the burst's wall time (medians over the
rounds).

Then the cache's command path alone, in this process against the same Redis (services/gateway/cache.py's
CommandConnections): CPU microseconds per GET, one command at a time and 32 at once (medians of --rounds runs).

Usage: python -m bench.cache_burst [--registry DIR] [--bursts 400 2000] [--rounds 3] [--photos 20]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import median, published_version_or_exit, sample_photos, write_result
from bench.stack import Stack
from training_job.paths import default_registry

CACHE_METRIC = "mushroom_gateway_cache_total"


async def send_burst(url: str, photos: list[bytes], size: int) -> list[tuple[int, bool]]:
    """``size`` classify calls at once, each on its own connection: (status, answered from the cache); status 0 for
    a call that got no answer (its connection refused or reset)."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one(i: int) -> tuple[int, bool]:
            try:
                async with session.post(url, data=photos[i % len(photos)],
                                        headers={"Content-Type": "image/jpeg"}) as response:
                    body = await response.json()
                    return response.status, bool(body.get("cached")) if isinstance(body, dict) else False
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return 0, False  # no answer: counted as not answered OK

        return await asyncio.gather(*(one(i) for i in range(size)))


def burst_figures(stack: Stack, gateway, photos: list[bytes], size: int) -> dict:
    import redis

    client = redis.Redis.from_url(stack.redis.url)
    try:
        failed = sum(gateway.metric(CACHE_METRIC, outcome=o) for o in ("error", "bypass"))
        accepted, calls = client.info("stats")["total_connections_received"], stack.predict_calls()
        started = time.perf_counter()
        answers = asyncio.run(send_burst(f"{gateway.http_url}/v1/classify", photos, size))
        wall = time.perf_counter() - started
        accepted = client.info("stats")["total_connections_received"] - accepted
        held = client.info("clients")["connected_clients"] - 1  # this client's own
    finally:
        client.close()
    return {"redis_connections_accepted": accepted, "redis_clients_after": held,
            "answered_ok": sum(status == 200 for status, _ in answers),
            "cached_fraction": sum(cached for _, cached in answers) / size,
            "cache_lookups_failed_or_skipped": sum(gateway.metric(CACHE_METRIC, outcome=o)
                                                   for o in ("error", "bypass")) - failed,
            "predict_calls": stack.predict_calls() - calls, "wall_s": wall}


async def command_cpu_us(redis_url: str, commands: int, at_once: int) -> float:
    import redis.asyncio as aioredis

    from services.gateway.cache import CommandConnections

    client = aioredis.from_url(redis_url, socket_timeout=0.1, socket_connect_timeout=0.1)
    connections = CommandConnections(client)
    try:
        await connections.command("SET", "bench:cache_burst", "x" * 800)  # about an answer's size
        started = time.process_time()
        for _ in range(commands // at_once):
            await asyncio.gather(*(connections.command("GET", "bench:cache_burst") for _ in range(at_once)))
        return (time.process_time() - started) / commands * 1e6
    finally:
        await connections.close()
        await client.aclose()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, default=None, help="default: the project's registry")
    p.add_argument("--model-name", default="mushrooms")
    p.add_argument("--bursts", type=int, nargs="+", default=[400, 2000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--photos", type=int, default=20)
    args = p.parse_args(argv)
    version_dir = published_version_or_exit(args.registry or default_registry(), args.model_name)
    photos = [path.read_bytes() for path in sample_photos(args.photos)]
    with Stack(version_dir, args.model_name) as stack:
        gateway = stack.start_gateway(grpc=False)
        asyncio.run(send_burst(f"{gateway.http_url}/v1/classify", photos, len(photos)))  # each photo cached
        bursts = {}
        for size in args.bursts:
            rounds = [burst_figures(stack, gateway, photos, size) for _ in range(args.rounds)]
            bursts[str(size)] = {key: median([r[key] for r in rounds]) for key in rounds[0]}
            print(size, bursts[str(size)], flush=True)
        cpu = {str(at_once): median([asyncio.run(command_cpu_us(stack.redis.url, 20_000, at_once))
                                     for _ in range(args.rounds)]) for at_once in (1, 32)}
        print("CPU us per GET", cpu, flush=True)
    write_result("cache_burst", {"photos": len(photos), "rounds": args.rounds, "bursts": bursts,
                                 "command_cpu_us": cpu})
    return 0


if __name__ == "__main__":
    sys.exit(main())
