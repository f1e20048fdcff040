"""REST: TF Serving's `/v1/models/...` endpoints with its JSON shapes (row `instances` and columnar `inputs`)."""
from __future__ import annotations

import asyncio
import base64
import decimal
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Callable

import grpc
import numpy as np
import tensorflow as tf
from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import classification_pb2, regression_pb2
from tensorflow_serving.apis.get_model_metadata_pb2 import SignatureDefMap

from services.http_errors import UNDECODABLE, undecodable_body
from services.http_stop import close_connections_when
from services.model_server import metrics
from services.model_server.core import PredictionCore
from services.model_server.errors import ServingError
from services.model_server.grpc_api import metadata_response, status_response
from services.model_server.inference import Inference

log = logging.getLogger("model_server.rest")

# http_rest_api_util.h / .cc: every path matching the handler's regex goes to it; POST paths are parsed with the
# prediction regex, GET paths with the status regex, all case-insensitively (so the captured verb or subresource
# keeps the case it was written in). Matched against the path as sent, before percent-decoding.
_HANDLER_PATH = r"(?is:v1/.*)"  # kHTTPRestApiHandlerPathRegex "(?i)/v1/.*", as an aiohttp route after its "/"
_PREDICTION_PATH = re.compile(r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
                              r":(classify|regress|predict)", re.IGNORECASE | re.ASCII)
_STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
                          re.IGNORECASE | re.ASCII)
_INT64_MAX = 2**63 - 1


class _ParsedPath:
    """What TF Serving's ParseModelInfo reads from a path: ``verb`` is the POST verb or, for a GET, the subresource
    ("" for a status request); ``name`` is "" when the path names no model."""

    def __init__(self, verb: str, name: str, version: int | None, label: str | None):
        self.verb, self.name, self.version, self.label = verb, name, version, label


def _parse_path(method: str, raw_path: str) -> _ParsedPath | None:
    """http_rest_api_util.cc ParseModelInfo: None when the path does not match the method's regex (or the method is
    neither POST nor GET); ServingError when the version is not an int64."""
    pattern = {"POST": _PREDICTION_PATH, "GET": _STATUS_PATH}.get(method)
    m = pattern.fullmatch(raw_path) if pattern else None
    if m is None:
        return None
    name, version, label, verb = m.groups()
    if version is not None and int(version) > _INT64_MAX:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Failed to convert version: {version} to numeric.")
    return _ParsedPath(verb or "", urllib.parse.unquote(name or ""), int(version) if version is not None else None,
                       urllib.parse.unquote(label) if label is not None else None)


