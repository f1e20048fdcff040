"""TF Serving's JSON and tensors (json_tensor.cc): a predict body's JSON into input tensors, with TF Serving's rules
and messages, and output tensors into the answer's JSON; with rapidjson's debug strings that those messages quote.

Without TensorFlow (numpy only), so that json_worker.py's worker process stays small: dtypes are TensorFlow's
DataTypeString names ("float", "uint8", "string"; ``dtype_name``, in servable.py, gives a tf.DType's).
"""
from __future__ import annotations

import base64
import decimal
import gc
import json

import grpc
import numpy as np

from services.model_server.errors import DEFAULT_SIGNATURE, LargeJson, ServingError, invalid, signature_not_found


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


def format_error(doc, *text: str) -> ServingError:
    """json_tensor.cc FormatError."""
    return invalid(f"JSON Value: {json_debug_string(doc)} " + "".join(text))


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


def decode_base64_object(value) -> bytes:
    """json_tensor.cc JsonDecodeBase64Object."""
    if not _is_base64_object(value):
        raise format_error(value, "not formatted correctly for base64 data")
    decoded = _base64_unescape(value["b64"])
    if decoded is None:
        raise invalid("Unable to base64 decode")
    return decoded


def _type_error(value, dtype: str) -> ServingError:
    """json_tensor.cc TypeError."""
    return invalid(f"JSON Value: {json_debug_string(value)} Type: {_json_type(value)} is not of expected type: "
                    f"{dtype}")


# json_tensor.cc AddValueToTensor: the JSON values each dtype takes (rapidjson's IsNumber, IsBool, IsString, and
# IsInt, IsInt64, IsUint, IsUint64 as ranges; Python's json gives an int for a literal without '.' or exponent, a
# float otherwise). The integer types under 32 bits take any int32 and narrow it as TensorProto's int_val is
# narrowed (tensor.cc), so 300 sent to a uint8 input is 44, as in TF Serving.
_INT32_RANGE = (-2**31, 2**31 - 1)
_INT_RANGES = {"int32": _INT32_RANGE, "int16": _INT32_RANGE, "int8": _INT32_RANGE, "uint8": _INT32_RANGE,
               "int64": (-2**63, 2**63 - 1), "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1)}
_TAKES_TYPES = {"float": {int, float}, "double": {int, float}, "bool": {bool}, "string": {str}}
_NUMPY_TYPES = {"float": np.float32, "double": np.float64, "bool": np.bool_, "int32": np.int32, "int16": np.int16,
                "int8": np.int8, "uint8": np.uint8, "int64": np.int64, "uint32": np.uint32, "uint64": np.uint64}


def _leaf(value, dtype: str):
    """One JSON value that is not a list, checked as json_tensor.cc FillTensorProto and AddValueToTensor check it."""
    if isinstance(value, dict):
        if dtype == "string":
            return decode_base64_object(value)
        raise _type_error(value, dtype)
    if dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        takes = type(value) is int and low <= value <= high
    elif dtype in _TAKES_TYPES:
        takes = type(value) in _TAKES_TYPES[dtype]
    else:
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                           f"Conversion of JSON Value: {json_debug_string(value)} to type: {dtype}")
    if not takes:
        raise _type_error(value, dtype)
    return value.encode("utf-8", "surrogatepass") if dtype == "string" else value


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


class SlowValues:
    """How many more JSON values (lists included) a parse may convert one by one, in Python, before it raises
    LargeJson: what a ragged nest, a string tensor or a value of the wrong type costs. None: any number."""

    def __init__(self, limit: int | None = None):
        self.left = float("inf") if limit is None else limit

    def spend(self, values: int) -> None:
        self.left -= values
        if self.left < 0:
            raise LargeJson("more values to convert one by one than a parse in place takes")


