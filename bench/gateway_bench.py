"""The gateway against its references, in one run: the raw model, the model server called directly, and the gateway
over HTTP and gRPC, cache miss and cache hit, at concurrency 1, 8 and 32 (12 cells); gateway memory after 1,000 and
10,000 requests. The model server runs with batching on, as deployed; the gateway batches its Predict calls, as
deployed, and a second gateway making a call per photo (--predict-batch-max 1) runs cache-miss phases beside it.

The two target rows that compare against a reference measure both sides together, since on a shared machine two
phases minutes apart compare the machine's load, not our code: the gateway minus the model server at concurrency 1 is
the median of per-photo differences of interleaved requests (one of each per photo), and cache-miss throughput at
concurrency 32 vs the raw model at batch 32 is a ratio of medians over alternating phases (raw, miss, raw, miss, ...).

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
    alternating_rounds, cpu_seconds, fastest_engine, load_serving_signature, median, percentiles_ms,
    published_version_or_exit, raw_throughput, write_result,
)
from bench.stack import Stack, distinct_photos, load, measured, miss_phase, rss_mb
from training_job.paths import default_registry, shared_data_dir
from training_job.preprocessing import load_image_file, preprocess_bytes

PROTOCOLS = ("http", "grpc")
CONCURRENCY = (1, 8, 32)
HOT_SET = 200  # photos cached for the hit cells; the rest (about 1,000) are the miss cells' cold set


async def paired_c1(target: str, model: str, url: str, photos: list[bytes]) -> dict:
    """The gateway (HTTP, cache miss) and the model server called directly (gRPC Predict with the same photo's pixels,
    preprocessed beforehand), at concurrency 1, interleaved: one request of each per photo, which goes first
    alternating. Both sides of a pair see the same moment's machine load, so the median of the per-pair differences
    follows our code, where two phases minutes apart followed the machine. ``photos`` must not be in the cache; a
    pair whose gateway answer says ``cached`` is left out (and counted)."""
    import aiohttp
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from services.gateway.upstream import fill_pixels_tensor

    requests = []
    for photo in photos:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        fill_pixels_tensor(request.inputs["images"], preprocess_bytes(photo)[None])
        requests.append(request)
    direct, gateway, cached = [], [], 0
    async with grpc.aio.insecure_channel(target) as channel, aiohttp.ClientSession() as session:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        async def via_direct(request) -> float:
            start = time.perf_counter()
            await stub.Predict(request, timeout=60)
            return time.perf_counter() - start

        async def via_gateway(photo: bytes) -> tuple[float, bool]:
            start = time.perf_counter()
            async with session.post(f"{url}/v1/classify?top_k=1", data=photo,
                                    headers={"Content-Type": "image/jpeg"}) as response:
                response.raise_for_status()
                answer = await response.json()
            return time.perf_counter() - start, answer["cached"]

        for i, (photo, request) in enumerate(zip(photos, requests)):
            if i % 2:
                d = await via_direct(request)
                g, hit = await via_gateway(photo)
            else:
                g, hit = await via_gateway(photo)
                d = await via_direct(request)
            if i < 3:  # warm-up pairs (connections), untimed
                continue
            if hit:
                cached += 1
                continue
            direct.append(d)
            gateway.append(g)
    differences = 1000 * (np.asarray(gateway) - np.asarray(direct))
    return {"pairs": len(direct), "gateway_cache_hits_left_out": cached,
            "median_difference_ms": float(np.median(differences)),
            "difference_iqr_ms": [float(np.percentile(differences, 25)), float(np.percentile(differences, 75))],
            "gateway_http_miss_c1": percentiles_ms(gateway), "direct_model_server_c1": percentiles_ms(direct)}


def raw_vs_miss(stack: Stack, gateway, signature, pixels: np.ndarray, cold: list[bytes], seconds: float,
                version_dir: Path, unbatched=None, rounds: int = 3) -> dict:
    """Raw model at batch 32 and, when the version has its model.tflite, the fastest engine at batch 32 (both in this
    process, the stack idle), and the gateway's cache-miss throughput at concurrency 32 (HTTP), in alternating
    phases: the ratio of their medians compares them on the same minutes' machine.

    CPU time per photo is recorded too: the raw model's (this process) and, during the miss phases, the gateway's, the
    model server's and Redis's. On a machine whose cores are all busy, the ratio can be at most about
    raw CPU per photo / (the sum of the stack's CPU per request), whatever the latency tricks.

    ``unbatched``: a second gateway on the same stack started with ``--predict-batch-max 1`` (a Predict call per
    photo), whose cache-miss phases alternate with the others', with their own CPU figures."""
    misses, raw_cpu_ms = [], []
    processes = {"gateway": gateway.process.pid, "model_server": stack.server.process.pid,
                 "redis": stack.redis.process.pid}
    stack_cpu_ms = {name: [] for name in processes}
    unbatched_cpu_ms = {name: [] for name in processes}

    def raw() -> float:
        before = time.process_time()
        figures = raw_throughput(signature, pixels, 32, seconds)
        photos = figures["batch"] * (figures["n"] + 1)  # the timed calls and one warm-up call
        raw_cpu_ms.append((time.process_time() - before) * 1000 / photos)
        return figures["images_per_s"]

    def miss(through=gateway, cpu_ms=stack_cpu_ms) -> float:
        pids = {**processes, "gateway": through.process.pid}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        misses.append(miss_phase(stack, through, cold, 32, seconds))
        answered = misses[-1]["n"]
        for name, pid in pids.items():
            cpu_ms[name].append((cpu_seconds(pid) - before[name]) * 1000 / max(answered, 1))
        return misses[-1]["requests_per_s"]

    phases = {"raw_b32_images_per_s": raw, "miss_c32_requests_per_s": miss}
    if unbatched is not None:
        phases["miss_c32_unbatched_requests_per_s"] = lambda: miss(unbatched, unbatched_cpu_ms)
    if (version_dir / "model.tflite").is_file():
        engine = fastest_engine(version_dir, pixels, 32)
        phases["fastest_b32_images_per_s"] = lambda: engine(seconds)["images_per_s"]
    figures = alternating_rounds(phases, rounds)
    cpu = {"raw_model_ms_per_photo": median(raw_cpu_ms),
           **{f"{name}_ms_per_request": median(values) for name, values in stack_cpu_ms.items()}}
    stack_total = sum(cpu[f"{name}_ms_per_request"] for name in processes)
    cpu["ratio_bound_from_cpu"] = cpu["raw_model_ms_per_photo"] / stack_total if stack_total else None
    if unbatched is not None:
        cpu["unbatched"] = {f"{name}_ms_per_request": median(values) for name, values in unbatched_cpu_ms.items()}
        figures["batched_vs_unbatched_ratio_of_medians"] = (median(figures["miss_c32_requests_per_s"])
                                                            / median(figures["miss_c32_unbatched_requests_per_s"]))
    return {**figures, "rounds": rounds, "seconds_per_phase": seconds, "cpu": cpu,
            "miss_c32_cache_hit_share": max(m["cache_hit_share"] for m in misses),
            "miss_c32_errors": sum(m["errors"] for m in misses),
            "ratio_of_medians": median(figures["miss_c32_requests_per_s"]) / median(figures["raw_b32_images_per_s"]),
            **({"miss_vs_fastest_ratio_of_medians": median(figures["miss_c32_requests_per_s"])
                / median(figures["fastest_b32_images_per_s"])} if "fastest_b32_images_per_s" in figures else {})}


def cells(stack: Stack, gateway, cold: list[bytes], hot: list[bytes], seconds: float) -> dict:
    """The 12 cells: {http, grpc} x {miss, hit} x concurrency {1, 8, 32}. A miss cell starts on an empty cache and
    sends each of ``cold`` at most once; a hit cell sends ``hot``, cached just before."""
    out = {}
    for protocol in PROTOCOLS:
        for concurrency in CONCURRENCY:
            stack.flush_cache()
            out[f"{protocol}_miss_c{concurrency}"] = measured(gateway, protocol, cold, concurrency, seconds=seconds,
                                                              count=len(cold))
            load(protocol, gateway, hot, 32, count=len(hot))  # cache the hot set (untimed)
            out[f"{protocol}_hit_c{concurrency}"] = measured(gateway, protocol, hot, concurrency, seconds=seconds)
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
    signature = load_serving_signature(version_dir)
    signature(images=pixels[:1])  # traced before the stack starts
    pairs = cold[:max(24, int(args.seconds * 30))]  # the paired phase's photos (about 2 s of pairs per --seconds 1)
    result = {"model": str(version_dir), "seconds_per_cell": args.seconds, "hot_set": len(hot), "cold_set": len(cold)}

    with Stack(version_dir, args.model_name) as stack:
        logs = stack.work
        gateway = stack.start_gateway()
        unbatched = stack.start_gateway("--predict-batch-max", "1", grpc=False)
        for protocol in PROTOCOLS:  # connections, threads and the model's first calls, untimed
            load(protocol, gateway, hot[:8], 4, count=8)
        load("http", unbatched, hot[:8], 4, count=8)
        stack.flush_cache()
        misses = gateway.metric("mushroom_gateway_cache_total", outcome="miss")
        result["paired_c1"] = paired = asyncio.run(paired_c1(stack.server.grpc_target, args.model_name,
                                                             gateway.http_url, pairs))
        paired["gateway_cache_misses_counted"] = gateway.metric("mushroom_gateway_cache_total", outcome="miss") - misses
        print(f"paired c1 ({paired['pairs']} pairs): gateway p50 {paired['gateway_http_miss_c1']['p50_ms']:.2f} ms, "
              f"direct p50 {paired['direct_model_server_c1']['p50_ms']:.2f} ms, median difference "
              f"{paired['median_difference_ms']:.2f} ms; gateway cache misses counted "
              f"{paired['gateway_cache_misses_counted']:.0f} of {len(pairs)}", flush=True)
        result["raw_vs_miss_c32"] = alternated = raw_vs_miss(stack, gateway, signature, pixels, cold, args.seconds,
                                                                   version_dir, unbatched)
        stack.stop_gateway(unbatched)
        result["raw_b32_images_per_s"] = median(alternated["raw_b32_images_per_s"])
        print("alternating: raw b32 " + ", ".join(f"{v:.1f}" for v in alternated["raw_b32_images_per_s"])
              + " img/s; miss c32 " + ", ".join(f"{v:.1f}" for v in alternated["miss_c32_requests_per_s"])
              + f" req/s; ratio of medians {alternated['ratio_of_medians']:.3f}; miss c32 with a Predict call per "
              "photo " + ", ".join(f"{v:.1f}" for v in alternated["miss_c32_unbatched_requests_per_s"]) + " req/s",
              flush=True)
        cpu = alternated["cpu"]
        print(f"CPU per photo: raw model {cpu['raw_model_ms_per_photo']:.1f} ms; per cache-miss request: gateway "
              f"{cpu['gateway_ms_per_request']:.1f} ms, model server {cpu['model_server_ms_per_request']:.1f} ms, "
              f"Redis {cpu['redis_ms_per_request']:.2f} ms; ratio bound from CPU {cpu['ratio_bound_from_cpu']:.3f}",
              flush=True)
        result["cells"] = cells(stack, gateway, cold, hot, args.seconds)
        load("http", gateway, hot, 8, count=1000)
        result["rss_mb_after_1000"] = rss_mb(gateway.process.pid)
        load("http", gateway, hot, 8, count=9000)
        result["rss_mb_after_10000"] = rss_mb(gateway.process.pid)

    c = result["cells"]
    miss1, hit1, miss32, hit32 = c["http_miss_c1"], c["http_hit_c1"], c["http_miss_c32"], c["http_hit_c32"]
    rss_growth = result["rss_mb_after_10000"] / result["rss_mb_after_1000"] - 1
    rows = [
        ("gateway_minus_model_server_p50", f"gateway p50 (HTTP, cache miss, c1) minus model server p50 (gRPC, "
         f"preprocessed pixels, c1): median of {paired['pairs']} interleaved per-photo differences (p50s "
         f"{paired['gateway_http_miss_c1']['p50_ms']:.2f} vs {paired['direct_model_server_c1']['p50_ms']:.2f} ms)",
         paired["median_difference_ms"], "<= 2 ms", "ms", lambda v: v <= 2),
        ("cache_hit_p50", "cache-hit p50 over HTTP", hit1["p50_ms"], "<= 2 ms", "ms", lambda v: v <= 2),
        ("hit_vs_miss_throughput", "cache-hit vs cache-miss throughput at concurrency 32",
         hit32["requests_per_s"] / miss32["requests_per_s"], ">= 20x", "x", lambda v: v >= 20),
        ("miss_c32_vs_raw_b32", "cache-miss throughput at concurrency 32 / raw model at batch 32: ratio of the medians "
         f"of {alternated['rounds']} alternating phases each (raw " + ", ".join(
             f"{v:.0f}" for v in alternated["raw_b32_images_per_s"]) + " img/s; miss " + ", ".join(
             f"{v:.0f}" for v in alternated["miss_c32_requests_per_s"]) + " req/s; CPU per photo: raw model "
         f"{cpu['raw_model_ms_per_photo']:.1f} ms, gateway + model server + Redis "
         f"{cpu['gateway_ms_per_request']:.1f} + {cpu['model_server_ms_per_request']:.1f} + "
         f"{cpu['redis_ms_per_request']:.2f} ms, so at most {cpu['ratio_bound_from_cpu']:.2f} on busy cores)",
         alternated["ratio_of_medians"], ">= 0.85", "", lambda v: v >= 0.85),
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
    errors = sum(row["errors"] for row in c.values()) + alternated["miss_c32_errors"]
    if errors:
        print(f"{errors} requests failed: see the logs in {logs}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
