"""Model server vs the raw model, in one run: throughput at concurrency 32 (server) / batch 32 (raw), and p50 at
concurrency 1 (server) / batch 1 (raw); server-side batching on and off.

Usage: python -m bench.model_server_bench [--registry DIR] [--seconds 10]
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

import grpc
import numpy as np

from bench.common import (
    load_serving_signature, percentiles_ms, published_version_or_exit, raw_throughput, sample_photos, write_result,
)
from bench.stack import BATCHING_CONFIG
from training_job.paths import PROJECT_ROOT, default_registry
from training_job.preprocessing import load_image_file


def raw_model(version_dir: Path, pixels: np.ndarray, seconds: float) -> dict:
    signature = load_serving_signature(version_dir)
    return {f"batch_{batch}": raw_throughput(signature, pixels, batch, seconds) for batch in (1, 32)}


def start_server(version_dir: Path, batching: bool, workdir: Path) -> tuple[subprocess.Popen, str]:
    from tests.support import free_port, wait_for_port

    grpc_port, rest_port = free_port(), free_port()
    args = [sys.executable, "-m", "services.model_server", f"--port={grpc_port}", f"--rest_api_port={rest_port}",
            "--host=127.0.0.1", f"--model_name={version_dir.parent.name}",
            f"--model_base_path={version_dir.parent}", "--file_system_poll_wait_seconds=0"]
    if batching:
        params = workdir / "batching.config"
        params.write_text(BATCHING_CONFIG)
        args += ["--enable_batching", f"--batching_parameters_file={params}"]
    process = subprocess.Popen(args, stdout=open(workdir / f"server-{batching}.log", "w"), stderr=subprocess.STDOUT,
                               cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    wait_for_port(rest_port, timeout=120, process=process)
    return process, f"127.0.0.1:{grpc_port}"


async def drive(target: str, model: str, pixels: np.ndarray, concurrency: int, seconds: float) -> dict:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    requests = []
    for i in range(len(pixels)):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(pixels[i:i + 1]))
        requests.append(request)
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for request in requests[:4]:
            await stub.Predict(request, timeout=60)  # warm up
        times: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker(offset: int):
            i = offset
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                await stub.Predict(requests[i % len(requests)], timeout=60)
                times.append(time.perf_counter() - start)
                i += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {"concurrency": concurrency, "images_per_s": len(times) / elapsed, **percentiles_ms(times)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--model_name", default="mushrooms")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    version_dir = published_version_or_exit(args.registry, args.model_name)
    pixels = np.stack([load_image_file(p) for p in sample_photos(64)])
    result = {"model": str(version_dir), "raw": raw_model(version_dir, pixels, args.seconds)}
    with tempfile.TemporaryDirectory() as tmp:
        # both servers up at once, phases alternating (on c1, off c1, on c32, off c32): the two modes see the same
        # machine, whatever else runs on it
        servers = {}
        try:
            for batching in (True, False):
                servers["batching_on" if batching else "batching_off"] = start_server(version_dir, batching, Path(tmp))
            for c in (1, 32):
                for key, (_, target) in servers.items():
                    result.setdefault(key, {})[f"c{c}"] = asyncio.run(drive(target, args.model_name, pixels, c,
                                                                            args.seconds))
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(30)
    raw32, raw1 = result["raw"]["batch_32"], result["raw"]["batch_1"]
    best = result["batching_on"]
    result["targets"] = {
        "throughput_ratio_c32_vs_raw_b32": {"value": best["c32"]["images_per_s"] / raw32["images_per_s"],
                                            "target": ">= 0.9"},
        "p50_c1_minus_raw_ms": {"value": best["c1"]["p50_ms"] - raw1["p50_ms"], "target": "<= 1.0"},
    }
    on, off = result["batching_on"], result["batching_off"]
    result["batching_on_vs_off"] = {"c32_throughput_ratio": on["c32"]["images_per_s"] / off["c32"]["images_per_s"],
                                    "c1_p50_difference_ms": on["c1"]["p50_ms"] - off["c1"]["p50_ms"]}
    for name, row in result["targets"].items():
        print(f"{name}: {row['value']:.3f} (target {row['target']})")
    print(f"raw: b1 {raw1['images_per_s']:.1f} img/s p50 {raw1['p50_ms']:.1f} ms; b32 {raw32['images_per_s']:.1f} img/s")
    for key in ("batching_on", "batching_off"):
        for c, row in result[key].items():
            print(f"server {key} {c}: {row['images_per_s']:.1f} img/s p50 {row['p50_ms']:.1f} ms")
    print(f"batching on / off at c32: {result['batching_on_vs_off']['c32_throughput_ratio']:.2f}")
    write_result("model_server", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
