"""gRPC: tensorflow.serving.PredictionService and ModelService, with TF Serving's status codes."""
from __future__ import annotations

import logging

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2, get_model_metadata_pb2, get_model_status_pb2, model_management_pb2, model_service_pb2_grpc,
    predict_pb2, prediction_service_pb2_grpc,
)
from tensorflow_serving.apis.get_model_metadata_pb2 import SignatureDefMap

from services.model_server.core import PredictionCore
from services.model_server.errors import ServingError
from services.model_server.manager import Manager

log = logging.getLogger("model_server.grpc")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # batches of 224x224x3 images are large


def _version_and_label(spec) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


# numpy dtypes tf.make_tensor_proto writes as raw tensor_content (when the tensor has more than one element).
_CONTENT_DTYPES = {np.dtype(np.float32): types_pb2.DT_FLOAT, np.dtype(np.float64): types_pb2.DT_DOUBLE,
                   np.dtype(np.int32): types_pb2.DT_INT32, np.dtype(np.int64): types_pb2.DT_INT64,
                   np.dtype(np.uint8): types_pb2.DT_UINT8}


# ... and the repeated field it writes a single element to instead (a batch-1 answer's per-row outputs).
_SCALAR_FIELDS = {np.dtype(np.float32): "float_val", np.dtype(np.float64): "double_val",
                  np.dtype(np.int32): "int_val", np.dtype(np.int64): "int64_val", np.dtype(np.uint8): "int_val"}
_NUMPY_DTYPES = {v: k for k, v in _CONTENT_DTYPES.items()}


def ndarray(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    """tf.make_ndarray for a request's input tensor, without its copy and per-call cost in the common case (numeric
    tensor_content of the right size: a read-only view of the bytes); anything else goes to tf.make_ndarray."""
    dtype = _NUMPY_DTYPES.get(tensor.dtype)
    if dtype is not None and not tensor.tensor_shape.unknown_rank:
        content = tensor.tensor_content  # each read of the field copies it: read once
        shape = [d.size for d in tensor.tensor_shape.dim]
        if content and all(d >= 0 for d in shape) and len(content) == int(np.prod(shape)) * dtype.itemsize:
            return np.frombuffer(content, dtype).reshape(shape)
    return tf.make_ndarray(tensor)


def tensor_proto(value) -> tensor_pb2.TensorProto:
    """The TensorProto tf.make_tensor_proto builds for a model output (byte for byte), without its per-call cost
    for the common cases: numeric arrays, bool arrays, arrays of bytes. Anything else goes to tf.make_tensor_proto."""
    if isinstance(value, np.ndarray):
        dtype, proto = value.dtype, None
        if dtype in _CONTENT_DTYPES and value.size > 1:
            proto = tensor_pb2.TensorProto(dtype=_CONTENT_DTYPES[dtype], tensor_content=value.tobytes())
        elif dtype in _CONTENT_DTYPES:
            proto = tensor_pb2.TensorProto(dtype=_CONTENT_DTYPES[dtype])
            if value.size:
                getattr(proto, _SCALAR_FIELDS[dtype]).append(value.item())
        elif dtype == np.bool_:
            proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_BOOL, bool_val=value.ravel().tolist())
        elif dtype == np.object_:
            flat = value.ravel().tolist()
            if all(type(x) is bytes for x in flat):
                proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=flat)
        if proto is not None:
            proto.tensor_shape.SetInParent()
            for d in value.shape:
                proto.tensor_shape.dim.add(size=d)
            return proto
    return tf.make_tensor_proto(value)


