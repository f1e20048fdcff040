"""The gateway against its references, in one run: the raw model, the model server called directly, and the gateway
over HTTP with cache misses and hits; gateway memory after 1,000 and 10,000 requests.

Usage: python -m bench.gateway_bench [--registry DIR] [--seconds 8]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import (
    load_serving_signature, percentiles_ms, published_version_or_exit, raw_throughput, write_result,
)
from training_job.paths import PROJECT_ROOT, default_registry, shared_data_dir
from training_job.preprocessing import load_image_file


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def http_load(url: str, photos: list[bytes], concurrency: int, seconds: float | None = None,
                    count: int | None = None) -> dict:
    import aiohttp

    times, errors, next_index = [], 0, 0
    deadline = time.perf_counter() + (seconds or 1e9)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker():
            nonlocal errors, next_index
            while time.perf_counter() < deadline and (count is None or next_index < count):
                photo = photos[next_index % len(photos)]
                next_index += 1
                start = time.perf_counter()
                async with session.post(f"{url}/v1/classify?top_k=1", data=photo,
                                        headers={"Content-Type": "image/jpeg"}) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                times.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {"concurrency": concurrency, "requests_per_s": len(times) / elapsed, "errors": errors,
            **percentiles_ms(times)}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--model_name", default="mushrooms")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    version_dir = published_version_or_exit(args.registry, args.model_name)
    from tests.model_server_harness import start_server, stop_server, version_states, wait_until, write_config
    from tests.support import RedisServer, free_port, stop_process, wait_for_port

    paths = sorted((shared_data_dir() / "mushrooms").glob("*/*"))
    photos = [p.read_bytes() for p in paths]
    pixels = np.stack([load_image_file(p) for p in paths[:64]])
    raw_b32 = raw_throughput(load_serving_signature(version_dir), pixels, 32, args.seconds)["images_per_s"]
    result = {"model": str(version_dir), "raw_b32_images_per_s": raw_b32}

    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    config = work / "models.config"
    write_config(config, {args.model_name: version_dir.parent})
    (work / "batching.config").write_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 5000 }\n"
                                          "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 1000 }\n")
    redis = RedisServer().start()
    server = start_server(args.registry, config, "--enable_batching",
                          f"--batching_parameters_file={work / 'batching.config'}")
    http_port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "--host=127.0.0.1", f"--http-port={http_port}", "--grpc-port=0",
         f"--model-server={server.grpc_target}", f"--redis-url={redis.url}", f"--model-name={args.model_name}"],
        cwd=PROJECT_ROOT, stdout=open(work / "gateway.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(lambda: version_states(server.grpc_target, args.model_name), timeout=120, what="model")
        wait_for_port(http_port, timeout=60, process=gateway)
        time.sleep(2)
        import redis as redis_client

        flush = redis_client.Redis.from_url(redis.url).flushdb
        result["direct_model_server_c1"] = asyncio.run(direct_c1(server.grpc_target, args.model_name, pixels, 200))
        flush()
        result["gateway_miss_c1"] = asyncio.run(http_load(url, photos[:200], 1, count=200))
        result["gateway_hit_c1"] = asyncio.run(http_load(url, photos[:200], 1, count=400))
        flush()
        result["gateway_miss_c32"] = asyncio.run(http_load(url, photos[200:], 32, seconds=args.seconds))
        result["gateway_hit_c32"] = asyncio.run(http_load(url, photos[:200], 32, seconds=args.seconds))
        asyncio.run(http_load(url, photos[:200], 8, count=1000))
        result["rss_mb_after_1000"] = rss_mb(gateway.pid)
        asyncio.run(http_load(url, photos[:200], 8, count=9000))
        result["rss_mb_after_10000"] = rss_mb(gateway.pid)
    finally:
        stop_process(gateway)
        stop_server(server)
        redis.stop()

    miss1, hit1 = result["gateway_miss_c1"], result["gateway_hit_c1"]
    miss32, hit32 = result["gateway_miss_c32"], result["gateway_hit_c32"]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
