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
from services.model_server.loader import LoadOptions

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
    def __init__(self, model_name: str, version: int, path: Path, tags: tuple[str, ...] = ("serve",)):
        self.model_name = model_name
        self.version = version
        self.path = Path(path)
        saved_model = saved_model_pb2.SavedModel()
        saved_model.ParseFromString((self.path / "saved_model.pb").read_bytes())
        meta_graph = _meta_graph(saved_model, tags)
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = {
            k: v for k, v in meta_graph.signature_def.items() if k != "__saved_model_init_op"
        }
        self._loaded = tf.saved_model.load(str(self.path), tags=list(tags))
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

    def warm_up(self, iterations: int = 1) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests`` (TFRecord of PredictionLog), each record
        ``iterations`` times; returns how many records ran."""
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
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                for _ in range(max(1, iterations)):
                    self.run(request.model_spec.signature_name, inputs)
                count += 1
        return count


def _short(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0][:500] if text.strip() else type(exc).__name__


def _meta_graph(saved_model: saved_model_pb2.SavedModel, tags) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef whose tag set is exactly ``tags`` (TensorFlow's FindMetaGraphDef)."""
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == set(tags):
            return meta_graph
    raise RuntimeError(f"Could not find meta graph def matching supplied tags: {{ {' '.join(sorted(tags))} }}. "
                       "To inspect available tag-sets in the SavedModel, please use the SavedModel CLI: "
                       "`saved_model_cli`")


def load_servable(model_name: str, version: int, path: Path,
                  options: LoadOptions = LoadOptions()) -> tuple[Servable, float]:
    start = time.perf_counter()
    servable = Servable(model_name, version, path, options.tags)
    warmup = "no warm-up"
    if options.warmup:
        warmed = servable.warm_up(options.warmup_iterations)
        warmup = f"{warmed} warm-up records, each run {options.warmup_iterations} times"
    elapsed = time.perf_counter() - start
    log.info("loaded %s version %d from %s in %.2fs (%s)", model_name, version, path, elapsed, warmup)
    return servable, elapsed
