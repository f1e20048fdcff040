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


async def _abort(context, exc: ServingError):
    await context.abort(exc.code, exc.message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: PredictionCore, tensor_content: bool = False):
        self.core = core
        self.tensor_content = tensor_content  # --enable_serialization_as_tensor_content

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
            response.outputs[name].CopyFrom(tensor_proto(value, self.tensor_content))
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
        entry.status.SetInParent()  # TF Serving always sets it: error_code OK for a healthy version
        if record.error:
            entry.status.error_code = 2  # tensorflow.error.UNKNOWN, as TF Serving reports a failed load
            entry.status.error_message = record.error
    return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: Manager, reload_config):
        self.manager = manager
        self.reload_config = reload_config  # async callable(ModelServerConfig) -> list[str] errors

    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context):
        version, label = _version_and_label(request.model_spec)
        try:
            return status_response(self.manager, request.model_spec.name, version, label)
        except ServingError as exc:
            return await _abort(context, exc)

    async def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest, context):
        response = model_management_pb2.ReloadConfigResponse()
        try:
            errors = await self.reload_config(request.config)
        except ServingError as exc:
            errors = [exc.message]
        if errors:
            response.status.error_code = 9  # FAILED_PRECONDITION
            response.status.error_message = "; ".join(errors)
        return response


def build_server(core: PredictionCore, reload_config, port: int, host: str = "0.0.0.0") -> grpc.aio.Server:
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(core), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core.manager, reload_config), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    return server
