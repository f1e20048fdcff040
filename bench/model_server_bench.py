"""Model server vs the raw model, in one run: throughput at concurrency 32 (server) / batch 32 (raw), and p50 at
concurrency 1 (server) / batch 1 (raw); server-side batching on and off; the server at concurrency 32 against the
fastest engine at batch 32 in alternating phases, and at concurrency 1 against it at batch 1, call by call; the
server's own CPU per request beyond inference (a version whose TFLite model does almost nothing) and the ratio to the
fastest engine that it and the load generator leave; and the batching parameters compared on what they are for, the
gateway's cache-miss throughput at concurrency 32 (one stack per setting, phases alternating).

The server's figures against the fastest engine are measured twice: with a Python gRPC client (as the gateway calls
the server) and with h2load (bench/h2load.py, C) as the client. The Python client's CPU shares the two cores with the
server at concurrency 32 and its own latency adds to the server's at concurrency 1; h2load's is a small part of it, so
its figures are the server's own. The targets hold the h2load figures; the Python client's stay beside them.

Usage: python -m bench.model_server_bench [--registry DIR] [--seconds 10] [--sweep_only]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
import numpy as np

from bench import h2load
from bench.common import (
    FASTEST_ENGINE_THREADS, alternating_rounds, cpu_seconds, fastest_engine, load_serving_signature, median,
    percentiles_ms, published_version_or_exit, raw_throughput, sample_photos, write_result,
)
from bench.stack import (
    BATCHING_CONFIG, Stack, batching_config, distinct_photos, load, miss_phase, prometheus_samples, prometheus_total,
    samples_total,
)
from devstack.configs import MONITORING_PATH, write_monitoring_config
from training_job.paths import PROJECT_ROOT, default_registry, shared_data_dir
from training_job.preprocessing import load_image_file


def raw_model(version_dir: Path, pixels: np.ndarray, seconds: float) -> dict:
    signature = load_serving_signature(version_dir)
    return {f"batch_{batch}": raw_throughput(signature, pixels, batch, seconds) for batch in (1, 32)}


def start_server(version_dir: Path, batching: bool, workdir: Path):
    """The model server on ``version_dir``'s model, as deployed (``--prefer_tflite_model``), with its Prometheus page
    (``answered``); a devstack.servers.ModelServerProcess."""
    from devstack.servers import start_model_server

    monitoring = workdir / "monitoring.config"
    write_monitoring_config(monitoring)
    args = [f"--model_name={version_dir.parent.name}", f"--model_base_path={version_dir.parent}",
            "--file_system_poll_wait_seconds=0", "--prefer_tflite_model", f"--monitoring_config_file={monitoring}"]
    if batching:
        params = workdir / "batching.config"
        params.write_text(BATCHING_CONFIG)
        args += ["--enable_batching", f"--batching_parameters_file={params}"]
    return start_model_server(*args, log_file=workdir / f"server-{batching}.log", timeout=120)


def answered(server) -> float:
    """Requests (this bench's Predict calls) the model server has answered OK so far (its own counter, as TF Serving
    names and labels it)."""
    return prometheus_total(server.rest_url + MONITORING_PATH, ":tensorflow:serving:request_count_total",
                            status="OK")


# The server's own latency histograms (TF Serving's, in microseconds) that split a gRPC Predict's time: the whole
# call inside the server, the model run (the batch queue included), the wait in the batch queue.
SERVER_LATENCIES = {"request": (":tensorflow:serving:request_latency", {"API": "Predict", "entrypoint": "GRPC"}),
                    "runtime": (":tensorflow:serving:runtime_latency", {"API": "Predict"}),
                    "queuing": (":tensorflow:serving:batching_session:queuing_latency", {})}


def server_latency_totals(server) -> dict[str, tuple[float, float]]:
    """{SERVER_LATENCIES name: (sum in microseconds, count)} so far, from one read of the server's page."""
    samples = prometheus_samples(server.rest_url + MONITORING_PATH)
    return {name: tuple(samples_total(samples, metric + part, **labels) for part in ("_sum", "_count"))
            for name, (metric, labels) in SERVER_LATENCIES.items()}


