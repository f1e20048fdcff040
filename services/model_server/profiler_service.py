"""TensorFlow's profiler service (``tensorflow.ProfilerService``) on the model server's gRPC port, as TF Serving offers
it (``--enable_profiler``, on by default): ``tf.profiler.experimental.client.trace(<grpc address>, logdir, ...)`` and
TensorBoard's "capture profile" record what the server's TensorFlow runs for a while.

``Profile`` follows TSL's ProfilerServiceImpl (``xla/tsl/profiler/rpc/profiler_service_impl.cc``): a profiler session
for ``opts.duration_ms`` (ended early by ``Terminate`` of the same session id, or by the client cancelling), then the
collected XSpace either in the answer (``emit_xspace``) or written to
``<repository_root>/<session_id>/<host_name>.xplane.pb``, with ``empty_trace`` when no event was recorded.
``Monitor`` answers UNIMPLEMENTED, as there. TensorFlow's Python package ships no stubs for this service, so the few
fields used are declared here (numbers and types as in ``tsl/profiler/protobuf/profiler_service.proto``; the nested
ProfileOptions and XSpace travel as their serialized bytes, which is the same on the wire).
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

log = logging.getLogger("model_server.profiler")
SERVICE = "tensorflow.ProfilerService"
_FIELDS = {  # message -> [(field, number, type)], a subset of tsl/profiler/protobuf/profiler_service.proto
    "ProfileRequest": [("duration_ms", 1, "uint64"), ("opts", 4, "bytes"), ("repository_root", 5, "string"),
                       ("session_id", 6, "string"), ("host_name", 7, "string"), ("emit_xspace", 9, "bool")],
    "ProfileResponse": [("empty_trace", 7, "bool"), ("xspace", 8, "bytes")],
    "TerminateRequest": [("session_id", 1, "string")],
    "TerminateResponse": [],
}
_TYPES = {"uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
          "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
          "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
          "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL}


def _message_classes() -> dict[str, type]:
    """The messages above, in a descriptor pool of their own (nothing is added to protobuf's default pool)."""
    file = descriptor_pb2.FileDescriptorProto(name="mushroom_serving/profiler_service_subset.proto",
                                              package="tensorflow", syntax="proto3")
    for name, fields in _FIELDS.items():
        message = file.message_type.add(name=name)
        for field, number, kind in fields:
            message.field.add(name=field, number=number, type=_TYPES[kind],
                              label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.{name}"))
            for name in _FIELDS}


def _xspace_class() -> type:
    """XSpace (xplane.proto) with its string fields read as bytes: TensorFlow's C++ profiler writes names that are
    not always UTF-8, which protobuf's Python parser refuses in string fields."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    file = descriptor_pb2.FileDescriptorProto()
    xplane_pb2.DESCRIPTOR.CopyToProto(file)
    stack = list(file.message_type)
    while stack:
        message = stack.pop()
        stack.extend(message.nested_type)
        for field in message.field:
            if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{file.package}.XSpace"))


def has_events(xspace: bytes, xspace_class: type) -> bool:
    """Whether a serialized XSpace holds any event (TSL's IsEmpty, negated)."""
    space = xspace_class.FromString(xspace)
    return any(line.events for plane in space.planes for line in plane.lines)


class ProfilerService:
    """One profiling session at a time per process (TensorFlow's rule); a second one answers INTERNAL."""

    def __init__(self):
        self.messages = _message_classes()
        self._xspace = _xspace_class()
        self._stopped: set[str] = set()

    def handler(self) -> grpc.GenericRpcHandler:
        request, response = self.messages["ProfileRequest"], self.messages["ProfileResponse"]
        terminate, terminated = self.messages["TerminateRequest"], self.messages["TerminateResponse"]
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Profile": grpc.unary_unary_rpc_method_handler(
                self.profile, request.FromString, response.SerializeToString),
            "Terminate": grpc.unary_unary_rpc_method_handler(
                self.terminate, terminate.FromString, terminated.SerializeToString),
            "Monitor": grpc.unary_unary_rpc_method_handler(self.monitor),
        })

    async def profile(self, request, context):
        from tensorflow.python.profiler.internal import _pywrap_profiler
        from tensorflow.tsl.profiler.protobuf import profiler_options_pb2

        options = profiler_options_pb2.ProfileOptions.FromString(request.opts)
        duration_ms = options.duration_ms or request.duration_ms
        session = _pywrap_profiler.ProfilerSession()
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory(prefix="profile-") as scratch:
            try:
                await loop.run_in_executor(None, session.start, scratch, {
                    "host_tracer_level": options.host_tracer_level or 2,
                    "python_tracer_level": options.python_tracer_level,
                    "device_tracer_level": options.device_tracer_level or 1})
            except Exception as exc:  # noqa: BLE001 - e.g. another session is active: TSL answers INTERNAL
                await context.abort(grpc.StatusCode.INTERNAL, str(exc).strip() or type(exc).__name__)
            deadline = loop.time() + duration_ms / 1000
            try:
                while loop.time() < deadline and request.session_id not in self._stopped:
                    await asyncio.sleep(min(0.01, max(0.0, deadline - loop.time())))
            finally:
                self._stopped.discard(request.session_id)
                # TensorFlow's own export (<scratch>/plugins/profile/<run>/<host>.xplane.pb) stops the session and
                # writes the XSpace TensorBoard reads; the bytes stop() returns do not parse as one in this build.
                await loop.run_in_executor(None, session.export_to_tb)
            written = sorted(Path(scratch).rglob("*.xplane.pb"))
            xspace = written[0].read_bytes() if written else b""
        answer = self.messages["ProfileResponse"](empty_trace=not xspace or not has_events(xspace, self._xspace))
        if request.emit_xspace:
            answer.xspace = xspace
        else:
            folder = Path(request.repository_root) / request.session_id
            await loop.run_in_executor(None, _save, folder / f"{request.host_name}.xplane.pb", xspace)
        log.info("profiled %d ms for session %s (%s)", duration_ms, request.session_id,
                 "no events" if answer.empty_trace else "events recorded")
        return answer

    async def terminate(self, request, context):
        self._stopped.add(request.session_id)
        return self.messages["TerminateResponse"]()

    async def monitor(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "unimplemented.")


def _save(path: Path, data: bytes) -> None:
    os.makedirs(path.parent, exist_ok=True)
    path.write_bytes(data)
