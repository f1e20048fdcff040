"""REST: TF Serving's `/v1/models/...` endpoints with its JSON shapes (row `instances` and columnar `inputs`)."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import time

import grpc
import numpy as np
import tensorflow as tf
from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import classification_pb2, regression_pb2
from tensorflow_serving.apis.get_model_metadata_pb2 import SignatureDefMap

from services.model_server import metrics
from services.model_server.core import PredictionCore
from services.model_server.errors import ServingError
from services.model_server.grpc_api import metadata_response, status_response
from services.model_server.inference import Inference

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?P<suffix>/metadata|:predict|:classify|:regress)?$")


def _json(message) -> dict:
    """A proto as TF Serving's REST API prints it (http_rest_api_util.cc ToJsonString): field names as in the
    .proto, and fields holding their default value printed too (always_print_fields_with_no_presence)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _decode_value(value):
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (ValueError, TypeError):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "invalid base64 in {\"b64\": ...}") from None
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "only {\"b64\": ...} objects are allowed as values")
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    return value


def _to_array(value, dtype) -> np.ndarray:
    value = _decode_value(value)
    try:
        if dtype == tf.string:
            return np.array(value, dtype=object)
        return np.array(value, dtype=dtype.as_numpy_dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot convert input to {dtype.name}: {exc}") from None


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
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"JSON Parse error: {exc}") from None
    if not isinstance(body, dict):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "JSON Value: not an object")
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
        feature.bytes_list.value.append(_decode_value(value))
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
    signature_name = body.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "'signature_name' key must be a string value.")
    request.model_spec.signature_name = signature_name
    has_context = "context" in body
    if has_context:
        _example_from_json(body["context"], request.input.example_list_with_context.context)
    if "examples" not in body:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "When method is classify, key 'examples' is "
                           "expected and was not found")
    examples = body["examples"]
    if not isinstance(examples, list):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Expecting 'examples' value to be an list/array")
    if not examples:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "'examples' value is an empty array")
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
                 timeout_ms: int = 30_000, max_concurrent: int = 0, cors: bool = False):
        self.core = core
        self.inference = inference
        self.monitoring_path = monitoring_path
        self.timeout = timeout_ms / 1000 if timeout_ms > 0 else None
        self.max_concurrent = max_concurrent
        self.cors = cors

    def app(self) -> web.Application:
        middlewares = [self._cors] if self.cors else []
        if self.max_concurrent > 0:
            middlewares.append(self._limit_concurrency(asyncio.Semaphore(self.max_concurrent)))
        app = web.Application(client_max_size=256 * 1024 * 1024, middlewares=middlewares)
        if self.monitoring_path:
            app.router.add_get(self.monitoring_path, self.metrics)
        app.router.add_route("*", "/v1/models/{tail:.*}", self.dispatch)
        return app

    @web.middleware
    async def _cors(self, request: web.Request, handler):
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        response.headers.update(CORS_HEADERS)
        return response

    @staticmethod
    def _limit_concurrency(slots: asyncio.Semaphore):
        @web.middleware
        async def limit(request: web.Request, handler):
            async with slots:
                return await handler(request)
        return limit

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dispatch(self, request: web.Request) -> web.Response:
        m = _PATH.match(request.path)
        if not m:
            return _error(404, f"Malformed request: {request.method} {request.path}")
        name, label, suffix = m["name"], m["label"], m["suffix"] or ""
        version = int(m["version"]) if m["version"] else None
        if request.method == "OPTIONS":  # a CORS preflight, answered as TF Serving's http_server.cc does
            if re.search(r"https?://", request.headers.get("Origin", "")):
                return web.Response()
            return _error(400, "Origin header is missing in CORS preflight")
        started = time.perf_counter()
        try:
            if request.method == "POST" and self.timeout is not None:
                try:
                    response = await asyncio.wait_for(self._route(request, name, version, label, suffix),
                                                      self.timeout)
                except asyncio.TimeoutError:
                    raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            else:
                response = await self._route(request, name, version, label, suffix)
        except ServingError as exc:
            return _error(exc.http_status, exc.message)
        if response.status == 200:  # as TF Serving's http_server.cc: the API is the URL's verb ("" for a GET)
            metrics.observe_request(name, suffix[1:] if suffix.startswith(":") else "", "REST", started)
        return response

    async def _route(self, request: web.Request, name: str, version, label, suffix: str) -> web.Response:
        if request.method == "GET" and suffix == "":
            return web.json_response(_json(status_response(self.core.manager, name, version)))
        if request.method == "GET" and suffix == "/metadata":
            servable = self.core.manager.resolve(name, version, label)
            response = metadata_response(servable, name)
            signature_map = SignatureDefMap()
            response.metadata["signature_def"].Unpack(signature_map)
            return web.json_response({"model_spec": _json(response.model_spec),
                                      "metadata": {"signature_def": _json(signature_map)}})
        if request.method == "POST" and suffix == ":predict":
            return await self.predict(request, name, version, label)
        if request.method == "POST" and suffix in (":classify", ":regress"):
            return await self.classify_or_regress(request, suffix[1:], name, version, label)
        return _error(405 if suffix in ("", "/metadata", ":predict") else 404,
                      f"Malformed request: {request.method} {request.path}")

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
        body = await _json_body(request)
        if ("instances" in body) == ("inputs" in body):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               'JSON Value: must have exactly one of "instances" (row format) or "inputs" (columnar)')
        signature_name = body.get("signature_name") or "serving_default"
        servable = self.core.manager.resolve(name, version, label)
        info = servable.signature(signature_name)
        row_format = "instances" in body
        if row_format:
            inputs = self._rows_to_columns(body["instances"], info)
        else:
            raw = body["inputs"]
            if not isinstance(raw, dict):
                if len(info.inputs) != 1:
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"signature has {len(info.inputs)} inputs: name them in \"inputs\"")
                raw = {next(iter(info.inputs)): raw}
            inputs = {k: _to_array(v, info.inputs[k]) if k in info.inputs else np.array(v) for k, v in raw.items()}
        _, outputs = await self.core.predict("rest_predict", name, servable.version, None, signature_name, inputs)
        if row_format:
            keys = sorted(outputs)
            if len(keys) == 1:
                predictions = _jsonable(keys[0], outputs[keys[0]])
            else:
                columns = {k: _jsonable(k, v) for k, v in outputs.items()}
                rows = len(next(iter(columns.values())))
                predictions = [{k: columns[k][i] for k in keys} for i in range(rows)]
            return web.json_response({"predictions": predictions})
        if len(outputs) == 1:
            (key, value), = outputs.items()
            return web.json_response({"outputs": _jsonable(key, value)})
        return web.json_response({"outputs": {k: _jsonable(k, v) for k, v in outputs.items()}})

    @staticmethod
    def _rows_to_columns(instances, info) -> dict[str, np.ndarray]:
        if not isinstance(instances, list) or not instances:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, '"instances" must be a non-empty list')
        named = all(isinstance(row, dict) and not (set(row) == {"b64"}) for row in instances)
        if named:
            names = set(instances[0])
            if any(set(row) != names for row in instances):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "every instance must have the same named inputs")
            unknown = names - set(info.inputs)
            if unknown:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown inputs {sorted(unknown)}; signature "
                                   f"takes {sorted(info.inputs)}")
            return {k: _to_array([row[k] for row in instances], info.inputs[k]) for k in names}
        if len(info.inputs) != 1:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"signature has {len(info.inputs)} inputs: each instance must be an object naming them")
        (only,) = info.inputs
        return {only: _to_array(instances, info.inputs[only])}