def _fill_leaves(value, level: int, shape: list[int], dtype, out: list, slow: SlowValues) -> None:
    """json_tensor.cc FillTensorProto, value by value: every list at a level has that level's size, every other
    value sits at the last level."""
    slow.spend(1)
    if not isinstance(value, list):
        if level != len(shape):
            raise invalid(f"JSON Value: {json_debug_string(value)} found at incorrect level: {level + 1} in the "
                           f"JSON DOM. Expected at level: {len(shape)}")
        out.append(_leaf(value, dtype))
        return
    if level >= len(shape):
        raise invalid(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(value) != shape[level]:
        raise invalid(f"Encountered list at unexpected size: {len(value)} at level: {level} expected size: "
                       f"{shape[level]}")
    for item in value:
        _fill_leaves(item, level + 1, shape, dtype, out, slow)


def _as_dtype(values, shape, dtype: str) -> np.ndarray:
    if dtype == "string":
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    numpy_type = np.dtype(_NUMPY_TYPES[dtype])
    if dtype in _INT_RANGES and numpy_type.itemsize < 8:  # narrowed as tensor.cc narrows int_val
        return np.array(values, dtype=np.int64).astype(numpy_type).reshape(shape)
    return np.array(values, dtype=numpy_type).reshape(shape)


def _regular_nest(nest: np.ndarray, dtype: str) -> np.ndarray | None:
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
    if dtype == "string" or not kinds <= _TAKES_TYPES.get(dtype, set()):
        return None
    return flat.astype(_NUMPY_TYPES[dtype]).reshape(nest.shape)


def tensor_from_json(value, dtype: str, slow: SlowValues | None = None) -> np.ndarray:
    """A JSON value (a list nested to any depth, or one value) as a tensor of ``dtype``, taken or refused with TF
    Serving's rules and messages (json_tensor.cc GetDenseTensorShape + FillTensorProto). The common case, a
    regular nest of values of the right JSON types, is checked by numpy; anything else goes value by value, which
    finds the first problem in TF Serving's order, each value spent from ``slow``."""
    slow = slow or SlowValues()
    shape = _dense_shape(value)
    if len(shape) > MAX_RANK:
        raise invalid(f"JSON Value nests lists {len(shape)} deep: a tensor has at most {MAX_RANK} dimensions here")
    try:
        nest = np.array(value, dtype=object)
    except ValueError:  # lists of different lengths
        nest = None
    if nest is not None and nest.shape == tuple(shape):
        tensor = _regular_nest(nest, dtype)
        if tensor is not None:
            return tensor
        flat = nest.ravel()
        slow.spend(flat.size)
        if not any(isinstance(v, list) for v in flat):  # the first value refused, in TF Serving's (row-major) order
            return _as_dtype([_leaf(v, dtype) for v in flat], shape, dtype)
    leaves: list = []
    _fill_leaves(value, 0, shape, dtype, leaves, slow)
    return _as_dtype(leaves, shape, dtype)


def _shape_string(shape) -> str:
    """json_tensor.cc ShapeToString."""
    return "[" + ",".join(map(str, shape)) + "]"


def _instances_to_tensors(instances: list, inputs: dict[str, str], slow: SlowValues) -> dict[str, np.ndarray]:
    """json_tensor.cc FillTensorMapFromInstancesList: the row format. Each instance is an object naming every input
    of the signature (those with a default value too), or, for a one-input signature, that input's value; the
    instances of an input must agree in size and shape, and are stacked."""
    if not isinstance(instances[0], dict) and len(inputs) > 1:
        raise invalid("instances is a plain list, but expecting list of objects as multiple input tensors required "
                       "as per tensorinfo_map")

    def is_object(value) -> bool:
        return isinstance(value, dict) and not _is_base64_object(value)

    objects = is_object(instances[0])
    columns: dict[str, list[np.ndarray]] = {}

    def add(index: int, name: str, item, where: str) -> None:
        try:
            if name not in inputs:
                raise invalid(f"JSON object: does not have named input: {name}")
            tensor = tensor_from_json(item, inputs[name], slow)
            if columns.get(name):
                first = columns[name][0]
                if first.size != tensor.size:
                    raise invalid(f"Expecting tensor size: {first.size} but got: {tensor.size}")
                if first.shape != tensor.shape:
                    raise invalid(f"Expecting shape {_shape_string(first.shape)} but got: "
                                   f"{_shape_string(tensor.shape)}")
            columns.setdefault(name, []).append(tensor)
        except ServingError as exc:
            raise invalid(f"Failed to process element: {index}{where} of 'instances' list. Error: "
                           f"{exc.code.name}: {exc.message}") from None

    for index, instance in enumerate(instances):
        if objects:
            if not is_object(instance):
                raise invalid(f"Expecting object but got list at item {index} of input list")
            for name, item in instance.items():
                add(index, name, item, f" key: {name}")
            if set(instance) != set(inputs):
                raise invalid(f"Failed to process element: {index} of 'instances' list. JSON object: "
                               f"{json_debug_string(instance)} keys must be equal to: {','.join(sorted(inputs))}")
        else:
            if is_object(instance):
                raise invalid(f"Expecting value/list but got object at item {index} of input list")
            add(index, next(iter(inputs)), instance, "")
    return {name: np.stack(tensors) for name, tensors in columns.items()}


def _inputs_to_tensors(value, inputs: dict[str, str], slow: SlowValues) -> dict[str, np.ndarray]:
    """json_tensor.cc FillTensorMapFromInputsMap: the columnar format. An object names every input of the signature
    (those with a default value too; other keys are not looked at), or, for a one-input signature, the value is
    that input's."""
    if not isinstance(value, dict) or _is_base64_object(value):
        if len(inputs) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple input tensors required "
                           "as per tensorinfo_map")
        (name, dtype), = inputs.items()
        return {name: tensor_from_json(value, dtype, slow)}
    tensors = {}
    for name in sorted(inputs):
        if name not in value:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        tensors[name] = tensor_from_json(value[name], inputs[name], slow)
    return tensors