def _json(message) -> dict:
    """A proto as TF Serving's REST API prints it (http_rest_api_util.cc ToJsonString): field names as in the
    .proto, and fields holding their default value printed too (always_print_fields_with_no_presence)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ------------------------------------------------------------------------ JSON values in TF Serving's messages
_DEBUG_STRING_BYTES = 256  # json_tensor.cc kMaxJsonDebugStringBytes
_STRING_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                   **{chr(c): f"\\u{c:04X}" for c in range(0x20) if chr(c) not in "\b\f\n\r\t"}}


def _rapidjson_string(text: str) -> str:
    return '"' + "".join(_STRING_ESCAPES.get(c, c) for c in text) + '"'


def _rapidjson_double(value: float) -> str | None:
    """rapidjson's Writer::Double (internal/dtoa.h: shortest digits, Prettify): 1.0, 0.001, 1e-7, 1.5e300; None for
    NaN and infinities, which that writer refuses."""
    if value != value or value in (float("inf"), float("-inf")):
        return None
    if value == 0:
        return "-0.0" if str(value).startswith("-") else "0.0"
    _, digits, exponent = decimal.Decimal(repr(abs(value))).normalize().as_tuple()
    text, length = "".join(map(str, digits)), len(digits)
    kk = length + exponent  # 10^(kk-1) <= value < 10^kk
    if 0 <= exponent and kk <= 21:
        out = text + "0" * exponent + ".0"
    elif 0 < kk <= 21:
        out = text[:kk] + "." + text[kk:]
    elif -6 < kk <= 0:
        out = "0." + "0" * -kk + text
    elif length == 1:
        out = f"{text}e{kk - 1}"
    else:
        out = f"{text[0]}.{text[1:]}e{kk - 1}"
    return ("-" if value < 0 else "") + out


def _debug_tokens(value, depth: int):
    """The writes rapidjson's PrettyWriter makes for ``value`` (4-space indent, kFormatSingleLineArray), each with
    the separator written before it; a None where the writer would refuse a number."""
    indent = "    "
    if isinstance(value, dict):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield ("\n" if i == 0 else ",\n") + indent * (depth + 1) + _rapidjson_string(key)
            for j, token in enumerate(_debug_tokens(item, depth + 1)):
                yield token if j or token is None else ": " + token
        yield "\n" + indent * depth + "}" if value else "}"
    elif isinstance(value, list):
        yield "["
        for i, item in enumerate(value):
            for j, token in enumerate(_debug_tokens(item, depth + 1)):
                yield token if j or not i or token is None else ", " + token
        yield "]"
    elif value is None:
        yield "null"
    elif isinstance(value, bool):
        yield "true" if value else "false"
    elif isinstance(value, int):
        yield str(value)
    elif isinstance(value, float):
        yield _rapidjson_double(value)
    else:
        yield _rapidjson_string(str(value))


def json_debug_string(value) -> str:
    """json_tensor.cc JsonValueToDebugString: ``value`` as rapidjson's PrettyWriter writes it, each write made only
    while fewer than 256 bytes are written (so one value may end past them), stopping at the first one refused."""
    out, size = [], 0
    for token in _debug_tokens(value, 0):
        if token is None or size >= _DEBUG_STRING_BYTES:
            break
        out.append(token)
        size += len(token.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _json_type(value) -> str:
    """json_tensor.cc JsonTypeString."""
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    return {dict: "Object", list: "Array", str: "String"}.get(type(value), "Number")


def _format_error(doc, *text: str) -> ServingError:
    """json_tensor.cc FormatError."""
    return _invalid(f"JSON Value: {json_debug_string(doc)} " + "".join(text))


# ---------------------------------------------------------------------------------------- JSON values -> tensors
_BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_ASCII_SPACE = str.maketrans("", "", " \t\n\v\f\r")  # absl::ascii_isspace
_PAD_EQUALS = {0: 0, 2: 2, 3: 1}  # data characters mod 4 -> the '=' a padded text ends in


def _base64_unescape(text: str) -> bytes | None:
    """absl::Base64Unescape, which TF Serving decodes {"b64": ...} with (json_tensor.cc JsonDecodeBase64Object):
    whitespace anywhere is skipped; the data may end in no padding or in exactly the right padding, '=' or '.';
    None when it is not base64."""
    compact = text.translate(_ASCII_SPACE)
    data = compact.rstrip("=.")
    padding = len(compact) - len(data)
    if not _BASE64_ALPHABET.issuperset(data) or len(data) % 4 == 1 or padding not in (0, _PAD_EQUALS[len(data) % 4]):
        return None
    return base64.b64decode(data + "=" * _PAD_EQUALS[len(data) % 4])


def _is_base64_object(value) -> bool:
    """json_tensor.cc IsValBase64Object: an object whose one member is "b64", a string."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _decode_base64_object(value) -> bytes:
    """json_tensor.cc JsonDecodeBase64Object."""
    if not _is_base64_object(value):
        raise _format_error(value, "not formatted correctly for base64 data")
    decoded = _base64_unescape(value["b64"])
    if decoded is None:
        raise _invalid("Unable to base64 decode")
    return decoded


def _dtype_string(dtype: tf.dtypes.DType) -> str:
    """TensorFlow's DataTypeString: "float", "uint8", "string"."""
    return types_pb2.DataType.Name(dtype.as_datatype_enum)[len("DT_"):].lower()


