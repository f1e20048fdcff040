"""What the first call of each signature costs once a version is AVAILABLE, against the calls after it.

TF Serving calls a version AVAILABLE once its warm-up records ran; a signature the warm-up left out pays, on its
first call, what the warm-up would have paid (TensorFlow instantiating and optimising its function), and the client
making that call waits for it. After every rollout, the first photo sent as bytes, or the first "Why?", waits so.

For each signature of the newest published version (serving_default, predict_image_bytes, explain,
explain_image_bytes when it has them), --rounds times: a model server started as deployed (bench/stack.py:
--prefer_tflite_model, batching on) on that version alone, the version AVAILABLE, then one gRPC Predict of a
single photo to that signature (the first call), then --calls more (warm). One server per signature and round, so
no signature's first call warms another's. Reported per signature: the median over the rounds of the first call,
of the warm calls' median, and of the version's load time (warm-up included) from the model server's log.

Usage: python -m bench.first_calls [--registry DIR] [--model-name mushrooms] [--rounds 3] [--calls 5]
                                   [--result-name first_calls]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.common import published_version_of, sample_photos, write_result
from bench.stack import Stack
from services.model_server.servable import saved_model_signature_defs

LOADED = re.compile(r"loaded \S+ version \d+ from .* in ([0-9.]+)s")


def request_inputs(signature: str, photo: bytes, image_size: int) -> dict[str, np.ndarray]:
    """One photo as ``signature`` takes it: encoded bytes, or pixels preprocessed as the gateway sends them."""
    from training_job.explain import PREDICTED_CLASS
    from training_job.preprocessing import preprocess_bytes

    if "image_bytes" in signature:
        inputs = {"image_bytes": np.array([photo], dtype=object)}
    else:
        inputs = {"images": preprocess_bytes(photo, image_size)[np.newaxis]}
    if signature.startswith("explain"):
        inputs["class_index"] = np.array([PREDICTED_CLASS], np.int32)
    return inputs


def timed_predict(stub, model_name: str, signature: str, inputs: dict[str, np.ndarray]) -> float:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = model_name, signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    started = time.perf_counter()
    stub.Predict(request, timeout=60)
    return time.perf_counter() - started


def measure(version_dir: Path, model_name: str, signature: str, inputs: dict, calls: int) -> dict:
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with Stack(version_dir, model_name) as stack:
        with grpc.insecure_channel(stack.server.grpc_target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            first = timed_predict(stub, model_name, signature, inputs)
            warm = [timed_predict(stub, model_name, signature, inputs) for _ in range(calls)]
        loads = LOADED.findall(stack.server.log())
    return {"first_ms": first * 1e3, "warm_ms": statistics.median(warm) * 1e3,
            "load_s": float(loads[-1]) if loads else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, default=None, help="default: the project's registry")
    p.add_argument("--model-name", default="mushrooms")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=5, help="warm calls after the first")
    p.add_argument("--result-name", default="first_calls")
    args = p.parse_args(argv)
    version_dir = published_version_of(args)
    image_size = json.loads((version_dir / "assets.extra" / "model_card.json").read_text())["image_size"]
    photo = sample_photos(1)[0].read_bytes()
    signatures = sorted(saved_model_signature_defs(version_dir))
    runs: dict[str, list[dict]] = {name: [] for name in signatures}
    for round_number in range(args.rounds):
        for name in signatures:
            run = measure(version_dir, args.model_name, name, request_inputs(name, photo, image_size), args.calls)
            runs[name].append(run)
            print(f"round {round_number + 1}/{args.rounds} {name}: first {run['first_ms']:.1f} ms, "
                  f"warm {run['warm_ms']:.1f} ms, load {run['load_s']:.2f} s", flush=True)
    result = {"version": int(version_dir.name), "rounds": args.rounds, "warm_calls": args.calls,
              "signatures": {name: {key: round(statistics.median(run[key] for run in found), 3)
                                    for key in ("first_ms", "warm_ms", "load_s")}
                             for name, found in runs.items()}}
    print(json.dumps(result["signatures"], indent=1))
    write_result(args.result_name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
