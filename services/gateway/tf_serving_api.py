"""The TF Serving API messages and stubs, and conversion between numpy arrays and TensorProto.

The stubs live in ``tensorflow_serving.apis`` and import ``tensorflow.core.*`` protos, which would run TensorFlow's
``__init__`` (seconds of start-up, hundreds of MB). Gateway processes call
``light_tf.use_light_tensorflow_protos()`` first so that only the generated protobuf modules load.
"""
from __future__ import annotations

import numpy as np

from services.gateway.light_tf import use_light_tensorflow_protos  # noqa: F401 (re-exported)
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
)

__all__ = ["get_model_metadata_pb2", "get_model_status_pb2", "model_service_pb2_grpc", "predict_pb2",
           "prediction_service_pb2_grpc", "pixels_to_tensor", "tensor_to_numpy", "tensor_pb2", "types_pb2"]


def pixels_to_tensor(pixels: np.ndarray) -> tensor_pb2.TensorProto:
    """uint8 [batch, H, W, 3] -> TensorProto (raw tensor_content, what tf.make_tensor_proto does for uint8)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in pixels.shape])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, tensor_shape=shape, tensor_content=pixels.tobytes())


_NUMPY_DTYPES = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64, types_pb2.DT_BOOL: np.bool_,
                 types_pb2.DT_INT32: np.int32, types_pb2.DT_INT64: np.int64, types_pb2.DT_UINT8: np.uint8}
_VAL_FIELDS = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val", types_pb2.DT_BOOL: "bool_val",
               types_pb2.DT_INT32: "int_val", types_pb2.DT_INT64: "int64_val", types_pb2.DT_UINT8: "int_val"}


def tensor_to_numpy(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    """TensorProto -> numpy (numbers, bools, strings as Python str); tensor_content or the typed *_val field."""
    shape = [d.size for d in tensor.tensor_shape.dim]
    if tensor.dtype == types_pb2.DT_STRING:
        values = np.array([s.decode("utf-8", "replace") for s in tensor.string_val], dtype=object)
    else:
        dtype = _NUMPY_DTYPES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"unsupported output dtype {types_pb2.DataType.Name(tensor.dtype)}")
        if tensor.tensor_content:
            values = np.frombuffer(tensor.tensor_content, dtype=dtype)
        else:
            values = np.array(getattr(tensor, _VAL_FIELDS[tensor.dtype]), dtype=dtype)
    count = int(np.prod(shape)) if shape else 1
    if values.size == 1 and count > 1:  # TF Serving may send one value for a tensor filled with it
        values = np.repeat(values, count)
    return values.reshape(shape)
