"""gRPC: mushroom.v1.Classifier, with health checking and reflection; every RPC is counted by the status it ends
with (ResponseCounter)."""
from __future__ import annotations

import asyncio
import base64
import inspect
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.exceptions import RedisError

from services.gateway import metrics
from services.gateway.classifier import DEFAULT_TOP_K, Classifier
from services.gateway.errors import GatewayError, redis_unavailable
from services.gateway.feedback_intake import take_feedback
from services.gateway.protos import load
from services.gateway.routing import Router
from services.gateway.stats import Stats
from services.gateway.upstream import state_name
from services.grpc_listen import listen
from services.grpc_requests import parsing, refuse_undecodable

pb, pb_grpc = load()
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
ANSWERED = (GatewayError, RedisError)  # answered with their status, as HTTP answers them; anything else is a bug
STREAM_CLOSING = "the gateway is shutting down: reconnect and send again the frames that were not answered"


def _gateway_error(exc: Exception) -> GatewayError:
    return exc if isinstance(exc, GatewayError) else redis_unavailable(exc)


async def _abort(context, exc: Exception) -> None:
    """Ends the call with the error's status; an error with a Retry-After carries it in gRPC's own form, the
    ``grpc-retry-pushback-ms`` trailer (gRFC A6), which a client's retry policy waits for before its next attempt."""
    error = _gateway_error(exc)
    pushback = (("grpc-retry-pushback-ms", str(int(error.retry_after * 1000))),) if error.retry_after else ()
    await context.abort(error.grpc_code, f"{error.code}: {error.message}", trailing_metadata=pushback)


def explanation_proto(explanation: dict):
    heatmap = explanation["heatmap"]
    return pb.Explanation(
        label=explanation["label"], display_name=explanation["display_name"], class_index=explanation["class_index"],
        rows=len(heatmap), cols=len(heatmap[0]) if heatmap else 0, heatmap=[v for row in heatmap for v in row],
        overlay_png=base64.b64decode(explanation["overlay_png"]), width=explanation["width"],
        height=explanation["height"])


def to_proto(answer: dict):
    response = pb.ClassifyResponse(
        predictions=[pb.Prediction(label=p["label"], display_name=p["display_name"], score=p["score"])
                     for p in answer["predictions"]],
        not_a_mushroom=answer["not_a_mushroom"], mushroom_score=answer["mushroom_score"],
        model_name=answer["model"]["name"], model_version=answer["model"]["version"], cached=answer["cached"],
        request_id=answer["request_id"], latency_ms=answer["latency_ms"], feedback_token=answer["feedback_token"])
    if "explanation" in answer:
        response.explanation.CopyFrom(explanation_proto(answer["explanation"]))
    return response


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, classifier: Classifier, router: Router, stats: Stats, photo_store=None,
                 closing: asyncio.Event | None = None):
        self.classifier = classifier
        self.router = router
        self.stats = stats
        self.photo_store = photo_store  # opt-in (photo_store.PhotoStore): photos kept so corrections become data
        self.closing = closing or asyncio.Event()  # set when the gateway stops: open streams end (ClassifyStream)

    async def _classify(self, request, context, endpoint: str):
        choice = request.WhichOneof("override")
        remaining = context.time_remaining()  # None without a deadline
        answer = await self.classifier.classify(
            request.photo, client_id=request.client_id or None, top_k=request.top_k or DEFAULT_TOP_K,
            version=request.version if choice == "version" else None,
            label=request.label if choice == "label" else None, protocol="grpc", endpoint=endpoint,
            explain=request.explain, explain_class=request.explain_class or None,
            deadline=None if remaining is None else time.monotonic() + remaining)
        if self.photo_store is not None:
            answer = await self.photo_store.keep(request.photo, answer)
        return to_proto(answer)

    async def Classify(self, request, context):
        try:
            return await self._classify(request, context, "classify")
        except ANSWERED as exc:
            await _abort(context, exc)

    async def ClassifyStream(self, request_iterator, context):
        """Each frame answered in order; a bad frame answers with ``error`` set and the stream goes on. Once the
        gateway stops (``closing``), the stream ends with UNAVAILABLE after answering the frame under way: its
        client reconnects (to another replica) and sends again the frames that got no answer, rather than hold the
        stream open until the shutdown's grace period cancels it."""
        frames, next_frame = request_iterator.__aiter__(), None
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            while True:
                next_frame = asyncio.ensure_future(frames.__anext__())
                # returns at once once closing is set, before the next frame is read
                await asyncio.wait((next_frame, closing), return_when=asyncio.FIRST_COMPLETED)
                if not next_frame.done():
                    await context.abort(grpc.StatusCode.UNAVAILABLE, STREAM_CLOSING)
                try:
                    request = next_frame.result()
                except StopAsyncIteration:
                    return
                try:
                    yield await self._classify(request, context, "classify_stream")
                except ANSWERED as exc:
                    error = _gateway_error(exc)
                    yield pb.ClassifyResponse(error=pb.Error(code=error.code, message=error.message))
        finally:  # however the stream ends (its caller may leave): no read or wait outlives it
            closing.cancel()
            if next_frame is not None:
                next_frame.cancel()

    async def Feedback(self, request, context):
        try:
            recorded = await take_feedback(self.stats, self.photo_store, self.classifier.classes_of,
                                           request.feedback_token, request.true_label, request.request_id or None)
        except ANSWERED as exc:
            await _abort(context, exc)
        response = pb.FeedbackResponse(request_id=recorded["request_id"], model_version=recorded["version"],
                                       predicted=recorded["predicted"], true_label=recorded["true_label"],
                                       correct=recorded["correct"])
        if recorded.get("photo_kept") is not None:
            response.photo_kept = recorded["photo_kept"]
        return response

    async def ListModels(self, request, context):
        try:
            states = await self.classifier.version_states()
        except ANSWERED as exc:
            await _abort(context, exc)
        table = self.router.table
        return pb.ListModelsResponse(
            model_name=self.router.model_name,
            versions=[pb.ModelVersion(version=v, state=state_name(s)) for v, s in sorted(states.items())],
            routing=[pb.RoutingArm(target=str(e), weight=table.weights[e]) for e in table.entries()],
            shadow=str(table.shadow) if table.shadow is not None else "")