def _type_error(value, dtype: tf.dtypes.DType) -> ServingError:
    """json_tensor.cc TypeError."""
    return _invalid(f"JSON Value: {json_debug_string(value)} Type: {_json_type(value)} is not of expected type: "
                    f"{_dtype_string(dtype)}")


# json_tensor.cc AddValueToTensor: the JSON values each dtype takes (rapidjson's IsNumber, IsBool, IsString, and
# IsInt, IsInt64, IsUint, IsUint64 as ranges; Python's json gives an int for a literal without '.' or exponent, a
# float otherwise). The integer types under 32 bits take any int32 and narrow it as TensorProto's int_val is
# narrowed (tensor.cc), so 300 sent to a uint8 input is 44, as in TF Serving.
_INT32_RANGE = (-2**31, 2**31 - 1)
_INT_RANGES = {tf.int32: _INT32_RANGE, tf.int16: _INT32_RANGE, tf.int8: _INT32_RANGE, tf.uint8: _INT32_RANGE,
               tf.int64: (-2**63, 2**63 - 1), tf.uint32: (0, 2**32 - 1), tf.uint64: (0, 2**64 - 1)}
_TAKES_TYPES = {tf.float32: {int, float}, tf.float64: {int, float}, tf.bool: {bool}, tf.string: {str}}


def _leaf(value, dtype: tf.dtypes.DType):
    """One JSON value that is not a list, checked as json_tensor.cc FillTensorProto and AddValueToTensor check it."""
    if isinstance(value, dict):
        if dtype == tf.string:
            return _decode_base64_object(value)
        raise _type_error(value, dtype)
    if dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        takes = type(value) is int and low <= value <= high
    elif dtype in _TAKES_TYPES:
        takes = type(value) in _TAKES_TYPES[dtype]
    else:
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                           f"Conversion of JSON Value: {json_debug_string(value)} to type: {_dtype_string(dtype)}")
    if not takes:
        raise _type_error(value, dtype)
    return value.encode("utf-8", "surrogatepass") if dtype == tf.string else value


MAX_RANK = 64  # numpy's limit (TensorFlow's is 254)


def _dense_shape(value) -> list[int]:
    """json_tensor.cc GetDenseTensorShape: the sizes of the first list at each level."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill_leaves(value, level: int, shape: list[int], dtype, out: list) -> None:
    """json_tensor.cc FillTensorProto, value by value: every list at a level has that level's size, every other
    value sits at the last level."""
    if not isinstance(value, list):
        if level != len(shape):
            raise _invalid(f"JSON Value: {json_debug_string(value)} found at incorrect level: {level + 1} in the "
                           f"JSON DOM. Expected at level: {len(shape)}")
        out.append(_leaf(value, dtype))
        return
    if level >= len(shape):
        raise _invalid(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(value) != shape[level]:
        raise _invalid(f"Encountered list at unexpected size: {len(value)} at level: {level} expected size: "
                       f"{shape[level]}")
    for item in value:
        _fill_leaves(item, level + 1, shape, dtype, out)


def _as_dtype(values, shape, dtype: tf.dtypes.DType) -> np.ndarray:
    if dtype == tf.string:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    if dtype in _INT_RANGES and dtype.size < 8:  # narrowed as tensor.cc narrows int_val
        return np.array(values, dtype=np.int64).astype(dtype.as_numpy_dtype).reshape(shape)
    return np.array(values, dtype=dtype.as_numpy_dtype).reshape(shape)


def _regular_nest(nest: np.ndarray, dtype: tf.dtypes.DType) -> np.ndarray | None:
    """A regular nest's values as ``dtype`` when each is a JSON value of a type ``dtype`` takes (strings excepted:
    they are decoded one by one); None otherwise."""
    flat = nest.ravel()
    kinds = set(map(type, flat))
    if dtype in _INT_RANGES:
        if not kinds <= {int}:
            return None
        try:
            wide = flat.astype(np.int64)
        except OverflowError:  # beyond int64: the value by value check decides
            return None
        low, high = _INT_RANGES[dtype]
        if wide.size and not (low <= wide.min() and wide.max() <= high):
            return None
        return _as_dtype(wide, nest.shape, dtype)
    if dtype == tf.string or not kinds <= _TAKES_TYPES.get(dtype, set()):
        return None
    return flat.astype(dtype.as_numpy_dtype).reshape(nest.shape)


def tensor_from_json(value, dtype: tf.dtypes.DType) -> np.ndarray:
    """A JSON value (a list nested to any depth, or one value) as a tensor of ``dtype``, taken or refused with TF
    Serving's rules and messages (json_tensor.cc GetDenseTensorShape + FillTensorProto). The common case, a
    regular nest of values of the right JSON types, is checked by numpy; anything else goes value by value, which
    finds the first problem in TF Serving's order."""
    shape = _dense_shape(value)
    if len(shape) > MAX_RANK:
        raise _invalid(f"JSON Value nests lists {len(shape)} deep: a tensor has at most {MAX_RANK} dimensions here")
    try:
        nest = np.array(value, dtype=object)
    except ValueError:  # lists of different lengths
        nest = None
    if nest is not None and nest.shape == tuple(shape):
        tensor = _regular_nest(nest, dtype)
        if tensor is not None:
            return tensor
        flat = nest.ravel()
        if not any(isinstance(v, list) for v in flat):  # the first value refused, in TF Serving's (row-major) order
            return _as_dtype([_leaf(v, dtype) for v in flat], shape, dtype)
    leaves: list = []
    _fill_leaves(value, 0, shape, dtype, leaves)
    return _as_dtype(leaves, shape, dtype)


