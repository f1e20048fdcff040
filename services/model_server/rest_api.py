"""REST: TF Serving's `/v1/models/...` endpoints with its JSON shapes (row `instances` and columnar `inputs`)."""
from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from collections.abc import Callable

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import classification_pb2, regression_pb2
from tensorflow_serving.apis.get_model_metadata_pb2 import SignatureDefMap

from services.http_bodies import BodyRefused, read_body
from services.http_stop import close_connections_when
from services.model_server import metrics
from services.model_server.core import PredictionCore
from services.model_server.errors import DEFAULT_SIGNATURE, ServingError, invalid
from services.model_server.grpc_api import metadata_response, status_response
from services.model_server.inference import Inference
from services.model_server.json_tensor import (
    JSON_BYTES_PER_VALUE, SlowValues, check_rows, decode_base64_object, float32_decimals, format_error, json_body,
    predict_answer_json, predict_request_from_json, signature_name_of,
)
from services.model_server.json_worker import IN_PLACE_LIMITS, JsonWorker
from services.model_server.servable import dtype_name

log = logging.getLogger("model_server.rest")

# http_rest_api_util.h / .cc: every path matching the handler's regex goes to it; POST paths are parsed with the
# prediction regex, GET paths with the status regex, all case-insensitively (so the captured verb or subresource
# keeps the case it was written in). Matched against the path as sent, before percent-decoding.
MAX_BODY_BYTES = 256 * 1024 * 1024  # a request body, once decoded from its Content-Encoding (413 past it)
BODY = web.RequestKey("decoded_body", bytes)  # the request's decoded body, kept on the request by _body
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


async def _body(request: web.Request) -> bytes:
    """The request's body decoded from its Content-Encoding (http_bodies.read_body, at most MAX_BODY_BYTES once
    decoded), read once and kept on the request."""
    if BODY not in request:
        request[BODY] = await read_body(request, MAX_BODY_BYTES)
    return request[BODY]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


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
        feature.bytes_list.value.append(decode_base64_object(value))
    else:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Feature: {name} has element with unexpected JSON "
                           f"type: {type(value).__name__}")


def _example_from_json(value, example: example_pb2.Example, slow: SlowValues) -> None:
    """One tf.Example from its JSON object, each feature value (spent from ``slow``) added one by one."""
    if not isinstance(value, dict):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"Example must be JSON object but got JSON {type(value).__name__}")
    for name, content in value.items():
        feature = example.features.feature[name]
        items = content if isinstance(content, list) else [content]
        slow.spend(len(items) + 1)
        for item in items:
            _add_feature_value(item, name, feature)


def examples_request_from_json(raw: bytes, method: str, max_rows: int | None = None,
                               max_slow_values: int | None = None):
    """The ClassificationRequest (``method`` "classify") or RegressionRequest a classify or regress body makes,
    model_spec left for the path to fill. Runs where json_worker.py puts it; LargeJson for more "examples" than
    ``max_rows``, or more features and feature values than ``max_slow_values``."""
    request = classification_pb2.ClassificationRequest() if method == "classify" \
        else regression_pb2.RegressionRequest()
    body = json_body(raw)
    check_rows(body, "examples", max_rows)
    fill_examples_from_json(body, request, SlowValues(max_slow_values))
    return request


def fill_examples_from_json(body: dict, request, slow: SlowValues) -> None:
    """TF Serving's FillClassifyRegressRequestFromJson."""
    request.model_spec.signature_name = signature_name_of(body)
    has_context = "context" in body
    if has_context:
        _example_from_json(body["context"], request.input.example_list_with_context.context, slow)
    if "examples" not in body:
        raise format_error(body, "When method is classify, key 'examples' is expected and was not found")
    examples = body["examples"]
    if not isinstance(examples, list):
        raise format_error(body, "Expecting 'examples' value to be an list/array")
    if not examples:
        raise format_error(body, "'examples' value is an empty array")
    target = request.input.example_list_with_context if has_context else request.input.example_list
    for value in examples:
        _example_from_json(value, target.examples.add(), slow)