def signature_name_of(body: dict) -> str:
    """json_tensor.cc FillSignature: "signature_name", when present, is a string."""
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid(f"JSON Value: {json_debug_string(body)} not formatted correctly. 'signature_name' key must be "
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


def _loads(raw: bytes):
    """json.loads with the cyclic garbage collector paused. Parsing makes containers (each counts towards the next
    collection) but never a cycle, and in the model server, which holds TensorFlow's objects, the collections a large
    body would set off cost several times the parse."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return json.loads(raw)
    finally:
        if collecting:
            gc.enable()


def json_body(raw: bytes) -> dict:
    """json_tensor.cc ParseJson: the body is one JSON object."""
    if not raw:
        raise invalid("JSON Parse error: The document is empty")
    try:
        body = _loads(raw)
    # JSONDecodeError, UnicodeDecodeError, an integer of more digits than Python converts (a plain ValueError);
    # RecursionError: nested too deeply
    except (ValueError, RecursionError) as exc:
        raise invalid(f"JSON Parse error: {exc}") from None
    if not isinstance(body, dict):
        raise format_error(body, "Is not object")
    return body


def check_rows(body: dict, key: str, max_rows: int | None) -> None:
    """LargeJson when ``body[key]`` (a request's rows: "instances", "examples") is a list of more than ``max_rows``
    (None: any number)."""
    if max_rows is not None and isinstance(body.get(key), list) and len(body[key]) > max_rows:
        raise LargeJson(f"{len(body[key])} {key}")


# ------------------------------------------------------------------------------------------ predict
def predict_request_from_json(raw: bytes, signatures: dict[str, dict[str, str]] | None,
                              unresolved: ServingError | None, max_rows: int | None = None,
                              max_slow_values: int | None = None) -> tuple[str, bool, dict[str, np.ndarray]]:
    """json_tensor.cc FillPredictRequestFromJson, in its order: the body, its signature name, the signature's inputs
    (``signatures``: each signature's inputs, by TensorFlow's dtype names, of the version the path names; None when
    it names none, for the reason ``unresolved``), then "instances" or "inputs". Returns (signature name, row
    format, the input tensors). Runs where json_worker.py puts it: arguments, result and errors pickle; LargeJson
    for more "instances" than ``max_rows``, or more values to convert one by one than ``max_slow_values``
    (``SlowValues``)."""
    body = json_body(raw)
    check_rows(body, "instances", max_rows)
    signature_name = signature_name_of(body)
    if signatures is None:
        raise unresolved
    inputs = signatures.get(signature_name or DEFAULT_SIGNATURE)
    if inputs is None:
        raise signature_not_found(signature_name)
    if not inputs:
        raise invalid(f"Failed to get input map for signature: {signature_name or 'DEFAULT'}")
    row_format, slow = "instances" in body, SlowValues(max_slow_values)
    if row_format and "inputs" in body:
        raise format_error(body, "Not formatted correctly expecting only one of 'inputs' or 'instances' keys "
                            "to exist ")
    if row_format:
        if not isinstance(body["instances"], list):
            raise format_error(body, "Expecting 'instances' to be an list/array")
        if not body["instances"]:
            raise format_error(body, "No values in 'instances' array")
        return signature_name, True, _instances_to_tensors(body["instances"], inputs, slow)
    if "inputs" in body:
        return signature_name, False, _inputs_to_tensors(body["inputs"], inputs, slow)
    raise invalid("Missing 'inputs' or 'instances' key")


JSON_BYTES_PER_VALUE = 12  # about what a float32 takes printed in an answer, with its separator


def predict_answer_json(outputs: dict[str, np.ndarray], row_format: bool) -> bytes:
    """json_tensor.cc MakeJsonFromTensors: {"predictions": ...} in the row format, {"outputs": ...} in the columnar
    one (one output's value, or an object naming them). Runs where json_worker.py puts it."""
    if row_format:
        answer = {"predictions": _row_format(outputs)}
    elif len(outputs) == 1:
        (key, value), = outputs.items()
        answer = {"outputs": _jsonable(key, value)}
    else:
        answer = {"outputs": {k: _jsonable(k, v) for k, v in outputs.items()}}
    return json.dumps(answer).encode()


def _row_format(outputs: dict[str, np.ndarray]) -> list:
    """json_tensor.cc MakeRowFormatJsonFromTensors: one prediction per row of the outputs, which must all have a
    first dimension, of one size; a value per row for one output, an object naming the outputs for more."""
    batch = None
    for name in sorted(outputs):
        shape = np.shape(outputs[name])
        if not shape:
            raise invalid(f"Tensor name: {name} has no shape information ")
        if batch is not None and shape[0] != batch:
            raise invalid(f"Tensor name: {name} has inconsistent batch size: {shape[0]} expecting: {batch}")
        batch = shape[0]
    columns = {name: _jsonable(name, value) for name, value in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    return [{name: columns[name][i] for name in sorted(columns)} for i in range(batch)]