def _shape_string(shape) -> str:
    """json_tensor.cc ShapeToString."""
    return "[" + ",".join(map(str, shape)) + "]"


def _instances_to_tensors(instances: list, inputs: dict[str, tf.dtypes.DType]) -> dict[str, np.ndarray]:
    """json_tensor.cc FillTensorMapFromInstancesList: the row format. Each instance is an object naming every input
    of the signature (those with a default value too), or, for a one-input signature, that input's value; the
    instances of an input must agree in size and shape, and are stacked."""
    if not isinstance(instances[0], dict) and len(inputs) > 1:
        raise _invalid("instances is a plain list, but expecting list of objects as multiple input tensors required "
                       "as per tensorinfo_map")

    def is_object(value) -> bool:
        return isinstance(value, dict) and not _is_base64_object(value)

    objects = is_object(instances[0])
    columns: dict[str, list[np.ndarray]] = {}

    def add(index: int, name: str, item, where: str) -> None:
        try:
            if name not in inputs:
                raise _invalid(f"JSON object: does not have named input: {name}")
            tensor = tensor_from_json(item, inputs[name])
            if columns.get(name):
                first = columns[name][0]
                if first.size != tensor.size:
                    raise _invalid(f"Expecting tensor size: {first.size} but got: {tensor.size}")
                if first.shape != tensor.shape:
                    raise _invalid(f"Expecting shape {_shape_string(first.shape)} but got: "
                                   f"{_shape_string(tensor.shape)}")
            columns.setdefault(name, []).append(tensor)
        except ServingError as exc:
            raise _invalid(f"Failed to process element: {index}{where} of 'instances' list. Error: "
                           f"{exc.code.name}: {exc.message}") from None

    for index, instance in enumerate(instances):
        if objects:
            if not is_object(instance):
                raise _invalid(f"Expecting object but got list at item {index} of input list")
            for name, item in instance.items():
                add(index, name, item, f" key: {name}")
            if set(instance) != set(inputs):
                raise _invalid(f"Failed to process element: {index} of 'instances' list. JSON object: "
                               f"{json_debug_string(instance)} keys must be equal to: {','.join(sorted(inputs))}")
        else:
            if is_object(instance):
                raise _invalid(f"Expecting value/list but got object at item {index} of input list")
            add(index, next(iter(inputs)), instance, "")
    return {name: np.stack(tensors) for name, tensors in columns.items()}


