"""A servable: one loaded version of a SavedModel, its signatures, and how to run them on numpy arrays."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from services.model_server.errors import ServingError

log = logging.getLogger("model_server.servable")
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
DEFAULT_SIGNATURE = "serving_default"


@dataclass(frozen=True)
class SignatureInfo:
    name: str
    method_name: str
    inputs: dict[str, tf.dtypes.DType]
    outputs: list[str]


class Servable:
    def __init__(self, model_name: str, version: int, path: Path):
        self.model_name = model_name
        self.version = version
        self.path = Path(path)
        saved_model = saved_model_pb2.SavedModel()
        saved_model.ParseFromString((self.path / "saved_model.pb").read_bytes())
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = {
            k: v for k, v in saved_model.meta_graphs[0].signature_def.items() if k != "__saved_model_init_op"
        }
        self._loaded = tf.saved_model.load(str(self.path))
        self._functions = dict(self._loaded.signatures)
        self.signatures = {name: self._describe(name, fn) for name, fn in self._functions.items()}

    def _describe(self, name: str, fn) -> SignatureInfo:
        specs = fn.structured_input_signature[1]
        method = self.signature_defs[name].method_name if name in self.signature_defs else ""
        return SignatureInfo(name, method, {k: s.dtype for k, s in specs.items()}, sorted(fn.structured_outputs))

    def signature(self, name: str) -> SignatureInfo:
        name = name or DEFAULT_SIGNATURE
        try:
            return self.signatures[name]
        except KeyError:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Serving signature name: \"{name}\" not found in signature def") from None

    def run(self, signature_name: str, inputs: dict[str, np.ndarray], output_filter=()) -> dict[str, np.ndarray]:
        info = self.signature(signature_name)
        inputs = with_defaults(self.signature_defs.get(info.name), inputs)
        missing = set(info.inputs) - set(inputs)
        extra = set(inputs) - set(info.inputs)
        if missing or extra:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input names do not match signature {info.name!r}: expected {sorted(info.inputs)}, got {sorted(inputs)}",
            )
        unknown = set(output_filter) - set(info.outputs)
        if unknown:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"output tensor alias not found in signature: {sorted(unknown)}")
        try:
            tensors = {k: tf.convert_to_tensor(v, dtype=info.inputs[k]) for k, v in inputs.items()}
            outputs = self._functions[info.name](**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, _short(exc)) from None
        wanted = output_filter or info.outputs
        return {k: outputs[k].numpy() for k in wanted}

    def warm_up(self) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests`` (TFRecord of PredictionLog); returns how many ran."""
        from tensorflow_serving.apis import prediction_log_pb2

        path = self.path / WARMUP_FILE
        if not path.exists():
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(str(path)):
            entry = prediction_log_pb2.PredictionLog()
            entry.ParseFromString(record.numpy())
            if entry.WhichOneof("log_type") == "predict_log":
                request = entry.predict_log.request
                self.run(request.model_spec.signature_name,
                         {k: tf.make_ndarray(v) for k, v in request.inputs.items()})
                count += 1
        return count


def with_defaults(signature_def: meta_graph_pb2.SignatureDef | None, inputs: dict[str, np.ndarray]) -> dict:
    """``inputs`` plus the SignatureDef's ``defaults`` for the inputs it leaves out, as TF Serving fills them in."""
    if signature_def is None or not signature_def.defaults:
        return inputs
    return {**{k: tf.make_ndarray(v) for k, v in signature_def.defaults.items() if k not in inputs}, **inputs}


def _short(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0][:500] if text.strip() else type(exc).__name__


def load_servable(model_name: str, version: int, path: Path) -> tuple[Servable, float]:
    start = time.perf_counter()
    servable = Servable(model_name, version, path)
    warmed = servable.warm_up()
    elapsed = time.perf_counter() - start
    log.info("loaded %s version %d from %s in %.2fs (%d warm-up requests)", model_name, version, path, elapsed, warmed)
    return servable, elapsed
