"""REST: TF Serving's `/v1/models/...` endpoints with its JSON shapes (row `instances` and columnar `inputs`)."""
from __future__ import annotations

import base64
import json
import re

import grpc
import numpy as np
import tensorflow as tf
from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST
from tensorflow_serving.apis.get_model_metadata_pb2 import SignatureDefMap

from services.model_server import metrics
from services.model_server.core import PredictionCore
from services.model_server.errors import ServingError
from services.model_server.grpc_api import metadata_response, status_response

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


def _jsonable(name: str, array: np.ndarray):
    if array.dtype == object or array.dtype.kind in "SU":
        flat = [_string_out(name, v) for v in array.reshape(-1)]
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
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


class RestApi:
    def __init__(self, core: PredictionCore, monitoring_path: str | None):
        self.core = core
        self.monitoring_path = monitoring_path

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        if self.monitoring_path:
            app.router.add_get(self.monitoring_path, self.metrics)
        app.router.add_route("*", "/v1/models/{tail:.*}", self.dispatch)
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dispatch(self, request: web.Request) -> web.Response:
        m = _PATH.match(request.path)
        if not m:
            return _error(404, f"Malformed request: {request.method} {request.path}")
        name, label, suffix = m["name"], m["label"], m["suffix"] or ""
        version = int(m["version"]) if m["version"] else None
        try:
            if request.method == "GET" and suffix == "":
                return web.json_response(_json(status_response(self.core.manager, name, version, label)))
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
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"{suffix[1:]} needs a {suffix[1:]} signature (method_name "
                                   f"tensorflow/serving/{suffix[1:]}); this model exposes predict signatures only")
            return _error(405 if suffix in ("", "/metadata", ":predict") else 404,
                          f"Malformed request: {request.method} {request.path}")
        except ServingError as exc:
            return _error(exc.http_status, exc.message)

    async def predict(self, request: web.Request, name: str, version, label) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"JSON Parse error: {exc}") from None
        if not isinstance(body, dict):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "JSON Value: not an object")
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
