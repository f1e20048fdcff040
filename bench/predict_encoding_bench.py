"""Cost of the two ways a Predict answer can carry its numbers: TF Serving's default typed fields (float_val, ...)
and raw tensor_content (--enable_serialization_as_tensor_content). Measures the model server's encoding
(services.model_server.grpc_api.tensor_proto + serialisation) and the gateway's decoding
(services.gateway.upstream._array after parsing), per answer, for the contract's outputs at a few batch sizes.
And the other way: the model server's reading of a request's input of float photos (224 x 224 x 3) sent either way
(services.model_server.grpc_api.ndarray, on the parsed request), beside tf.make_ndarray, which read float_val
before.

`python -m bench.predict_encoding_bench [--classes C] [--repeats N]` (a few seconds; one core)."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from bench.common import RESULTS_DIR, machine_description
from services.gateway.upstream import _array
from services.model_server.grpc_api import ndarray, tensor_proto


def outputs(batch: int, classes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    probabilities = rng.dirichlet(np.ones(classes), batch).astype(np.float32)
    labels = np.array([f"class_{i}".encode() for i in range(classes)], dtype=object)
    return {"probabilities": probabilities, "classes": np.tile(labels, (batch, 1)),
            "mushroom_score": probabilities.max(axis=1), "not_a_mushroom": probabilities.max(axis=1) < 0.3}


def encode(values: dict[str, np.ndarray], as_content: bool) -> bytes:
    response = predict_pb2.PredictResponse()
    for name, value in values.items():
        response.outputs[name].CopyFrom(tensor_proto(value, as_content))
    return response.SerializeToString()


def decode(wire: bytes) -> dict[str, np.ndarray]:
    response = predict_pb2.PredictResponse()
    response.ParseFromString(wire)
    return {k: _array(v) for k, v in response.outputs.items()}


def per_call_us(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e6


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3000)
    args = parser.parse_args(argv)
    rows = []
    for batch in (1, 8, 32):
        values = outputs(batch, args.classes)
        row = {"batch": batch, "classes": args.classes}
        for form, as_content in (("typed_fields", False), ("tensor_content", True)):
            wire = encode(values, as_content)
            decoded = decode(wire)
            assert np.array_equal(decoded["probabilities"], values["probabilities"])
            row[f"{form}_encode_us"] = round(per_call_us(lambda: encode(values, as_content), args.repeats), 1)
            row[f"{form}_decode_us"] = round(per_call_us(lambda: decode(wire), args.repeats), 1)
            row[f"{form}_bytes"] = len(wire)
        rows.append(row)
        print(row)
    inputs = []
    for batch in (1, 32):
        photos = np.random.default_rng(batch).random((batch, 224, 224, 3)).astype(np.float32)
        content = tf.make_tensor_proto(photos)
        typed = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=content.tensor_shape)
        typed.float_val.extend(photos.ravel().tolist())
        assert np.array_equal(ndarray(typed), photos) and np.array_equal(ndarray(content), photos)
        repeats = max(3, args.repeats // (100 * batch))
        row = {"batch": batch, "tensor_content_us": round(per_call_us(lambda: ndarray(content), repeats), 1),
               "float_val_us": round(per_call_us(lambda: ndarray(typed), repeats), 1),
               "float_val_make_ndarray_us": round(per_call_us(lambda: tf.make_ndarray(typed), repeats), 1)}
        inputs.append(row)
        print(row)
    result = {"machine": machine_description(), "rows": rows, "inputs": inputs}
    (RESULTS_DIR / "predict_encoding.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
