"""The model server, spoken to only through the TF Serving gRPC API (so a real TF Serving works the same)."""
from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
)

from services.gateway.replicas import Partial, agreed, resolve
from training_job.explain import EXPLAIN_SIGNATURE, PREDICTED_CLASS  # constants: importing them starts no TensorFlow

log = logging.getLogger("gateway.upstream")
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE  # TF Serving's own table of version states
PREDICT_OUTPUTS = ("probabilities", "classes", "mushroom_score", "not_a_mushroom")  # [N, C], [N, C], [N], [N]
EXPLAIN_OUTPUTS = (*PREDICT_OUTPUTS, "explained_class", "heatmap")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def state_name(state: int) -> str:
    """TF Serving's name of a version state (AVAILABLE, ...); the number as text for a state it does not name."""
    try:
        return get_model_status_pb2.ModelVersionStatus.State.Name(state)
    except ValueError:
        return str(state)


class UpstreamUnavailable(Exception):
    """The model server cannot answer now (down, overloaded, deadline): a 503 with Retry-After."""


class UpstreamRejected(Exception):
    """The model server refused the request (unknown version or label, bad input): a 4xx."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class SignatureNotServed(UpstreamRejected):
    """The version is loaded but does not serve the signature asked for: TF Serving under --prefer_tflite_model
    serves only what a version's model.tflite holds, and the explain signatures (gradients) never are."""

    def __init__(self, code: grpc.StatusCode, message: str, signature: str):
        super().__init__(code, message)
        self.signature = signature


class ContractBroken(Exception):
    """A version answered, but not as the registry contract says (DEVELOPERS.md): an output the gateway reads is
    missing, or not of one row per photo. The version cannot be used by the gateway, however well it is served."""


class ExplainServerBehind(UpstreamUnavailable):
    """The explain model server (--explain-model-server) has not loaded the version the model server answers with:
    it loads new versions on its own config or registry poll, so it can trail the model server by one poll. The
    version is not gone (the model server has it), so the request is not re-routed: a 503 with Retry-After."""


@dataclass
class Prediction:
    version: int
    probabilities: np.ndarray  # float32 (C,)
    classes: list[str]
    mushroom_score: float
    not_a_mushroom: bool

    @property
    def finite(self) -> bool:
        """False when the model answered NaN or an infinity (a numerical fault): nothing to answer a client with."""
        return bool(np.isfinite(self.probabilities).all()) and math.isfinite(self.mushroom_score)


@dataclass
class Explanation:
    prediction: Prediction
    explained_class: int  # the column of ``prediction.classes`` the heatmap is for
    heatmap: np.ndarray  # float32 (h, w) in [0, 1]: Grad-CAM on the last convolutional block


def fill_pixels_tensor(tensor: tensor_pb2.TensorProto, pixels: np.ndarray) -> None:
    """Writes uint8 pixels (N, H, W, 3) into ``tensor`` in place (a request's input map entry), without
    tf.make_tensor_proto's per-call overhead: one copy of the pixels, where building a TensorProto and CopyFrom-ing
    it into the request made two."""
    tensor.dtype = types_pb2.DT_UINT8
    for d in pixels.shape:
        tensor.tensor_shape.dim.add(size=d)
    tensor.tensor_content = np.ascontiguousarray(pixels, np.uint8).tobytes()


# DataType -> (the typed TensorProto field TF Serving's Predict fills by default, its numpy dtype)
_TYPED_FIELDS = {types_pb2.DT_FLOAT: ("float_val", np.float32), types_pb2.DT_BOOL: ("bool_val", np.bool_),
                 types_pb2.DT_DOUBLE: ("double_val", np.float64), types_pb2.DT_INT32: ("int_val", np.int32),
                 types_pb2.DT_INT64: ("int64_val", np.int64)}
_FROMITER_BELOW = 64  # np.fromiter beats np.array on a short repeated field, np.array on a long one