def _inputs_to_tensors(value, inputs: dict[str, tf.dtypes.DType]) -> dict[str, np.ndarray]:
    """json_tensor.cc FillTensorMapFromInputsMap: the columnar format. An object names every input of the signature
    (those with a default value too; other keys are not looked at), or, for a one-input signature, the value is
    that input's."""
    if not isinstance(value, dict) or _is_base64_object(value):
        if len(inputs) > 1:
            raise _invalid("inputs is a plain value/list, but expecting an object as multiple input tensors required "
                           "as per tensorinfo_map")
        (name, dtype), = inputs.items()
        return {name: tensor_from_json(value, dtype)}
    tensors = {}
    for name in sorted(inputs):
        if name not in value:
            raise _invalid(f"Missing named input: {name} in 'inputs' object.")
        tensors[name] = tensor_from_json(value[name], inputs[name])
    return tensors


def _signature_name(body: dict) -> str:
    """json_tensor.cc FillSignature: "signature_name", when present, is a string."""
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        raise _invalid(f"JSON Value: {json_debug_string(body)} not formatted correctly. 'signature_name' key must be "
                       "a string value.")
    return name


_POWERS_OF_TEN = 10.0 ** np.arange(-22, 23)  # the powers of ten a double holds exactly


def _decimal_printf(value: float) -> float:
    text = "%g" % value
    if np.float32(float(text)) != np.float32(value):
        text = "%.9g" % value
    return float(text)


