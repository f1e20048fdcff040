"""Where a gRPC Predict at concurrency 1 spends its time, stage by stage: the floor under issue 13's "model server
p50 at concurrency 1 at most 1 ms over the fastest engine".

h2load (bench/h2load.py, C) sends one photo's Predict at concurrency 1 to a ladder of servers on the tiny model
(training_job/tiny_model.py: its model.tflite computes a mean colour), each rung adding one stage of the model
server's path to the rung before:

- ``grpc_floor``: a grpc.aio server that answers every call with an empty message, the request never parsed:
  Python gRPC's own cost on this machine;
- ``parse``: + the PredictRequest parsed, its input read as the model server reads it (``grpc_api.ndarray``) and a
  PredictResponse of the tiny model's outputs written (``grpc_api.tensor_proto``);
- ``thread_hop``: + a round trip to a worker thread that does nothing (the model server runs models off its event
  loop);
- ``tiny_model``: + the tiny model run in that thread (``TfLiteServable.run``, as the model server loads it);
- ``model_server``: our model server on the same file, ``--prefer_tflite_model``, batching on as deployed;
  ``model_server_no_batching``: the same, batching off.

Each rung's p50 minus the rung before's is what that stage costs a call; the model server minus ``tiny_model`` is
what the server adds to the bare stages (version resolution, the batch queue, metrics). Against the fastest engine,
a call of the real model costs the engine's own time plus what every rung adds but ``tiny_model``'s run, so the
stages without a model (``thread_hop`` over nothing) are a floor under the target's difference.

Rungs alternate in short phases, ``--rounds`` times over (the order reversed every other round), so that a machine
whose speed drifts by the minute weighs on every rung alike. A rung's figure is the median over the rounds of its
p50; a stage's is the median over the rounds of the difference between its two rungs' p50s in the same round.
Every call is checked answered: h2load reads HTTP statuses only and gRPC errors come as HTTP 200, so each rung
counts its own answers.

Usage: python -m bench.c1_stages [--rounds 20] [--calls 250]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import queue
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2

from bench import h2load
from bench.common import alternating_rounds, median, percentiles_ms, write_result
from bench.model_server_bench import h2load_predict, predict_requests, start_server
from devstack.servers import stop_process
from services.model_server.grpc_api import ndarray, tensor_proto
from services.model_server.tflite_servable import TfLiteServable
from training_job.tiny_model import write_tiny_model_with_tflite

SERVICE, METHOD = h2load.PREDICT.strip("/").split("/")
LADDER = ("grpc_floor", "parse", "thread_hop", "tiny_model")
SERVERS = ("model_server", "model_server_no_batching")
MODEL = "tiny"


class Rung:
    """The handler of one rung; ``answered`` counts the calls it answered."""

    def __init__(self, name: str, servable: TfLiteServable, outputs: dict[str, np.ndarray]):
        self.name, self.servable, self.outputs = name, servable, outputs
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"rung-{name}")
        self.answered = 0

    @property
    def parses(self) -> bool:
        return self.name != "grpc_floor"

    async def predict(self, request, context):
        if not self.parses:
            self.answered += 1
            return b""
        inputs = {key: ndarray(value) for key, value in request.inputs.items()}
        outputs = self.outputs
        if self.name == "thread_hop":
            await asyncio.get_running_loop().run_in_executor(self.executor, int)
        elif self.name == "tiny_model":
            outputs = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.servable.run, "serving_default", inputs, ())
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tensor_proto(value))
        self.answered += 1
        return response

    def handler(self):
        method = grpc.unary_unary_rpc_method_handler(
            self.predict,
            request_deserializer=predict_pb2.PredictRequest.FromString if self.parses else None,
            response_serializer=predict_pb2.PredictResponse.SerializeToString if self.parses else None)
        return grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})


@contextmanager
def serving(rung: Rung):
    """``rung`` on a grpc.aio server of its own event loop thread; yields its host:port once it serves."""
    ports, stop = queue.SimpleQueue(), threading.Event()

    async def main():
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        server.add_generic_rpc_handlers((rung.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ports.put(port)
        await asyncio.to_thread(stop.wait)
        await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(main(),), name=f"serve-{rung.name}")
    thread.start()
    try:
        yield f"127.0.0.1:{ports.get(timeout=30)}"
    finally:
        stop.set()
        thread.join(30)
        rung.executor.shutdown()


def rung_p50(rung: Rung, target: str, request, calls: int, workdir: Path) -> float:
    before = rung.answered
    load = h2load.run(target, h2load.PREDICT, request, concurrency=1, workdir=workdir, calls=calls)
    if load.other_statuses or load.calls != calls or rung.answered - before != calls:
        raise RuntimeError(f"{rung.name}: h2load got {load.calls} HTTP 200 and {load.other_statuses} other answers "
                           f"to {calls} calls; the rung answered {rung.answered - before}")
    return percentiles_ms(load.latencies_s)["p50_ms"]


def server_p50(server, request, calls: int, workdir: Path) -> float:
    return percentiles_ms(h2load_predict(server, request, 1, workdir, calls=calls).latencies_s)["p50_ms"]


def paired_difference(after: list[float], before: list[float]) -> float:
    """The median over the rounds of ``after - before`` (one figure of each per round)."""
    return median([a - b for a, b in zip(after, before)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=250, help="calls per rung and round")
    parser.add_argument("--result-name", default="c1_stages")
    args = parser.parse_args(argv)
    if not h2load.available():
        raise SystemExit("h2load is not installed (Debian's nghttp2-client; scripts/setup.sh installs it)")

    with tempfile.TemporaryDirectory(prefix="c1-stages-") as tmp:
        workdir = Path(tmp)
        version_dir = write_tiny_model_with_tflite(workdir / "registry" / MODEL / "1")
        pixels = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
        request = predict_requests(MODEL, pixels)[0]
        servable = TfLiteServable(MODEL, 1, version_dir)
        outputs = servable.run("serving_default", {"images": pixels}, ())
        rungs = {name: Rung(name, servable, outputs) for name in LADDER}
        for batching in ("on", "off"):
            (workdir / batching).mkdir()
        servers = {}
        try:
            servers["model_server"] = start_server(version_dir, True, workdir / "on")
            servers["model_server_no_batching"] = start_server(version_dir, False, workdir / "off")
            with ExitStack() as serving_rungs:
                targets = {name: serving_rungs.enter_context(serving(rung)) for name, rung in rungs.items()}
                phases = {name: (lambda n=name: rung_p50(rungs[n], targets[n], request, args.calls, workdir))
                          for name in LADDER}
                phases.update({name: (lambda n=name: server_p50(servers[n], request, args.calls, workdir))
                               for name in SERVERS})
                for phase in phases.values():  # connections, the first calls, the server's interpreters: untimed
                    phase()
                p50s = alternating_rounds(phases, args.rounds, abba=True)
        finally:
            for server in servers.values():
                stop_process(server.process)

    medians = {name: median(values) for name, values in p50s.items()}
    order = [*LADDER, "model_server"]
    stages = {f"{after}_minus_{before}": paired_difference(p50s[after], p50s[before])
              for before, after in zip(order, order[1:])}
    result = {"rounds": args.rounds, "calls_per_phase": args.calls, "p50_ms": p50s, "median_p50_ms": medians,
              "stage_ms": stages,
              "batching_on_minus_off_ms": paired_difference(p50s["model_server"], p50s["model_server_no_batching"])}
    for name in (*LADDER, *SERVERS):
        print(f"{name:26s} p50 {medians[name]:6.3f} ms  (" + ", ".join(f"{v:.3f}" for v in p50s[name]) + ")")
    for name, value in stages.items():
        print(f"{name:40s} {value:+.3f} ms")
    write_result(args.result_name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
