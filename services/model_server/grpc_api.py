"""gRPC: tensorflow.serving.PredictionService and ModelService, with TF Serving's status codes."""
from __future__ import annotations

import inspect
import logging
import math
import re
import time
from dataclasses import dataclass

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2, get_model_metadata_pb2, get_model_status_pb2, inference_pb2, model_management_pb2,
    model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc, regression_pb2,
)
from tensorflow_serving.apis.get_model_metadata_pb2 import SignatureDefMap

from services.grpc_listen import listen
from services.grpc_requests import parsing, refuse_undecodable
from services.model_server import metrics
from services.model_server.core import PredictionCore
from services.model_server.errors import DEFAULT_SIGNATURE, ServingError
from services.model_server.inference import Inference, version_and_label
from services.model_server.manager import Manager
from services.status_details import status_details

log = logging.getLogger("model_server.grpc")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # batches of 224x224x3 images are large


# numpy dtype -> (DataType, the TensorProto field Tensor::AsProtoField writes its values to)
_FIELDS = {
    np.dtype(np.float32): (types_pb2.DT_FLOAT, "float_val"), np.dtype(np.float64): (types_pb2.DT_DOUBLE, "double_val"),
    np.dtype(np.int32): (types_pb2.DT_INT32, "int_val"), np.dtype(np.int16): (types_pb2.DT_INT16, "int_val"),
    np.dtype(np.int8): (types_pb2.DT_INT8, "int_val"), np.dtype(np.uint8): (types_pb2.DT_UINT8, "int_val"),
    np.dtype(np.uint16): (types_pb2.DT_UINT16, "int_val"), np.dtype(np.int64): (types_pb2.DT_INT64, "int64_val"),
    np.dtype(np.uint32): (types_pb2.DT_UINT32, "uint32_val"), np.dtype(np.uint64): (types_pb2.DT_UINT64, "uint64_val"),
    np.dtype(np.bool_): (types_pb2.DT_BOOL, "bool_val"),
}
# the dtypes a request's tensor_content is read from without tf.make_ndarray
_NUMPY_DTYPES = {dt: np_dtype for np_dtype, (dt, _) in _FIELDS.items() if np_dtype != np.dtype(np.bool_)}
# DataType -> (its TensorProto field of fixed-width values, the field's number, their little-endian dtype): read from
# the field's packed bytes without tf.make_ndarray, which converts value by value (a float photo, 150,528 values,
# took it milliseconds, the GIL held throughout).
_PACKED_FIXED = {dt: (name, tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name[name].number, np.dtype(code))
                 for dt, name, code in ((types_pb2.DT_FLOAT, "float_val", "<f4"),
                                        (types_pb2.DT_DOUBLE, "double_val", "<f8"))}