def _rounded(values: np.ndarray, exponents: np.ndarray, digits: int) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits, as the doubles nearest those decimals (one correctly
    rounded multiplication or division by an exact power of ten); NaN where that is not certain (a power of ten
    beyond 1e22, or a near tie printf could round the other way)."""
    k = digits - 1 - exponents
    exact = (k >= -22) & (k <= 22)
    power = _POWERS_OF_TEN[np.clip(np.abs(k), 0, 22) + 22]
    scaled = np.where(k >= 0, values * power, values / power)
    fraction = np.abs(scaled - np.trunc(scaled))
    exact &= np.abs(fraction - 0.5) > 1e-6
    mantissa = np.rint(scaled)
    return np.where(exact, np.where(k >= 0, mantissa / power, mantissa * power), np.nan)


def float32_decimals(array: np.ndarray) -> np.ndarray:
    """float32 values as TF Serving's REST API writes them (json_tensor.cc WriteDecimal: printf %g, or %.9g when
    six digits do not give the float back), as the doubles that text parses to: 0.1, not 0.10000000149011612.
    Vectorised; the rare values it cannot decide with certainty go through printf itself."""
    values = array.astype(np.float64).ravel()
    out = values.copy()
    where = np.flatnonzero(np.isfinite(values) & (values != 0))
    x = values[where]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        exponents = np.floor(np.log10(np.abs(x))).astype(np.int64)
        exponents += (np.abs(x) >= 10.0 ** (exponents + 1)).astype(np.int64)
        exponents -= (np.abs(x) < 10.0 ** exponents).astype(np.int64)
        six, nine = _rounded(x, exponents, 6), _rounded(x, exponents, 9)
        chosen = np.where(six.astype(np.float32) == x.astype(np.float32), six, nine)
    unsure = np.flatnonzero(~np.isfinite(six) | ~np.isfinite(chosen))
    chosen[unsure] = [_decimal_printf(v) for v in x[unsure].tolist()]
    out[where] = chosen
    return out.reshape(array.shape)


def _jsonable(name: str, array: np.ndarray):
    if array.dtype == object or array.dtype.kind in "SU":
        flat = [_string_out(name, v) for v in array.reshape(-1)]
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
    if array.dtype == np.float32:
        return float32_decimals(array).tolist()
    return array.tolist()


def _string_out(name: str, value):
    if isinstance(value, bytes):
        if name.endswith("_bytes"):
            return {"b64": base64.b64encode(value).decode()}
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode()}
    return value


async def _json_body(request: web.Request) -> dict:
    """json_tensor.cc ParseJson: the body is one JSON object."""
    raw = await request.read()
    if not raw:
        raise _invalid("JSON Parse error: The document is empty")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise _invalid(f"JSON Parse error: {exc}") from None
    if not isinstance(body, dict):
        raise _format_error(body, "Is not object")
    return body


def _add_feature_value(value, name: str, feature: feature_pb2.Feature) -> None:
    """One JSON value into a tf.train.Feature, as TF Serving's json_tensor.cc AddValueToFeature: a JSON float goes
    to float_list, an integer or a bool to int64_list, a string or {"b64": ...} to bytes_list; one feature holds
    one kind."""
    kind = feature.WhichOneof("kind")

    def check(wanted: str) -> None:
        if kind not in (None, wanted):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Unexpected element type in feature: {name} "
                               f"expecting type: {kind.split('_')[0]}")

    if isinstance(value, bool) or isinstance(value, int):
        check("int64_list")
        if not -2**63 <= int(value) < 2**63:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Feature: {name} has uint64_t element. Only int64_t is supported.")
        feature.int64_list.value.append(int(value))
    elif isinstance(value, float):
        check("float_list")
        feature.float_list.value.append(value)
    elif isinstance(value, str):
        check("bytes_list")
        feature.bytes_list.value.append(value.encode())
    elif isinstance(value, dict) and set(value) == {"b64"}:
        check("bytes_list")
        feature.bytes_list.value.append(_decode_base64_object(value))
    else:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Feature: {name} has element with unexpected JSON "
                           f"type: {type(value).__name__}")


def _example_from_json(value, example: example_pb2.Example) -> None:
    if not isinstance(value, dict):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"Example must be JSON object but got JSON {type(value).__name__}")
    for name, content in value.items():
        feature = example.features.feature[name]
        for item in content if isinstance(content, list) else [content]:
            _add_feature_value(item, name, feature)


def fill_examples_from_json(body: dict, request) -> None:
    """TF Serving's FillClassifyRegressRequestFromJson."""
    request.model_spec.signature_name = _signature_name(body)
    has_context = "context" in body
    if has_context:
        _example_from_json(body["context"], request.input.example_list_with_context.context)
    if "examples" not in body:
        raise _format_error(body, "When method is classify, key 'examples' is expected and was not found")
    examples = body["examples"]
    if not isinstance(examples, list):
        raise _format_error(body, "Expecting 'examples' value to be an list/array")
    if not examples:
        raise _format_error(body, "'examples' value is an empty array")
    target = request.input.example_list_with_context if has_context else request.input.example_list
    for value in examples:
        _example_from_json(value, target.examples.add())


CORS_HEADERS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, GET",
                "Access-Control-Allow-Headers": "Content-Type"}  # http_rest_api_util.cc AddCORSHeaders


