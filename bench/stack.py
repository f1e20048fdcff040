"""The serving stack the gateway benchmarks run against (Redis, the model server, gateways on free loopback ports)
and the load drivers they send with (HTTP and gRPC, N concurrent clients, by time or by count)."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from bench.common import percentiles_ms
from devstack.configs import MONITORING_PATH, write_model_list, write_monitoring_config
from devstack.health import http_ok
from devstack.servers import (
    ALLOW_LABELS_BEFORE_LOAD, REDIS_STATE_ARGS, ModelServerProcess, RedisServer, start_gateway, start_model_server,
    stop_process, version_states, wait_until,
)


def batching_config(num_batch_threads: int, batch_timeout_micros: int) -> str:
    """BatchingParameters text: up to 32 requests per batch, waiting ``batch_timeout_micros`` for more only while
    another batch is running (so with one batch thread the timeout never applies)."""
    return (f"max_batch_size {{ value: 32 }}\nbatch_timeout_micros {{ value: {batch_timeout_micros} }}\n"
            f"num_batch_threads {{ value: {num_batch_threads} }}\nmax_enqueued_batches {{ value: 1000 }}\n")


# The model server's batching in every stack the benchmarks start, the same parameters as
# deploy/tfserving/batching.config (which says why); model_server_bench's batching sweep measures the alternatives.
BATCHING_CONFIG = batching_config(num_batch_threads=2, batch_timeout_micros=2000)
AVAILABLE = ModelVersionStatus.AVAILABLE


def prometheus_samples(url: str) -> list:
    """Every sample of a Prometheus text page, read once."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def samples_total(samples: list, name: str, **labels: str) -> float:
    """Sum of the ``samples`` called ``name`` with these label values."""
    return sum(sample.value for sample in samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def prometheus_total(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` (with these label values) on a Prometheus text page."""
    return samples_total(prometheus_samples(url), name, **labels)


@dataclass
class Gateway:
    process: subprocess.Popen
    http_url: str
    grpc_target: str | None

    def metric(self, name: str, **labels: str) -> float:
        return prometheus_total(f"{self.http_url}/metrics", name, **labels)


class Stack:
    """Redis + the model server (batching on unless told otherwise, Prometheus metrics on) for ``version_dir``'s
    model; gateways are started and stopped on demand, all on free loopback ports.

    ``write_model_config(path)`` writes the model server's --model_config_file (default: the newest version of
    ``version_dir``'s model only). Redis and the model server can be killed, frozen and restarted on the same ports
    (the fault benchmark); every process is stopped by its pid on exit."""

    def __init__(self, version_dir: Path, model_name: str, batching: bool = True,
                 batching_config: str = BATCHING_CONFIG,
                 write_model_config: Callable[[Path], None] | None = None):
        self.version_dir, self.model_name, self.batching = version_dir, model_name, batching
        self.batching_config = batching_config
        self.write_model_config = write_model_config
        self.work = Path(tempfile.mkdtemp(prefix="bench-stack-"))
        self.gateways: list[Gateway] = []

    def __enter__(self) -> "Stack":
        config = self.work / "models.config"
        if self.write_model_config is not None:
            self.write_model_config(config)
        else:
            write_model_list(config, {self.model_name: self.version_dir.parent})
        write_monitoring_config(self.work / "monitoring.config")
        extra = [f"--monitoring_config_file={self.work / 'monitoring.config'}", "--prefer_tflite_model"]  # as deployed
        if self.batching:
            (self.work / "batching.config").write_text(self.batching_config)
            extra += ["--enable_batching", f"--batching_parameters_file={self.work / 'batching.config'}"]
        self._server_args = (config, extra)
        # Redis as the local stack, compose and k8s run it: operator state persisted, only TTL'd cache keys evictable.
        self.redis = RedisServer(extra_args=REDIS_STATE_ARGS).start()
        self.server = None
        try:
            self.server = self._start_model_server()
            wait_until(lambda: any(state == AVAILABLE for state, _ in
                                   version_states(self.server.grpc_target, self.model_name).values()),
                       timeout=180, what=f"{self.model_name} AVAILABLE")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for gateway in list(self.gateways):
            resume(gateway.process)
            self.stop_gateway(gateway)
        if self.server is not None:
            resume(self.server.process)
            stop_process(self.server.process, timeout=20)
        if self.redis.process is not None:
            resume(self.redis.process)
        self.redis.stop()

    def _start_model_server(self, grpc_port: int | None = None, rest_port: int | None = None) -> ModelServerProcess:
        """The model server on these ports (free ones when not given)."""
        config, extra = self._server_args
        log_file = self.work / f"model-server-{grpc_port}-{time.monotonic_ns()}.log"
        return start_model_server(f"--model_config_file={config}", ALLOW_LABELS_BEFORE_LOAD, *extra,
                                  grpc_port=grpc_port, rest_port=rest_port, log_file=log_file, timeout=180)

    def kill_model_server(self) -> None:
        """SIGKILL, as an OOM kill or a node failure would: no shutdown code runs."""
        self.server.process.kill()
        self.server.process.wait()

    def restart_model_server(self) -> None:
        """A new model server on the killed one's ports and flags (the gateways keep their address); returns once its
        REST port listens, before any model is loaded."""
        grpc_port, rest_port = (int(u.rsplit(":", 1)[1]) for u in (self.server.grpc_target, self.server.rest_url))
        if self.server.process.poll() is None:
            raise RuntimeError("the model server is still running: kill it first")
        self.server = self._start_model_server(grpc_port, rest_port)

    def kill_redis(self) -> None:
        """SIGKILL Redis (with the local stack's settings its data is gone, as after a crash)."""
        self.redis.process.kill()
        self.redis.process.wait()
        self.redis.process = None

    def restart_redis(self) -> None:
        """Redis again on the same port and folder; returns once it listens."""
        if self.redis.process is not None:
            raise RuntimeError("Redis is still running: kill it first")
        self.redis.start()

    @property
    def model_server_metrics_url(self) -> str:
        return self.server.rest_url + MONITORING_PATH

    def predict_calls(self) -> float:
        """Requests the model server has answered so far, the gateway's Predict calls (its own Prometheus counter,
        by model and status as TF Serving's). The server prints the counter as TF Serving does,
        `:tensorflow:serving:request_count`; prometheus_client's parser names a counter's sample `<name>_total`
        whatever the page says."""
        return prometheus_total(self.model_server_metrics_url, ":tensorflow:serving:request_count_total")

    def flush_cache(self) -> None:
        import redis

        from services.gateway import keys

        client = redis.Redis.from_url(self.redis.url)
        for pattern in (keys.result_pattern(self.model_name), keys.explanation_pattern(self.model_name)):
            for key in client.scan_iter(pattern, count=1000):
                client.delete(key)
        client.close()

    def start_gateway(self, *extra: str, grpc: bool = True, env: dict[str, str] | None = None) -> Gateway:
        log_file = self.work / f"gateway-{len(self.gateways)}.log"
        process, http_port, grpc_port, _ = start_gateway(
            self.server.grpc_target, self.redis.url, self.model_name, *extra, env=env,
            grpc_port=None if grpc else 0, log_file=log_file, timeout=60)
        gateway = Gateway(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}" if grpc else None)
        self.gateways.append(gateway)
        deadline = time.monotonic() + 60
        while not http_ok(f"{gateway.http_url}/readyz"):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"gateway not ready; see {log_file}")
            time.sleep(0.2)
        return gateway

    def stop_gateway(self, gateway: Gateway) -> None:
        stop_process(gateway.process)
        self.gateways.remove(gateway)


def freeze(process: subprocess.Popen) -> None:
    """SIGSTOP: the process keeps its sockets (connections are accepted by the kernel) but answers nothing."""
    process.send_signal(signal.SIGSTOP)


def resume(process: subprocess.Popen | None) -> None:
    """SIGCONT (harmless on a running process); stopping a frozen process by SIGTERM would wait for it otherwise."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGCONT)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def measured(gateway: Gateway, protocol: str, photos: list[bytes], concurrency: int, **limits) -> dict:
    """One load phase, with the share of its requests the gateway itself counted as cache hits (a check)."""
    hits = gateway.metric("mushroom_gateway_cache_total", outcome="hit")
    row = load(protocol, gateway, photos, concurrency, **limits)
    row["cache_hit_share"] = (gateway.metric("mushroom_gateway_cache_total", outcome="hit") - hits) / max(row["n"], 1)
    return row


def miss_phase(stack: Stack, gateway: Gateway, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    """Cache-miss load over HTTP: the cache flushed, each of ``photos`` sent at most once, for ``seconds``."""
    stack.flush_cache()
    return measured(gateway, "http", photos, concurrency, seconds=seconds, count=len(photos))


async def _drive(send, photos: list[bytes], concurrency: int, seconds: float | None, count: int | None) -> dict:
    """``concurrency`` clients call ``send(photo) -> ok`` back to back, taking photos in order from one shared list
    (so a photo is sent once unless the run outlasts the list), until ``seconds`` pass or ``count`` were sent."""
    times, errors, next_index = [], 0, 0
    deadline = time.perf_counter() + (seconds if seconds is not None else 1e9)

    async def client():
        nonlocal errors, next_index
        while time.perf_counter() < deadline and (count is None or next_index < count):
            photo = photos[next_index % len(photos)]
            next_index += 1
            start = time.perf_counter()
            if not await send(photo):
                errors += 1
            times.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    return {"concurrency": concurrency, "requests_per_s": len(times) / elapsed, "errors": errors,
            "wall_s": elapsed, **percentiles_ms(times)}


async def http_load(url: str, photos: list[bytes], concurrency: int, seconds: float | None = None,
                    count: int | None = None, session=None, query: str = "top_k=1") -> dict:
    """POST /v1/classify?<query> (raw JPEG body) from ``concurrency`` clients on one aiohttp session (a new one,
    or ``session`` with its already open connections)."""
    import aiohttp

    async def send(photo: bytes) -> bool:
        async with session.post(f"{url}/v1/classify?{query}", data=photo,
                                headers={"Content-Type": "image/jpeg"}) as response:
            await response.read()
            return response.status == 200

    if session is not None:
        return await _drive(send, photos, concurrency, seconds, count)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        return await _drive(send, photos, concurrency, seconds, count)


async def grpc_load(target: str, photos: list[bytes], concurrency: int, seconds: float | None = None,
                    count: int | None = None) -> dict:
    """mushroom.v1.Classifier/Classify (top_k=1) from ``concurrency`` clients on one channel."""
    import grpc

    from services.gateway.protos import load

    pb, pb_grpc = load()
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 32 << 20)]) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        async def send(photo: bytes) -> bool:
            try:
                await stub.Classify(pb.ClassifyRequest(photo=photo, top_k=1), timeout=60)
                return True
            except grpc.aio.AioRpcError:
                return False

        return await _drive(send, photos, concurrency, seconds, count)


def load(protocol: str, gateway: Gateway, photos: list[bytes], concurrency: int, **limits) -> dict:
    """One load phase against ``gateway`` over ``protocol`` ("http" or "grpc")."""
    if protocol == "http":
        return asyncio.run(http_load(gateway.http_url, photos, concurrency, **limits))
    return asyncio.run(grpc_load(gateway.grpc_target, photos, concurrency, **limits))


def distinct_photos(paths: list[Path]) -> list[bytes]:
    """The bytes of each photo once (byte-identical copies would be cache hits in a cache-miss phase)."""
    seen, out = set(), []
    for path in paths:
        data = path.read_bytes()
        if data not in seen:
            seen.add(data)
            out.append(data)
    return out