def _count(code: grpc.StatusCode) -> None:
    metrics.child(metrics.RESPONSES, protocol="grpc", code=code.name).inc()


# A caller's deadline runs from when it sent the call, ours from when the call reached us: a caller leaving when its
# deadline expires may still have this much left on our clock (transit, a busy event loop).
DEADLINE_CLOCK_LAG_S = 0.25


def _ended_by(exc: BaseException, context) -> grpc.StatusCode:
    """The status an RPC whose handler raised ``exc`` ends with: a handler cancelled because its caller left ends
    DEADLINE_EXCEEDED when the deadline passed (on the caller's clock, up to DEADLINE_CLOCK_LAG_S ahead of ours),
    else CANCELLED; an abort ends with its code; any other exception UNKNOWN, as gRPC answers it."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= DEADLINE_CLOCK_LAG_S \
            else grpc.StatusCode.CANCELLED
    return context.code() or grpc.StatusCode.UNKNOWN


async def _refuse_undecodable(request, context) -> None:
    await refuse_undecodable(request, context, grpc.StatusCode.INVALID_ARGUMENT)


async def _checked_frames(frames, context):
    async for frame in frames:
        await _refuse_undecodable(frame, context)
        yield frame


def _counted(behavior, request_streaming: bool = False):
    """``behavior`` (a method handler's coroutine function or async generator function, as gRPC tells them apart),
    counting the status its RPC ends with; a request (or a stream's frame) that did not parse
    (services/grpc_requests.py) ends it with INVALID_ARGUMENT."""
    async def checked(request, context):
        if request_streaming:
            return _checked_frames(request, context)
        await _refuse_undecodable(request, context)
        return request

    if inspect.isasyncgenfunction(behavior):
        async def streamed(request, context):
            try:
                async for response in behavior(await checked(request, context), context):
                    yield response
            except BaseException as exc:
                _count(_ended_by(exc, context))
                raise
            _count(context.code() or grpc.StatusCode.OK)
        return streamed

    async def answered(request, context):
        try:
            response = await behavior(await checked(request, context), context)
        except BaseException as exc:
            _count(_ended_by(exc, context))
            raise
        _count(context.code() or grpc.StatusCode.OK)
        return response
    return answered


class ResponseCounter(grpc.aio.ServerInterceptor):
    """Each RPC of every service (Classifier, health, reflection) is one count of mushroom_gateway_responses_total
    by the status it ends with, as HTTP responses are counted by theirs."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
            _count(grpc.StatusCode.UNIMPLEMENTED)
            return None
        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary")
        return handler._replace(**{kind: _counted(getattr(handler, kind), handler.request_streaming),
                                   "request_deserializer": parsing(handler.request_deserializer)})


# A client may ping its idle connection to keep it, and the NATs on its way, alive, as often as every 10 s (grpc-java
# raises a shorter keepalive to 10 s; the gateway's own, to its model server, is 10 s): pings are taken
# CLIENT_PING_MIN_MS apart, leaving room for the timers' jitter. gRPC's defaults take a ping without calls as abuse
# and end the connection at the fourth (GOAWAY too_many_pings): the client logs an error and reconnects.
CLIENT_PING_MIN_MS = 5_000


def build_server(classifier: Classifier, router: Router, stats: Stats, host: str, port: int, photo_store=None,
                 closing: asyncio.Event | None = None) -> tuple[grpc.aio.Server, health.HealthServicer]:
    server = grpc.aio.server(interceptors=[ResponseCounter()],
                             options=[("grpc.max_receive_message_length", 32 * 1024 * 1024),
                                      ("grpc.keepalive_permit_without_calls", 1),
                                      ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_MIN_MS),
                                      # a port another process listens on is an error, as for HTTP, not shared
                                      # (gRPC binds with SO_REUSEPORT by default: the kernel split the callers)
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_ClassifierServicer_to_server(ClassifierService(classifier, router, stats, photo_store, closing),
                                             server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    listen(server, f"{host}:{port}")
    return server, health_servicer


def serving_status(ok: bool):
    return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