_LENGTH_DELIMITED, _FIXED64, _FIXED32, _VARINT = 2, 1, 5, 0  # protobuf wire types


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def _packed_field(raw: bytes, number: int) -> bytes | memoryview | None:
    """The packed values of field ``number`` in the serialized message ``raw`` (its records joined: an encoder may
    split a packed field), read from the message's top-level records alone; None when the field comes unpacked (one
    record a value, which proto3 parsers take too) or the message holds a group."""
    parts, at, view = [], 0, memoryview(raw)
    while at < len(raw):
        key, at = _varint(raw, at)
        field, wire = key >> 3, key & 7
        if wire == _LENGTH_DELIMITED:
            length, at = _varint(raw, at)
            if field == number:
                parts.append(view[at:at + length])
            at += length
        elif field == number:
            return None
        elif wire == _VARINT:
            at = _varint(raw, at)[1]
        elif wire in (_FIXED64, _FIXED32):
            at += 8 if wire == _FIXED64 else 4
        else:  # a group (deprecated wire types, kept as an unknown field): left to the protobuf library
            return None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def ndarray(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    """tf.make_ndarray for a request's input tensor, without its copy and per-call cost in the common cases (numeric
    tensor_content of the right size: a read-only view of the bytes; float_val or double_val holding every value:
    read from their packed bytes); anything else goes to tf.make_ndarray.

    A tensor whose values are fewer than its shape holds is filled with the last one, so a few bytes may ask for any
    size: a tensor is refused (ValueError) when it would take more than MAX_MESSAGE_BYTES, what the largest request
    carries (counting 8 bytes an element of another type than the numbers above: a string's reference), before
    anything is allocated."""
    dtype = _NUMPY_DTYPES.get(tensor.dtype)
    if not tensor.tensor_shape.unknown_rank:
        shape = [d.size for d in tensor.tensor_shape.dim]
        elements, known = math.prod(shape), all(d >= 0 for d in shape)
        size = elements * (dtype.itemsize if dtype is not None else 8)
        if known and size > MAX_MESSAGE_BYTES:
            raise ValueError(f"shape {shape} of {types_pb2.DataType.Name(tensor.dtype)} would take {size} bytes, "
                             f"more than the {MAX_MESSAGE_BYTES} bytes a request may carry")
        if dtype is not None and known:
            content = tensor.tensor_content  # each read of the field copies it: read once
            if content and len(content) == elements * dtype.itemsize:
                return np.frombuffer(content, dtype).reshape(shape)
            packed = _PACKED_FIXED.get(tensor.dtype)
            if packed is not None and not content:
                field, number, little_endian = packed
                if len(getattr(tensor, field)) == elements:  # else tf.make_ndarray's filling with the last value
                    values = _packed_field(tensor.SerializeToString(), number)
                    if values is not None:
                        return np.frombuffer(values, little_endian).astype(dtype, copy=False).reshape(shape)
    return tf.make_ndarray(tensor)


def tensor_proto(value, as_content: bool = False) -> tensor_pb2.TensorProto:
    """A model output as TF Serving's Predict writes it: by default Tensor::AsProtoField (values in the typed field,
    float_val, int_val, bool_val, string_val, ...); with ``as_content`` Tensor::AsProtoTensorContent (numbers and
    bools as raw tensor_content, strings still in string_val), TF Serving's --enable_serialization_as_tensor_content.
    Numeric, bool and bytes arrays are written here; anything else goes to tf.make_tensor_proto."""
    if isinstance(value, np.generic):  # a 0-d output's .numpy()
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        proto = None
        if value.dtype in _FIELDS:
            dtype, field = _FIELDS[value.dtype]
            proto = tensor_pb2.TensorProto(dtype=dtype)
            if as_content:
                proto.tensor_content = np.ascontiguousarray(value).tobytes()
            else:
                getattr(proto, field).extend(value.ravel().tolist())
        elif value.dtype == np.object_:
            flat = value.ravel().tolist()
            if all(type(x) is bytes for x in flat):
                proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=flat)
        if proto is not None:
            proto.tensor_shape.SetInParent()
            for d in value.shape:
                proto.tensor_shape.dim.add(size=d)
            return proto
    return tf.make_tensor_proto(value)


def input_arrays(inputs) -> dict[str, np.ndarray]:
    """A Predict request's inputs (name -> TensorProto) as arrays; INVALID_ARGUMENT for a tensor that is none."""
    try:
        return {name: ndarray(tensor) for name, tensor in inputs.items()}
    except (TypeError, ValueError) as exc:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"bad input tensor: {exc}") from None


async def _abort(context, exc: ServingError):
    await context.abort(exc.code, status_details(exc.message))


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: PredictionCore, inference: Inference, tensor_content: bool = False):
        self.core = core
        self.inference = inference
        self.tensor_content = tensor_content  # --enable_serialization_as_tensor_content

    async def Predict(self, request: predict_pb2.PredictRequest, context):
        started = time.perf_counter()
        version, label = version_and_label(request.model_spec)
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        try:
            servable, outputs = await self.core.predict("grpc_predict", request.model_spec.name, version, label,
                                                        signature, request.inputs, tuple(request.output_filter),
                                                        read=input_arrays)
        except ServingError as exc:
            return await _abort(context, exc)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tensor_proto(value, self.tensor_content))
        metrics.observe_request(request.model_spec.name, "Predict", "GRPC", started)
        return response

    async def Classify(self, request: classification_pb2.ClassificationRequest, context):
        started = time.perf_counter()
        try:
            response = await self.inference.classify(request)
        except ServingError as exc:
            return await _abort(context, exc)
        metrics.observe_request(request.model_spec.name, "Classify", "GRPC", started)
        return response

    async def Regress(self, request: regression_pb2.RegressionRequest, context):
        started = time.perf_counter()
        try:
            response = await self.inference.regress(request)
        except ServingError as exc:
            return await _abort(context, exc)
        metrics.observe_request(request.model_spec.name, "Regress", "GRPC", started)
        return response

    async def MultiInference(self, request: inference_pb2.MultiInferenceRequest, context):
        try:
            return await self.inference.multi_inference(request)
        except ServingError as exc:
            return await _abort(context, exc)

    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context):
        version, label = version_and_label(request.model_spec)
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