def server_latency_means_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per observation of each SERVER_LATENCIES histogram between two ``server_latency_totals``."""
    return {name: (after[name][0] - before[name][0]) / 1000 / max(after[name][1] - before[name][1], 1)
            for name in after}


def h2load_predict(server, request, concurrency: int, workdir: Path, *, seconds: float | None = None,
                   calls: int | None = None) -> h2load.Load:
    """``request`` from h2load at ``concurrency`` (bench/h2load.py), every call checked answered OK on the server's
    side: h2load reads only HTTP statuses, and gRPC errors come as HTTP 200."""
    before = answered(server)
    load = h2load.run(server.grpc_target, h2load.PREDICT, request, concurrency=concurrency, workdir=workdir,
                      seconds=seconds, calls=calls)
    ok = answered(server) - before
    # a timed run leaves up to `concurrency` calls in flight when h2load stops: the server may still answer them
    if load.other_statuses or not load.calls <= ok <= load.calls + concurrency:
        raise RuntimeError(f"h2load: {load.calls} answers with HTTP 200, {load.other_statuses} without; the server "
                           f"answered {ok:.0f} OK")
    return load


def python_client_phase(server, model: str, pixels: np.ndarray, concurrency: int, seconds: float
                        ) -> tuple[dict, dict]:
    """``drive``'s figures against ``server``, and the CPU ms per call of the server and of this process (the load
    generator, whose CPU shares the cores with the server's)."""
    before, server_before = time.process_time(), cpu_seconds(server.process.pid)
    figures = asyncio.run(drive(server.grpc_target, model, pixels, concurrency, seconds))
    calls = max(figures["n"], 1)
    return figures, {"server_ms_per_request": (cpu_seconds(server.process.pid) - server_before) * 1000 / calls,
                     "load_generator_ms_per_request": (time.process_time() - before) * 1000 / calls}


def h2load_phase(server, request, concurrency: int, seconds: float, workdir: Path) -> tuple[h2load.Load, dict]:
    """``h2load_predict`` for ``seconds``, and the CPU ms per call of the server and of h2load."""
    server_before = cpu_seconds(server.process.pid)
    load = h2load_predict(server, request, concurrency, workdir, seconds=seconds)
    return load, {"server_ms_per_request": (cpu_seconds(server.process.pid) - server_before) * 1000 / load.calls,
                  "load_generator_ms_per_request": load.cpu_s * 1000 / load.calls}


