"""What "Why?" costs: classify with explain=1 (Grad-CAM in the model server, a PNG overlay of the photo's displayed
size drawn by the gateway) against plain classify, through the real gateway, in one run.

One Redis, one model server (batching on, as deployed) and one gateway. Phases alternate plain, explain, plain,
explain, ... (``--rounds`` of each), so both see the same minutes of a shared machine; before each phase the cache
is emptied and each photo is sent at most once, so every request is a cache miss. Each round measures concurrency
1 (latency) and ``--concurrency`` (throughput) over HTTP. Figures are medians over the rounds.

Usage: python -m bench.explain_bench [--registry DIR] [--seconds 6] [--rounds 2] [--concurrency 8]
The newest version of the registry's model must have the explain signature (published by this code).
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

QUERIES = {"plain": "top_k=1", "explain": "top_k=1&explain=1"}


def has_explain_signature(version_dir: Path) -> bool:
    from services.model_server.servable import saved_model_signature_defs
    from training_job.explain import EXPLAIN_SIGNATURE

    return EXPLAIN_SIGNATURE in saved_model_signature_defs(version_dir)


def phase(stack: Stack, gateway, mode: str, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    stack.flush_cache()
    return asyncio.run(http_load(gateway.http_url, photos, concurrency, seconds=seconds, count=len(photos),
                                 query=QUERIES[mode]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--model_name", default="mushrooms")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="phases of each mode at each concurrency")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the throughput phases")
    parser.add_argument("--photos", type=int, default=400, help="distinct shared photos to send (cache misses)")
    args = parser.parse_args(argv)
    version_dir = published_version_or_exit(args.registry, args.model_name)
    if not has_explain_signature(version_dir):
        print(f"{version_dir} has no explain signature: publish a model with this code first", file=sys.stderr)
        return 2
    photos = distinct_photos(sample_photos(args.photos))
    phases: dict[tuple[str, int], list[dict]] = {}
    with Stack(version_dir, args.model_name) as stack:
        gateway = stack.start_gateway(grpc=False)
        for mode in QUERIES:  # untimed: the first calls of each signature
            asyncio.run(http_load(gateway.http_url, photos[:4], 1, count=4, query=QUERIES[mode]))
        for _ in range(args.rounds):
            for concurrency in (1, args.concurrency):
                for mode in QUERIES:
                    phases.setdefault((mode, concurrency), []).append(
                        phase(stack, gateway, mode, photos, concurrency, args.seconds))
    result = {"model": str(version_dir), "seconds_per_phase": args.seconds, "rounds": args.rounds}
    for (mode, concurrency), rows in phases.items():
        result[f"{mode}_c{concurrency}"] = {
            "p50_ms": float(np.median([r["p50_ms"] for r in rows])),
            "p95_ms": float(np.median([r["p95_ms"] for r in rows])),
            "requests_per_s": float(np.median([r["requests_per_s"] for r in rows])),
            "errors": sum(r["errors"] for r in rows), "requests": sum(r["n"] for r in rows), "phases": rows}
    c = args.concurrency
    result["explain_vs_plain"] = {
        "p50_c1_ratio": result["explain_c1"]["p50_ms"] / result["plain_c1"]["p50_ms"],
        f"throughput_c{c}_ratio": result[f"explain_c{c}"]["requests_per_s"] / result[f"plain_c{c}"]["requests_per_s"]}
    for mode in QUERIES:
        one, many = result[f"{mode}_c1"], result[f"{mode}_c{c}"]
        print(f"{mode:8s} c1 p50 {one['p50_ms']:7.1f} ms   c{c} {many['requests_per_s']:6.1f} req/s "
              f"(p50 {many['p50_ms']:.1f} ms)   errors {one['errors'] + many['errors']}")
    ratios = result["explain_vs_plain"]
    print(f"explain / plain: p50 at c1 {ratios['p50_c1_ratio']:.2f}x, throughput at c{c} "
          f"{ratios[f'throughput_c{c}_ratio']:.2f}x")
    write_result("explain", result)
    errors = sum(v["errors"] for k, v in result.items() if isinstance(v, dict) and "errors" in v)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