class RestApi:
    """TF Serving's REST API. ``timeout_ms`` bounds a predict/classify/regress call (--rest_api_timeout_in_ms: 504
    when exceeded, as TF Serving's session-run deadline); ``max_concurrent`` requests are processed at once, the
    rest wait their turn (--rest_api_num_threads: TF Serving's HTTP worker threads); ``cors`` adds TF Serving's
    CORS headers to every answer (--rest_api_enable_cors_support)."""

    def __init__(self, core: PredictionCore, inference: Inference, monitoring_path: str | None,
                 timeout_ms: int = 30_000, max_concurrent: int = 0, cors: bool = False,
                 closing: Callable[[], bool] = lambda: False):
        self.closing = closing  # () -> True once the server is stopping: answers close their connections
        self.core = core
        self.inference = inference
        self.monitoring_path = monitoring_path
        self.timeout = timeout_ms / 1000 if timeout_ms > 0 else None
        self.max_concurrent = max_concurrent
        self.cors = cors

    def app(self) -> web.Application:
        middlewares = ([self._cors] if self.cors else []) + [self._errors_as_json]
        if self.max_concurrent > 0:
            middlewares.append(self._limit_concurrency(asyncio.Semaphore(self.max_concurrent)))
        app = web.Application(client_max_size=256 * 1024 * 1024, middlewares=middlewares)
        app.on_response_prepare.append(close_connections_when(self.closing))
        if self.monitoring_path:
            app.router.add_get(self.monitoring_path, self.metrics)
        app.router.add_route("*", "/{path:" + _HANDLER_PATH + "}", self.dispatch)
        return app

    @web.middleware
    async def _cors(self, request: web.Request, handler):
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        response.headers.update(CORS_HEADERS)
        return response

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler):
        """TF Serving answers every error as {"error": message}: so are aiohttp's own (a body over the size limit,
        say), a body its Content-Encoding does not decode, and an exception nothing handles (a bug, logged)."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400 or exc.content_type == "application/json":
                raise
            return _error(exc.status, exc.text or exc.reason)
        except UNDECODABLE as exc:
            return _error(400, undecodable_body(exc))
        except Exception:  # noqa: BLE001 - a bug: answered as every other error is
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, "the model server failed on this request (a bug, logged)")

    def _limit_concurrency(self, slots: asyncio.Semaphore):
        """At most as many requests processed at once as ``slots`` holds. A request takes its slot once its whole
        body has arrived, as TF Serving's libevent hands a worker thread only complete requests: a client slow to
        send (a bad network) holds its connection, never a slot. Its body has the REST timeout to arrive (408)."""
        @web.middleware
        async def limit(request: web.Request, handler):
            if request.body_exists:
                try:
                    await asyncio.wait_for(request.read(), self.timeout)  # kept by aiohttp for the handler's read
                except asyncio.TimeoutError:
                    return _error(408, f"the request body did not arrive within {self.timeout:g} s")
            async with slots:
                return await handler(request)
        return limit

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dispatch(self, request: web.Request) -> web.Response:
        """http_server.cc ProcessRequest and http_rest_api_handler.cc ProcessRequest: a CORS preflight, or the
        request its path and method name; a request neither names is answered 400 "Malformed request"."""
        if request.method == "OPTIONS":
            if re.search(r"https?://", request.headers.get("Origin", "")):
                return web.Response()
            return _error(400, "Origin header is missing in CORS preflight")
        raw_path = request.rel_url.raw_path
        try:
            parsed = _parse_path(request.method, raw_path)
        except ServingError:  # returned before the handler writes its JSON: an empty body
            return web.Response(status=400, content_type="application/json")
        if parsed is None or (request.method == "POST" and parsed.verb not in ("predict", "classify", "regress")):
            return _error(400, f"Malformed request: {request.method} {raw_path}")
        started = time.perf_counter()
        try:
            if request.method == "POST" and self.timeout is not None:
                try:
                    response = await asyncio.wait_for(self._route(request, parsed), self.timeout)
                except asyncio.TimeoutError:
                    raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            else:
                response = await self._route(request, parsed)
        except ServingError as exc:
            return _error(exc.http_status, exc.message)
        if response.status == 200:  # as TF Serving's http_server.cc: the API is the URL's verb ("" for a GET)
            metrics.observe_request(parsed.name, parsed.verb if request.method == "POST" else "", "REST", started)
        return response

    async def _route(self, request: web.Request, parsed: _ParsedPath) -> web.Response:
        name, version, label = parsed.name, parsed.version, parsed.label
        if request.method == "POST":
            if parsed.verb == "predict":
                return await self.predict(request, name, version, label)
            return await self.classify_or_regress(request, parsed.verb, name, version, label)
        if not name:
            raise _invalid("Missing model name in request.")
        if parsed.verb == "metadata":  # compared as written: "/METADATA" asks for the status
            servable = self.core.manager.resolve(name, version, label)
            response = metadata_response(servable, name)
            signature_map = SignatureDefMap()
            response.metadata["signature_def"].Unpack(signature_map)
            return web.json_response({"model_spec": _json(response.model_spec),
                                      "metadata": {"signature_def": _json(signature_map)}})
        return web.json_response(_json(status_response(self.core.manager, name, version)))

    async def classify_or_regress(self, request: web.Request, method: str, name: str, version, label
                                  ) -> web.Response:
        """TF Serving's JSON: {"signature_name", "context", "examples": [{feature: value(s)}]} ->
        {"results": [[[label, score], ...], ...]} (classify) or {"results": [value, ...]} (regress)."""
        body = await _json_body(request)
        proto = (classification_pb2.ClassificationRequest() if method == "classify"
                 else regression_pb2.RegressionRequest())
        proto.model_spec.name = name
        if version is not None:
            proto.model_spec.version.value = version
        elif label is not None:
            proto.model_spec.version_label = label
        fill_examples_from_json(body, proto)
        if method == "classify":
            response = await self.inference.classify(proto, api="rest_classify")
            rows = response.result.classifications
            scores = float32_decimals(np.array([[c.score for c in row.classes] for row in rows], np.float32))
            results = [[[c.label, score] for c, score in zip(row.classes, row_scores)]
                       for row, row_scores in zip(rows, scores.tolist())]
        else:
            response = await self.inference.regress(proto, api="rest_regress")
            results = float32_decimals(np.array([r.value for r in response.result.regressions], np.float32)).tolist()
        return web.json_response({"results": results})

    async def predict(self, request: web.Request, name: str, version, label) -> web.Response:
        """http_rest_api_handler.cc ProcessPredictRequest: json_tensor.cc FillPredictRequestFromJson, in its order
        (the body, its signature name, the signature's inputs, then "instances" or "inputs"), the model run, then
        MakeJsonFromTensors."""
        body = await _json_body(request)
        signature_name = _signature_name(body)
        servable = self.core.manager.resolve(name, version, label)
        info = servable.signature(signature_name)
        if not info.inputs:
            raise _invalid(f"Failed to get input map for signature: {signature_name or 'DEFAULT'}")
        row_format = "instances" in body
        if row_format and "inputs" in body:
            raise _format_error(body, "Not formatted correctly expecting only one of 'inputs' or 'instances' keys "
                                "to exist ")
        if row_format:
            if not isinstance(body["instances"], list):
                raise _format_error(body, "Expecting 'instances' to be an list/array")
            if not body["instances"]:
                raise _format_error(body, "No values in 'instances' array")
            inputs = _instances_to_tensors(body["instances"], info.inputs)
        elif "inputs" in body:
            inputs = _inputs_to_tensors(body["inputs"], info.inputs)
        else:
            raise _invalid("Missing 'inputs' or 'instances' key")
        outputs = await self.core.run("rest_predict", servable, signature_name or "serving_default", inputs)
        if not outputs:
            raise _invalid("Cannot convert empty tensor map to JSON")
        if row_format:
            return web.json_response({"predictions": _row_format(outputs)})
        if len(outputs) == 1:
            (key, value), = outputs.items()
            return web.json_response({"outputs": _jsonable(key, value)})
        return web.json_response({"outputs": {k: _jsonable(k, v) for k, v in outputs.items()}})


def _row_format(outputs: dict[str, np.ndarray]) -> list:
    """json_tensor.cc MakeRowFormatJsonFromTensors: one prediction per row of the outputs, which must all have a
    first dimension, of one size; a value per row for one output, an object naming the outputs for more."""
    batch = None
    for name in sorted(outputs):
        shape = np.shape(outputs[name])
        if not shape:
            raise _invalid(f"Tensor name: {name} has no shape information ")
        if batch is not None and shape[0] != batch:
            raise _invalid(f"Tensor name: {name} has inconsistent batch size: {shape[0]} expecting: {batch}")
        batch = shape[0]
    columns = {name: _jsonable(name, value) for name, value in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    return [{name: columns[name][i] for name in sorted(columns)} for i in range(batch)]