def _array(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    """An output tensor as numpy, from whichever form the server wrote: TF Serving's typed fields (float_val,
    bool_val, string_val, ...) or raw tensor_content (--enable_serialization_as_tensor_content)."""
    shape = [d.size for d in tensor.tensor_shape.dim]
    if tensor.dtype == types_pb2.DT_STRING:
        return np.array([s.decode() for s in tensor.string_val], dtype=object).reshape(shape)
    field, dtype = _TYPED_FIELDS.get(tensor.dtype, ("float_val", np.float32))
    values = getattr(tensor, field)
    count = len(values)
    if count == 0:
        return np.frombuffer(tensor.tensor_content, dtype).reshape(shape)
    if count < _FROMITER_BELOW:
        return np.fromiter(values, dtype, count).reshape(shape)
    return np.array(values, dtype).reshape(shape)


# While calls are under way, a connection that has received nothing for KEEPALIVE_MS is pinged, and any ping (gRPC's
# flow control pings too) left unanswered for KEEPALIVE_TIMEOUT_MS closes it: the calls on it fail UNAVAILABLE and
# are retried on a new connection. A peer gone without a reset (a pod replaced behind its Service, a NAT or load
# balancer that dropped the flow) otherwise leaves every call waiting for its deadline for as long as TCP keeps the
# connection: minutes, or forever through a proxy that still holds it. Idle connections are not pinged: TF
# Serving's gRPC (the C++ defaults) takes pings without calls as abuse and closes the connection (GOAWAY
# too_many_pings).
KEEPALIVE_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000


def _channel(target: str) -> grpc.aio.Channel:
    """A channel to every address ``target`` resolves to, calls spread over them in turn (round_robin): behind a
    headless Kubernetes Service (``dns:///<service>:8500``, one address per model server pod) or a static
    ``ipv4:a:p,b:p`` list each replica takes its share, where gRPC's default (pick_first) would send everything to
    one. A replica that fails is left out until it connects again; one address works as before."""
    return grpc.aio.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # a keepalive ping waits behind an unanswered flow control ping, which gRPC gives a minute; and gRPC sends no
        # ping at all after two unanswered ones
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS), ("grpc.http2.max_pings_without_data", 0),
    ])