DEFAULT_TIMEOUT_MS = 30_000  # --rest_api_timeout_in_ms, as TF Serving's
CORS_HEADERS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, GET",
                "Access-Control-Allow-Headers": "Content-Type"}  # http_rest_api_util.cc AddCORSHeaders


class RestApi:
    """TF Serving's REST API. ``timeout_ms`` bounds a predict/classify/regress call (--rest_api_timeout_in_ms: 504
    when exceeded, as TF Serving's session-run deadline); ``max_concurrent`` requests are processed at once, the
    rest wait their turn (--rest_api_num_threads: TF Serving's HTTP worker threads); ``cors`` adds TF Serving's
    CORS headers to every answer (--rest_api_enable_cors_support). A connection must bring each request's headers
    within ``idle_seconds`` (the REST timeout, or its default when that is 0) of its start or of the previous
    answer, and is closed when it does not (the runner's keepalive_timeout): a client that connects and sends
    nothing, or whose network died, holds no socket for longer."""

    def __init__(self, core: PredictionCore, inference: Inference, monitoring_path: str | None,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS, max_concurrent: int = 0, cors: bool = False,
                 closing: Callable[[], bool] = lambda: False):
        self.closing = closing  # () -> True once the server is stopping: answers close their connections
        self.core = core
        self.inference = inference
        self.monitoring_path = monitoring_path
        self.timeout = timeout_ms / 1000 if timeout_ms > 0 else None
        self.idle_seconds = self.timeout or DEFAULT_TIMEOUT_MS / 1000
        self.max_concurrent = max_concurrent
        self.cors = cors
        self.json_worker = JsonWorker()  # where large JSON is parsed and printed

    def app(self) -> web.Application:
        middlewares = ([self._cors] if self.cors else []) + [self._errors_as_json]
        if self.max_concurrent > 0:
            middlewares.append(self._limit_concurrency(asyncio.Semaphore(self.max_concurrent)))
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
        app.on_response_prepare.append(close_connections_when(self.closing))
        app.on_cleanup.append(self._close)
        if self.monitoring_path:
            app.router.add_get(self.monitoring_path, self.metrics)
        app.router.add_route("*", "/{path:" + _HANDLER_PATH + "}", self.dispatch)
        return app

    async def _close(self, app: web.Application) -> None:
        self.json_worker.close()

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
        except BodyRefused as exc:  # over MAX_BODY_BYTES once decoded, an encoding not accepted, or undecodable
            answer = _error(exc.status, str(exc))
            answer.headers.update(exc.headers)
            return answer
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
                    await asyncio.wait_for(_body(request), self.timeout)  # kept for the handler
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
            raise invalid("Missing model name in request.")
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
        raw = await _body(request)
        proto = await self.json_worker.run(examples_request_from_json, self.json_worker.parse_bytes(raw), raw, method,
                                           in_place=IN_PLACE_LIMITS)
        proto.model_spec.name = name
        if version is not None:
            proto.model_spec.version.value = version
        elif label is not None:
            proto.model_spec.version_label = label
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
        raw = await _body(request)
        try:
            servable, unresolved = self.core.manager.resolve(name, version, label), None
        except ServingError as exc:  # said once the body is known to parse, as TF Serving says it
            servable, unresolved = None, exc
        signatures = None if servable is None else {  # each signature's inputs, as json_tensor.py names dtypes
            name: {alias: dtype_name(dtype) for alias, dtype in info.inputs.items()}
            for name, info in servable.signatures.items()}
        signature_name, row_format, inputs = await self.json_worker.run(
            predict_request_from_json, self.json_worker.parse_bytes(raw), raw, signatures, unresolved,
            in_place=IN_PLACE_LIMITS)
        outputs = await self.core.run("rest_predict", servable, signature_name or DEFAULT_SIGNATURE, inputs)
        if not outputs:
            raise invalid("Cannot convert empty tensor map to JSON")
        printed_bytes = JSON_BYTES_PER_VALUE * sum(np.size(value) for value in outputs.values())
        answer = await self.json_worker.run(predict_answer_json, printed_bytes, outputs, row_format)
        return web.Response(body=answer, content_type="application/json")