def predict_requests(model: str, pixels: np.ndarray) -> list:
    """One Predict request of ``model`` per photo of ``pixels`` [N, S, S, 3], built once, before any timing."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    requests = []
    for i in range(len(pixels)):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(pixels[i:i + 1]))
        requests.append(request)
    return requests


async def drive(target: str, model: str, pixels: np.ndarray, concurrency: int, seconds: float) -> dict:
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    requests = predict_requests(model, pixels)
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


# (num_batch_threads, batch_timeout_micros). With one batch thread the timeout never applies: the batcher waits for
# more requests only while another batch is running (services/model_server/batching.py).
BATCHING_SETTINGS = {"threads_1": (1, 2000), "threads_2_timeout_0": (2, 0), "threads_2_timeout_2ms": (2, 2000),
                     "threads_2_timeout_5ms": (2, 5000)}
BATCH_SIZE_METRIC = ":tensorflow:serving:batching_session:processed_batch_size"
C1_PAIRS = 300  # interleaved calls of the server and the fastest engine at concurrency 1, one of each per pair
C1_H2LOAD_ROUNDS, C1_H2LOAD_CALLS = 6, 100  # alternating phases at concurrency 1 with h2load as the client


def batching_sweep(version_dir: Path, model_name: str, seconds: float, rounds: int = 3) -> dict:
    """The gateway's cache-miss throughput at concurrency 32 (HTTP) with each of BATCHING_SETTINGS: one stack per
    setting, all up at once but only the measured one busy, phases alternating over ``rounds``; and the mean batch."""
    photos = distinct_photos(sorted((shared_data_dir() / "mushrooms").glob("*/*")))
    with contextlib.ExitStack() as running:
        stacks = {}
        for name, (threads, timeout) in BATCHING_SETTINGS.items():
            stack = running.enter_context(Stack(version_dir, model_name, batching_config=batching_config(threads,
                                                                                                        timeout)))
            gateway = stack.start_gateway(grpc=False)
            load("http", gateway, photos[:8], 4, count=8)  # connections and the model's first calls, untimed
            stacks[name] = (stack, gateway)

        def phase(name: str) -> dict:
            stack, gateway = stacks[name]
            url = stack.model_server_metrics_url
            before = [prometheus_total(url, BATCH_SIZE_METRIC + s) for s in ("_sum", "_count")]
            row = miss_phase(stack, gateway, photos, 32, seconds)
            after = [prometheus_total(url, BATCH_SIZE_METRIC + s) for s in ("_sum", "_count")]
            row["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
            return row

        phases = alternating_rounds({name: (lambda name=name: phase(name)) for name in stacks}, rounds)
    settings = {name: {"num_batch_threads": BATCHING_SETTINGS[name][0],
                       "batch_timeout_micros": BATCHING_SETTINGS[name][1],
                       "miss_c32_requests_per_s": [row["requests_per_s"] for row in rows],
                       "median_requests_per_s": median([row["requests_per_s"] for row in rows]),
                       "mean_batch": [row["mean_batch"] for row in rows],
                       "errors": sum(row["errors"] for row in rows),
                       "cache_hit_share": max(row["cache_hit_share"] for row in rows)}
                for name, rows in phases.items()}
    best = max(settings, key=lambda name: settings[name]["median_requests_per_s"])
    in_use = next((name for name, (t, us) in BATCHING_SETTINGS.items() if batching_config(t, us) == BATCHING_CONFIG),
                  None)
    from services.model_server.config import BatchingParameters

    shipped = BatchingParameters.from_text((PROJECT_ROOT / "deploy" / "tfserving" / "batching.config").read_text())
    shipped_name = next((name for name, setting in BATCHING_SETTINGS.items()
                         if setting == (shipped.num_batch_threads, shipped.batch_timeout_micros)), None)
    return {"rounds": rounds, "seconds_per_phase": seconds, "settings": settings, "best": best, "in_use": in_use,
            "shipped": shipped_name}


def print_sweep(sweep: dict) -> None:
    for name, row in sweep["settings"].items():
        print(f"batching {name}: miss c32 " + ", ".join(f"{v:.1f}" for v in row["miss_c32_requests_per_s"])
              + f" req/s (median {row['median_requests_per_s']:.1f}); mean batch "
              + ", ".join(f"{v:.1f}" for v in row["mean_batch"]) + f"; errors {row['errors']}", flush=True)
    print(f"best measured: {sweep['best']}; bench uses {sweep['in_use']}, deploy/tfserving {sweep['shipped']}")


def fastest_vs_server(version_dir: Path, server, model: str, pixels: np.ndarray, seconds: float, workdir: Path,
                      rounds: int = 3) -> dict:
    """The fastest engine at batch 32 (in this process, the server idle) and the server (batching on) at concurrency
    32, in alternating phases: the ratio of their medians compares the two on the same minutes' machine, where
    bench/tflite_bench.py's figure, minutes earlier, compares the machine's load too. The server's load comes from
    two generators in turn: this process's Python gRPC client (as the gateway calls it), and h2load (C), whose CPU per
    call is a small part of the Python client's, so that the server's throughput shares the cores with less of the
    client's work. The two cores are all there is: in a deployment the clients run elsewhere.

    CPU per image too: the engine's (this process), and in the server phases the server's and the load generator's
    (this process, or h2load)."""
    cpu_ms = {"engine_ms_per_image": [], "server_ms_per_image": [], "load_generator_ms_per_request": [],
              "server_ms_per_image_h2load": [], "h2load_ms_per_request": []}
    measure = fastest_engine(version_dir, pixels, 32)
    request = predict_requests(model, pixels[:1])[0]

    ways = []

    def engine() -> float:
        figures = measure(seconds)
        cpu_ms["engine_ms_per_image"].append(figures["cpu_ms_per_image"])
        ways.append(figures["ways"])
        return figures["images_per_s"]

    def served() -> float:
        figures, cpu = python_client_phase(server, model, pixels, 32, seconds)
        cpu_ms["server_ms_per_image"].append(cpu["server_ms_per_request"])
        cpu_ms["load_generator_ms_per_request"].append(cpu["load_generator_ms_per_request"])
        return figures["images_per_s"]

    def served_h2load() -> float:
        load, cpu = h2load_phase(server, request, 32, seconds, workdir)
        cpu_ms["server_ms_per_image_h2load"].append(cpu["server_ms_per_request"])
        cpu_ms["h2load_ms_per_request"].append(cpu["load_generator_ms_per_request"])
        return load.calls_per_s

    figures = alternating_rounds({"fastest_b32_images_per_s": engine, "server_c32_images_per_s": served,
                                  "server_c32_h2load_images_per_s": served_h2load}, rounds)
    engine_median = median(figures["fastest_b32_images_per_s"])
    ratio = median(figures["server_c32_images_per_s"]) / engine_median
    ratio_h2load = median(figures["server_c32_h2load_images_per_s"]) / engine_median
    cpu = {name: median(values) for name, values in cpu_ms.items()}
    print("alternating: fastest engine b32 " + ", ".join(f"{v:.1f}" for v in figures["fastest_b32_images_per_s"])
          + " img/s; server c32 (Python client) " + ", ".join(f"{v:.1f}" for v in figures["server_c32_images_per_s"])
          + " img/s; server c32 (h2load) " + ", ".join(f"{v:.1f}" for v in figures["server_c32_h2load_images_per_s"])
          + f" img/s; ratios of medians {ratio:.3f} (Python client), {ratio_h2load:.3f} (h2load); CPU ms per image: "
          f"engine {cpu['engine_ms_per_image']:.2f}, server {cpu['server_ms_per_image']:.2f} + Python client "
          f"{cpu['load_generator_ms_per_request']:.2f}, server {cpu['server_ms_per_image_h2load']:.2f} + h2load "
          f"{cpu['h2load_ms_per_request']:.2f}", flush=True)
    return {**figures, "fastest_ways": ways, "rounds": rounds, "seconds_per_phase": seconds, "ratio_of_medians": ratio,
            "ratio_of_medians_h2load": ratio_h2load, "cpu": cpu}


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def fastest_vs_c1(version_dir: Path, target: str, model: str, pixels: np.ndarray, pairs: int) -> dict:
    """The server (batching on, as deployed) at concurrency 1 and the fastest engine at batch 1 (in this process, idle
    while the server answers), interleaved: one call of each per photo, which goes first alternating. The median of
    the per-photo differences is the server's own latency over the engine it runs (gRPC, protobuf, the batch
    scheduler, the thread hop), on the same moment's machine, where two phases minutes apart compare its load."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from training_job.tflite_export import tflite_interpreter, tflite_predict

    interpreter = tflite_interpreter(version_dir / "model.tflite", batch=1, threads=FASTEST_ENGINE_THREADS)
    requests = predict_requests(model, pixels)

    server, engine = [], []
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for i in range(4):  # connection, first calls, untimed
            stub.Predict(requests[i % len(requests)], timeout=60)
            tflite_predict(interpreter, pixels[i % len(pixels)][None])
        for i in range(pairs):
            k = i % len(pixels)
            call_server = lambda: stub.Predict(requests[k], timeout=60)  # noqa: E731
            call_engine = lambda: tflite_predict(interpreter, pixels[k][None])  # noqa: E731
            if i % 2:
                engine.append(_timed(call_engine))
                server.append(_timed(call_server))
            else:
                server.append(_timed(call_server))
                engine.append(_timed(call_engine))
    differences_ms = (np.asarray(server) - np.asarray(engine)) * 1000
    result = {"pairs": pairs, "server_p50_ms": percentiles_ms(server)["p50_ms"],
              "engine_p50_ms": percentiles_ms(engine)["p50_ms"],
              "median_difference_ms": float(np.median(differences_ms))}
    print(f"interleaved c1 ({pairs} pairs): server p50 {result['server_p50_ms']:.2f} ms, fastest engine b1 p50 "
          f"{result['engine_p50_ms']:.2f} ms, median difference {result['median_difference_ms']:.2f} ms", flush=True)
    return result