async def _abort(context, exc: ServingError):
    await context.abort(exc.code, exc.message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: PredictionCore):
        self.core = core

    async def Predict(self, request: predict_pb2.PredictRequest, context):
        version, label = _version_and_label(request.model_spec)
        try:
            try:
                inputs = {k: ndarray(v) for k, v in request.inputs.items()}
            except (TypeError, ValueError) as exc:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"bad input tensor: {exc}") from None
            signature = request.model_spec.signature_name or "serving_default"
            servable, outputs = await self.core.predict("grpc_predict", request.model_spec.name, version, label,
                                                        signature, inputs, tuple(request.output_filter))
        except ServingError as exc:
            return await _abort(context, exc)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tensor_proto(value))
        return response

    async def Classify(self, request: classification_pb2.ClassificationRequest, context):
        version, label = _version_and_label(request.model_spec)
        try:
            servable = self.core.manager.resolve(request.model_spec.name, version, label)
            info = servable.signature(request.model_spec.signature_name)
            if info.method_name != "tensorflow/serving/classify":
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Expected classification signature method_name to be tensorflow/serving/classify."
                                   f" Was: {info.method_name}")
            examples = [e.SerializeToString() for e in _examples(request.input)]
            (input_name,) = info.inputs
            _, outputs = await self.core.predict("grpc_classify", request.model_spec.name, servable.version, None,
                                                 info.name, {input_name: np.array(examples, dtype=object)})
        except ServingError as exc:
            return await _abort(context, exc)
        response = classification_pb2.ClassificationResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = info.name
        classes, scores = outputs.get("classes"), outputs.get("scores")
        for row in range(len(examples)):
            result = response.result.classifications.add()
            count = (classes if classes is not None else scores).shape[1]
            for i in range(count):
                entry = result.classes.add()
                if classes is not None:
                    entry.label = classes[row][i].decode() if isinstance(classes[row][i], bytes) else str(classes[row][i])
                if scores is not None:
                    entry.score = float(scores[row][i])
        return response

    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context):
        version, label = _version_and_label(request.model_spec)
        try:
            for field in request.metadata_field:
                if field != "signature_def":
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
            if not request.metadata_field:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least "
                                   "one metadata_field")
            servable = self.core.manager.resolve(request.model_spec.name, version, label)
        except ServingError as exc:
            return await _abort(context, exc)
        return metadata_response(servable, request.model_spec.name)


def metadata_response(servable, name: str) -> get_model_metadata_pb2.GetModelMetadataResponse:
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = servable.version
    signature_map = SignatureDefMap()
    for key, value in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(value)
    packed = any_pb2.Any()
    packed.Pack(signature_map)
    response.metadata["signature_def"].CopyFrom(packed)
    return response


def _examples(inp):
    kind = inp.WhichOneof("kind")
    if kind == "example_list":
        return list(inp.example_list.examples)
    if kind == "example_list_with_context":
        return list(inp.example_list_with_context.examples)
    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Input is empty")


def status_response(manager: Manager, name: str, version: int | None, label: str | None):
    response = get_model_status_pb2.GetModelStatusResponse()
    for record in manager.status(name, version, label):
        entry = response.model_version_status.add()
        entry.version = record.version
        entry.state = int(record.state)
        if record.error:
            entry.status.error_code = 2  # tensorflow.error.UNKNOWN, as TF Serving reports a failed load
            entry.status.error_message = record.error
        elif record.servable is not None and record.servable.load_note:
            entry.status.error_message = record.servable.load_note  # error_code stays OK: it serves
    return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: Manager, reload_config):
        self.manager = manager
        self.reload_config = reload_config  # async callable(ModelServerConfig); raises ServingError

    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context):
        version, label = _version_and_label(request.model_spec)
        try:
            return status_response(self.manager, request.model_spec.name, version, label)
        except ServingError as exc:
            return await _abort(context, exc)

    async def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest, context):
        """As TF Serving: a failed reload (a new model that did not become available, a refused label) fails the
        RPC with that status; the response's status field carries OK otherwise."""
        try:
            await self.reload_config(request.config)
        except ServingError as exc:
            return await _abort(context, exc)
        return model_management_pb2.ReloadConfigResponse()


def build_server(core: PredictionCore, reload_config, port: int, host: str = "0.0.0.0",
                 options: list[tuple[str, int | str]] = ()) -> grpc.aio.Server:
    """``options``: further gRPC server arguments (--grpc_channel_arguments), after the message size limits."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *options,
    ])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(core), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core.manager, reload_config), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    return server