class ModelServerClient:
    """One model's calls to the model server at ``target``. ``explain_target``: another model server serving the
    same registry without --prefer_tflite_model, which answers the explain signatures (the TFLite engine of a real
    TF Serving has none); None = ``target`` answers them too."""

    def __init__(self, target: str, model_name: str, timeout: float = 10.0, retries: int = 2,
                 explain_target: str | None = None):
        self.target = target
        self.explain_target = explain_target or target
        self.model_name = model_name
        self.timeout = timeout
        self.retries = retries
        # target -> (channel, PredictionServiceStub, ModelServiceStub), made once (a stub makes a callable for
        # each of its service's methods); a replica's address is a target too, asked for its version states
        self._stubs_by_target: dict[str, tuple] = {}
        self.partial: dict[int, Partial] = {}  # versions AVAILABLE on some replicas only (``version_states``)
        self._addresses: list[str] = []  # the replica addresses the target last resolved to

    def _stubs(self, target: str | None = None):
        target = target or self.target
        if target not in self._stubs_by_target:
            channel = _channel(target)
            self._stubs_by_target[target] = (channel, prediction_service_pb2_grpc.PredictionServiceStub(channel),
                                             model_service_pb2_grpc.ModelServiceStub(channel))
        return self._stubs_by_target[target][1:]

    async def close(self) -> None:
        for channel, _, _ in self._stubs_by_target.values():
            await channel.close()

    async def _call(self, method, request, timeout: float | None = None, target: str | None = None,
                    retries: int | None = None):
        target = target or self.target
        retries = self.retries if retries is None else retries
        delay = 0.05
        for attempt in range(retries + 1):
            try:
                return await method(request, timeout=timeout or self.timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < retries:
                    await asyncio.sleep(delay)
                    delay *= 4
                    continue
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED):
                    raise UpstreamUnavailable(f"model server {target}: {code.name}: {exc.details()}") from None
                details = exc.details() or code.name
                signature = getattr(request, "model_spec", None) and request.model_spec.signature_name
                # TF Serving's Predict: FAILED_PRECONDITION 'Serving signature key "x" not found.'; its REST API and
                # ours: INVALID_ARGUMENT 'Serving signature name: "x" not found in signature def'
                if signature and f'"{signature}" not found' in details:
                    raise SignatureNotServed(code, f"model server {target}: {details}", signature) from None
                raise UpstreamRejected(code, details) from None

    def _spec(self, spec, version: int | None, label: str | None) -> None:
        """Fills a request's ``model_spec``: this model, the version, else the version label, else the latest."""
        spec.name = self.model_name
        if version is not None:
            spec.version.value = version
        elif label:
            spec.version_label = label

    def _request(self, signature: str, pixels: np.ndarray, version: int | None, label: str | None):
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, version, label)
        request.model_spec.signature_name = signature
        fill_pixels_tensor(request.inputs["images"], pixels)
        return request

    @staticmethod
    def _predictions(response, rows: int, wanted=PREDICT_OUTPUTS) -> tuple[list[Prediction], dict[str, np.ndarray]]:
        """The Prediction of each of ``rows`` photos, and the outputs; ContractBroken when an output of ``wanted`` is
        missing or does not hold a row per photo (probabilities and classes a column per class)."""
        outputs = {k: _array(v) for k, v in response.outputs.items()}
        served = response.model_spec.version.value
        signature = response.model_spec.signature_name or "serving_default"
        missing = [k for k in wanted if k not in outputs]
        if missing:
            raise ContractBroken(f"version {served}'s {signature} answers without {', '.join(missing)} (it gives "
                                 f"{', '.join(sorted(outputs)) or 'nothing'}); the gateway reads "
                                 f"{', '.join(wanted)}")
        columns = outputs["probabilities"].shape[1:2]  # (C,): one per class
        odd = [f"{k} {list(outputs[k].shape)}" for k in wanted if outputs[k].shape[:1] != (rows,)
               or (k in ("probabilities", "classes") and (outputs[k].ndim != 2 or outputs[k].shape[1:] != columns))]
        if odd:
            raise ContractBroken(f"version {served}'s {signature} answers {rows} photos with {', '.join(odd)}; the "
                                 "gateway reads probabilities and classes [photos, classes], the others [photos]")
        return [Prediction(served, outputs["probabilities"][i], list(outputs["classes"][i]),
                           float(outputs["mushroom_score"][i]), bool(outputs["not_a_mushroom"][i]))
                for i in range(rows)], outputs

    async def predict(self, pixels: np.ndarray, version: int | None = None, label: str | None = None,
                      timeout: float | None = None) -> list[Prediction]:
        """``timeout`` overrides the client's deadline."""
        predict_stub, _ = self._stubs()
        response = await self._call(predict_stub.Predict, self._request("serving_default", pixels, version, label),
                                    timeout)
        return self._predictions(response, len(pixels))[0]

    async def explain(self, pixels: np.ndarray, version: int | None = None, label: str | None = None,
                      class_index: int | None = None) -> list[Explanation]:
        """The ``explain`` signature (Grad-CAM, training_job/explain.py) for ``class_index``, or for the predicted
        class when None. ``class_index`` is always sent (-1 = predicted) rather than left to the SignatureDef's
        default, so servers that do not fill in defaults answer the same."""
        predict_stub, _ = self._stubs(self.explain_target)
        request = self._request(EXPLAIN_SIGNATURE, pixels, version, label)
        request.output_filter.extend(EXPLAIN_OUTPUTS)  # not the upsampled uint8 map: the gateway draws its own
        request.inputs["class_index"].dtype = types_pb2.DT_INT32
        request.inputs["class_index"].tensor_shape.dim.add(size=1)
        request.inputs["class_index"].int_val.append(PREDICTED_CLASS if class_index is None else class_index)
        try:
            response = await self._call(predict_stub.Predict, request, target=self.explain_target)
        except UpstreamRejected as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND or self.explain_target == self.target:
                raise
            wanted = f"version {version}" if version is not None else f"the version labelled {label!r}" if label \
                else "the latest version"
            raise ExplainServerBehind(f"the explain model server {self.explain_target} has not loaded {wanted} of "
                                      f"{self.model_name} yet (the model server {self.target} has): {exc}") from None
        predictions, outputs = self._predictions(response, len(pixels), EXPLAIN_OUTPUTS)
        return [Explanation(p, int(outputs["explained_class"][i]), outputs["heatmap"][i])
                for i, p in enumerate(predictions)]

    async def _metadata(self, version: int | None, label: str | None, timeout: float | None = None):
        """GetModelMetadata (signature_def) of a version, of the one a version label points at (TF Serving answers
        with the labelled version in ``model_spec.version``), or of the latest when neither is given."""
        predict_stub, _ = self._stubs()
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec, version, label)
        request.metadata_field.append("signature_def")
        return await self._call(predict_stub.GetModelMetadata, request, timeout)

    async def version_for_label(self, label: str) -> int:
        """The version a version label points at now. Raises UpstreamRejected for a label the server does not know
        (INVALID_ARGUMENT, or NOT_FOUND), UpstreamUnavailable when the server is down."""
        return (await self._metadata(None, label)).model_spec.version.value

    async def input_size(self, version: int | None = None, label: str | None = None,
                         timeout: float | None = None) -> tuple[int, int | None]:
        """(the version, the side S of its ``serving_default`` input ``images`` uint8 [batch, S, S, 3]): of
        ``version``, of the one ``label`` points at, or of the latest. S is None when the signature leaves it open
        (-1) or the version has no such input. ``timeout`` overrides the client's deadline."""
        response = await self._metadata(version, label, timeout)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        images = signatures.signature_def["serving_default"].inputs.get("images")
        dims = [d.size for d in images.tensor_shape.dim] if images is not None else []
        square = len(dims) == 4 and dims[1] == dims[2] and dims[1] > 0
        return response.model_spec.version.value, dims[1] if square else None

    async def version_states(self, timeout: float | None = None) -> dict[int, int]:
        """{version: state} as GetModelStatus reports it, asked of every replica the target names and merged as
        replicas.agreed does (``self.partial``: the versions AVAILABLE on some replicas only); {} when the model is
        unknown. ``timeout`` overrides the client's deadline (health checks use a short one, so a hung server is seen
        within it). UpstreamUnavailable when no replica answers."""
        try:
            addresses = self._addresses = await asyncio.wait_for(resolve(self.target), timeout or self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:  # DNS down or slow: the replicas last resolved, else the
            log.debug("model server target %s not resolved: %r", self.target, exc)  # channel, which says why
            addresses = self._addresses
        if len(addresses) <= 1:
            self.partial = {}
            return await self._states_of(self.target, timeout)
        answers = await asyncio.gather(*(self._states_of(address, timeout, retries=0) for address in addresses),
                                       return_exceptions=True)
        await self._close_replicas_gone(addresses)
        for failed in (answer for answer in answers if not isinstance(answer, (dict, UpstreamUnavailable))):
            raise failed  # a bug
        answered = [answer for answer in answers if isinstance(answer, dict)]
        if not answered:
            raise answers[0]
        merged, partial = agreed(answered)
        if partial != self.partial:
            log.info("versions AVAILABLE on some model server replicas only, not routed to until on all: %s",
                     {v: f"{p.available_on} of {p.serving}" for v, p in partial.items()} or "none")
        self.partial = partial
        return merged

    async def _states_of(self, target: str, timeout: float | None, retries: int | None = None) -> dict[int, int]:
        """{version: state} of the model on the server(s) at ``target``; {} when it does not know the model."""
        _, model_stub = self._stubs(target)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        try:
            response = await self._call(model_stub.GetModelStatus, request, timeout, target, retries)
        except UpstreamRejected:
            return {}
        return {s.version: s.state for s in response.model_version_status}

    async def _close_replicas_gone(self, addresses: list[str]) -> None:
        """Closes the channels of replica addresses the target no longer names."""
        for target in set(self._stubs_by_target) - {*addresses, self.target, self.explain_target}:
            channel, _, _ = self._stubs_by_target.pop(target)
            await channel.close()