def fastest_vs_c1_h2load(version_dir: Path, server, model: str, pixels: np.ndarray, workdir: Path,
                         rounds: int = C1_H2LOAD_ROUNDS, calls: int = C1_H2LOAD_CALLS) -> dict:
    """The server at concurrency 1 with h2load as the client (no Python on the client's side) against the fastest
    engine at batch 1 in this process, in alternating phases of ``calls`` calls on one photo each (round k: photo
    k): the median over the rounds of the differences between the two p50s. ``fastest_vs_c1``'s figure adds the
    Python gRPC client's own latency; this one is the server's (gRPC, protobuf, the batch scheduler, the thread hop)
    and the loopback's."""
    from training_job.tflite_export import tflite_interpreter, tflite_predict

    interpreter = tflite_interpreter(version_dir / "model.tflite", batch=1, threads=FASTEST_ENGINE_THREADS)
    requests = predict_requests(model, pixels[:rounds])
    h2load_predict(server, requests[0], 1, workdir, calls=10)  # h2load's first connection, untimed
    tflite_predict(interpreter, pixels[:1])
    server_p50, engine_p50, client_mean, inside = [], [], [], []
    for k in range(rounds):
        photo = pixels[k % len(pixels)][None]
        engine_p50.append(percentiles_ms([_timed(lambda: tflite_predict(interpreter, photo))
                                          for _ in range(calls)])["p50_ms"])
        before = server_latency_totals(server)
        load = h2load_predict(server, requests[k % len(requests)], 1, workdir, calls=calls)
        inside.append(server_latency_means_ms(before, server_latency_totals(server)))
        server_p50.append(percentiles_ms(load.latencies_s)["p50_ms"])
        client_mean.append(float(np.mean(load.latencies_s)) * 1000)
    differences = [s - e for s, e in zip(server_p50, engine_p50)]
    # where the time goes, as means (the server's histograms give no medians): h2load's call, the call inside the
    # server (from the Predict handler's start to its response built), the model run (queue included), the queue
    means = {"h2load_call_ms": median(client_mean), **{f"server_{name}_ms": median([r[name] for r in inside])
                                                        for name in SERVER_LATENCIES}}
    result = {"rounds": rounds, "calls_per_phase": calls, "server_p50_ms": server_p50, "engine_p50_ms": engine_p50,
              "median_difference_ms": median(differences), "means": means}
    print(f"c1, h2load as the client ({rounds} rounds of {calls} calls): server p50 "
          + ", ".join(f"{v:.2f}" for v in server_p50) + " ms; fastest engine b1 p50 "
          + ", ".join(f"{v:.2f}" for v in engine_p50)
          + f" ms; median difference {result['median_difference_ms']:.2f} ms; means: "
          + ", ".join(f"{name} {value:.2f}" for name, value in means.items()), flush=True)
    return result