def status_response(manager: Manager, name: str, version: int | None):
    """A GetModelStatusResponse; a version label in the request is not read, as TF Serving does not read it."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for record in manager.status(name, version):
        entry = response.model_version_status.add()
        entry.version = record.version
        entry.state = int(record.state)
        entry.status.SetInParent()  # TF Serving always sets it: error_code OK for a healthy version
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
        version, _ = version_and_label(request.model_spec)
        try:
            return status_response(self.manager, request.model_spec.name, version)
        except ServingError as exc:
            return await _abort(context, exc)

    async def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest, context):
        """As TF Serving (model_service_impl.cc): only a ModelConfigList is reloaded, anything else (an empty config
        too) is INVALID_ARGUMENT and changes nothing; a failed reload (a config refused, a new model that did not
        become available) fails the RPC with that status; the response's status field carries OK otherwise."""
        try:
            if request.config.WhichOneof("config") != "model_config_list":
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                                   "ModelConfigList is currently supported")
            await self.reload_config(request.config)
        except ServingError as exc:
            return await _abort(context, exc)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.SetInParent()  # error_code OK, as TF Serving always sets it
        return response


@dataclass(frozen=True)
class GrpcOptions:
    """How the gRPC server listens and answers: TF Serving's --port, --grpc_socket_path, --grpc_channel_arguments,
    --enable_serialization_as_tensor_content, --enable_grpc_healthcheck_service, and the credentials of
    --ssl_config_file / --use_alts_credentials (None: plain text)."""
    port: int = 8500
    host: str = "0.0.0.0"
    socket_path: str = ""
    channel_arguments: tuple[tuple[str, int | str], ...] = ()
    tensor_content: bool = False
    health_check: bool = False
    credentials: grpc.ServerCredentials | None = None


def parse_channel_arguments(text: str) -> tuple[tuple[str, int | str], ...]:
    """``key=value,key=value`` as TF Serving's parseGrpcChannelArgs reads it; a value that parses as a 32-bit int
    is passed as an int, anything else as a string (server.cc). Raises ValueError for an entry without ``=``."""
    arguments = []
    for entry in text.split(","):
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ValueError(f"gRPC channel argument {entry!r} is not key=value")
        number = int(value) if re.fullmatch(r"\s*[+-]?\d+\s*", value) else None  # absl::SimpleAtoi's syntax
        arguments.append((key, number if number is not None and -2**31 <= number < 2**31 else value))
    return tuple(arguments)


class UnparsedRequests(grpc.aio.ServerInterceptor):
    """A request message that does not parse ends its RPC with INTERNAL, the status TF Serving's C++ gRPC gives it
    (GenericDeserialize), naming the message it is not, rather than grpcio's UNKNOWN (services/grpc_requests.py).
    Applies to the unary methods written as coroutines: every method of TF Serving's services."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming \
                or not inspect.iscoroutinefunction(handler.unary_unary):
            return handler
        behavior = handler.unary_unary

        async def answer(request, context):
            await refuse_undecodable(request, context, grpc.StatusCode.INTERNAL)
            return await behavior(request, context)
        return handler._replace(unary_unary=answer, request_deserializer=parsing(handler.request_deserializer))


def build_server(core: PredictionCore, inference: Inference, reload_config, options: GrpcOptions) -> grpc.aio.Server:
    channel = {"grpc.max_receive_message_length": MAX_MESSAGE_BYTES, "grpc.max_send_message_length": MAX_MESSAGE_BYTES}
    channel.update(options.channel_arguments)  # the command line wins, as in TF Serving
    server = grpc.aio.server(interceptors=[UnparsedRequests()], options=list(channel.items()))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(core, inference, options.tensor_content), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core.manager, reload_config), server)
    if options.health_check:
        health = HealthServicer()
        for service in ("ModelService", "PredictionService"):  # the names TF Serving marks SERVING
            health.set(service, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for address in ([f"{options.host}:{options.port}"] if options.port else []) + (
            [f"unix:{options.socket_path}"] if options.socket_path else []):
        listen(server, address, options.credentials)
    if not options.port and not options.socket_path:
        raise OSError("At least one of server_options.grpc_port or server_options.grpc_socket_path must be set.")
    return server