def server_overhead(pixels: np.ndarray, seconds: float, workdir: Path) -> dict:
    """CPU ms per request, at concurrency 32 with batching on (as deployed), of the server and of the load generator
    (this process's Python client; then h2load, under ``"h2load"``) on the tiny model's ``model.tflite``, whose
    inference is a mean colour: what every request costs beside its inference (gRPC, protobuf, batching, the event
    loop)."""
    from training_job.tiny_model import write_tiny_model_with_tflite

    version_dir = write_tiny_model_with_tflite(workdir / "tiny-registry" / "tiny" / "1")
    server = start_server(version_dir, True, workdir)
    try:
        asyncio.run(drive(server.grpc_target, "tiny", pixels, 32, 2))  # connections and first calls, unmeasured
        figures, out = python_client_phase(server, "tiny", pixels, 32, seconds)
        load, with_h2load = h2load_phase(server, predict_requests("tiny", pixels[:1])[0], 32, seconds, workdir)
        return {**out, "requests_per_s": figures["images_per_s"],
                "h2load": {**with_h2load, "requests_per_s": load.calls_per_s}}
    finally:
        server.process.terminate()
        server.process.wait(30)


def ratio_left(engine_ms_per_image: float, overhead: dict) -> float:
    """The server-to-engine throughput ratio the per-request costs allow on fully busy shared cores: the engine's
    CPU per image over that plus the server's and the load generator's CPU per request."""
    return engine_ms_per_image / (engine_ms_per_image + overhead["server_ms_per_request"]
                                  + overhead["load_generator_ms_per_request"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--model_name", default="mushrooms")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sweep_only", action="store_true",
                        help="only compare the batching settings (printed, nothing written)")
    args = parser.parse_args(argv)
    version_dir = published_version_or_exit(args.registry, args.model_name)
    if not h2load.available():
        sys.exit(f"no {h2load.H2LOAD} here: Debian's nghttp2-client has it (scripts/setup.sh installs it)")
    sweep_seconds = max(2.0, args.seconds / 2)
    if args.sweep_only:
        print_sweep(batching_sweep(version_dir, args.model_name, sweep_seconds))
        return 0
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
                for key, server in servers.items():
                    result.setdefault(key, {})[f"c{c}"] = asyncio.run(drive(server.grpc_target, args.model_name,
                                                                            pixels, c, args.seconds))
            if (version_dir / "model.tflite").is_file():
                deployed = servers["batching_on"]
                result["fastest_vs_c32"] = fastest_vs_server(version_dir, deployed, args.model_name, pixels,
                                                             args.seconds, Path(tmp))
                result["fastest_vs_c1"] = fastest_vs_c1(version_dir, deployed.grpc_target, args.model_name, pixels,
                                                        C1_PAIRS)
                result["fastest_vs_c1_h2load"] = fastest_vs_c1_h2load(version_dir, deployed, args.model_name, pixels,
                                                                      Path(tmp))
        finally:
            for server in servers.values():
                server.process.terminate()
                server.process.wait(30)
        result["server_overhead"] = overhead = server_overhead(pixels, args.seconds, Path(tmp))
    for client, costs in (("Python client", overhead), ("h2load", overhead["h2load"])):
        if "fastest_vs_c32" in result:
            costs["ratio_left"] = ratio_left(result["fastest_vs_c32"]["cpu"]["engine_ms_per_image"], costs)
        print(f"server's own CPU per request (tiny model, c32, {client}): {costs['server_ms_per_request']:.2f} ms, "
              f"load generator {costs['load_generator_ms_per_request']:.2f} ms"
              + (f"; ratio they leave {costs['ratio_left']:.3f}" if "ratio_left" in costs else ""))
    raw32, raw1 = result["raw"]["batch_32"], result["raw"]["batch_1"]
    best = result["batching_on"]
    result["targets"] = {
        "throughput_ratio_c32_vs_raw_b32": {"value": best["c32"]["images_per_s"] / raw32["images_per_s"],
                                            "target": ">= 0.9"},
        "p50_c1_minus_raw_ms": {"value": best["c1"]["p50_ms"] - raw1["p50_ms"], "target": "<= 1.0"},
    }
    if "fastest_vs_c1" in result:  # the engine the server runs under --prefer_tflite_model: the target's reference
        result["targets"]["p50_c1_minus_raw_ms"]["target"] = "-"
        result["targets"]["p50_c1_minus_fastest_ms"] = {"value": result["fastest_vs_c1"]["median_difference_ms"],
                                                        "target": "<= 1.0"}
        result["targets"]["p50_c1_minus_fastest_h2load_ms"] = {
            "value": result["fastest_vs_c1_h2load"]["median_difference_ms"], "target": "<= 1.0"}
        result["targets"]["throughput_ratio_c32_h2load_vs_fastest_b32"] = {
            "value": result["fastest_vs_c32"]["ratio_of_medians_h2load"], "target": ">= 0.9"}
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
    result["batching_sweep"] = batching_sweep(version_dir, args.model_name, sweep_seconds)
    print_sweep(result["batching_sweep"])
    write_result("model_server", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
