"""The gateway's error promise (DEVELOPERS.md "Gateway HTTP API"): bad input gets a 4xx
``{"error": {"code", "message"}}`` (gRPC: the matching status), never a 500, and while Redis is frozen feedback is
503 ``redis_unavailable`` on HTTP and UNAVAILABLE on gRPC. Header values that are not UTF-8, JSON bodies that parse
only partly, bodies whose Content-Encoding or multipart headers are broken, 405 answers (with their Allow header).
One real redis-server, model server and gateway on free loopback ports for the module."""
from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import signal
import time
import zlib

import brotli

import grpc
import numpy as np
import pytest
from PIL import Image
from redis.exceptions import TimeoutError as RedisTimeoutError

from bench.common import cpu_seconds, jpeg_scan_bomb, zeros_gzipped
from services.gateway.errors import GatewayError
from services.gateway.grpc_api import ClassifierService
from services.gateway.protos import load
from services.status_details import MAX_STATUS_DETAILS
from tests.gateway_harness import GatewayProcess, gateway_stack
from tests.model_server_harness import MODEL, wait_until
from training_job.tiny_model import LABELS, publish_tiny_versions

pb, pb_grpc = load()
TOKEN = "input-errors-admin-token"
NOT_UTF8 = "caf\xe9"  # sent as the one byte 0xE9 (http.client writes header values as Latin-1)


def jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    publish_tiny_versions(registry, MODEL)
    with gateway_stack(registry, (1, 2), lambda server, redis: GatewayProcess(
            server, redis, env={"GATEWAY_ADMIN_TOKEN": TOKEN})) as parts:
        yield {"redis": parts.redis, "gateway": parts.gateway}


@pytest.fixture(scope="module")
def gateway(stack) -> GatewayProcess:
    return stack["gateway"]


@pytest.fixture(scope="module")
def stub(gateway):
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        yield pb_grpc.ClassifierStub(channel)


@pytest.fixture()
def ab_table(gateway):
    """A 50/50 table for the duration of a test, so that the client id is hashed; cleared afterwards."""
    status, body, _ = gateway.request("PUT", "/v1/admin/routing", {"weights": {"1": 50, "2": 50}}, token=TOKEN)
    assert status == 200, body
    yield
    assert gateway.request("PUT", "/v1/admin/routing", {"clear": True}, token=TOKEN)[0] == 200


def assert_error(reply, status: int, code: str) -> None:
    assert reply.status == status and isinstance(reply.body, dict), reply
    assert reply.body["error"]["code"] == code, reply
    assert reply.body["error"]["message"], reply


# ---------------------------------------------------------------------------------- header values that are not UTF-8
def test_a_version_label_that_is_not_utf8_is_a_400(gateway):
    reply = gateway.request("POST", "/v1/classify", jpeg((10, 20, 30)), "image/jpeg", {"X-Version-Label": NOT_UTF8})
    assert_error(reply, 400, "bad_label")


def test_a_client_id_that_is_not_utf8_is_a_400(gateway, ab_table):
    assert gateway.classify(jpeg((10, 20, 31)), client="cafe").status == 200
    assert_error(gateway.classify(jpeg((10, 20, 31)), client=NOT_UTF8), 400, "bad_client_id")


@pytest.mark.parametrize("field, value, code", [("label", "caf\udce9", "bad_label"), ("label", "\ud800", "bad_label"),
                                                ("client_id", "\udce9", "bad_client_id")])
def test_json_options_that_are_not_unicode_text_are_a_400(gateway, ab_table, field, value, code):
    body = json.dumps({"image_b64": base64.b64encode(jpeg((10, 20, 32))).decode(), field: value}).encode()
    assert_error(gateway.request("POST", "/v1/classify", body, "application/json"), 400, code)


@pytest.mark.parametrize("method, path", [("GET", "/v1/admin/routing"), ("PUT", "/v1/admin/routing"),
                                          ("GET", "/v1/admin/audit")])
def test_a_bearer_token_that_is_not_utf8_is_a_401_as_a_wrong_one(gateway, method, path):
    body = {"weights": {"1": 100}}
    assert_error(gateway.request(method, path, body, token="wrong"), 401, "unauthorised")
    assert_error(gateway.request(method, path, body, token=NOT_UTF8), 401, "unauthorised")


def test_an_operator_note_that_is_not_utf8_is_kept_escaped(gateway):
    reply = gateway.request("PUT", "/v1/admin/routing", {"clear": True}, token=TOKEN,
                            headers={"X-Operator": NOT_UTF8})
    assert reply.status == 200, reply
    assert gateway.request("GET", "/v1/admin/audit", token=TOKEN).status == 200


@pytest.mark.parametrize("token", ["v1.abc.d\u00e9f", "v1.\ud800.x"])
def test_a_feedback_token_that_is_not_ascii_is_malformed(gateway, stub, token):
    reply = gateway.request("POST", "/v1/feedback", {"feedback_token": token, "true_label": "x"})
    assert_error(reply, 400, "feedback_token_malformed")
    if "\ud800" in token:
        return  # a protobuf string is UTF-8: a lone surrogate cannot be sent over gRPC
    with pytest.raises(grpc.RpcError) as caught:
        stub.Feedback(pb.FeedbackRequest(feedback_token=token, true_label="x"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith("feedback_token_malformed: ")


@pytest.mark.parametrize("true_label", ["Boletus edulis", "chanterelle", ""])
def test_feedback_whose_label_is_no_class_of_the_version_is_refused(gateway, stub, true_label):
    """Recorded, a typo would count as a wrong answer in the version's feedback accuracy (the rollout's verdict)."""
    answer = stub.Classify(pb.ClassifyRequest(photo=jpeg((90, 60, len(true_label)))), timeout=20)
    code = "unknown_class" if true_label else "bad_feedback"
    reply = gateway.request("POST", "/v1/feedback", {"feedback_token": answer.feedback_token, "true_label": true_label})
    assert_error(reply, 400, code)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Feedback(pb.FeedbackRequest(feedback_token=answer.feedback_token, true_label=true_label), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith(f"{code}: ")
    if true_label:
        assert ", ".join(LABELS) in reply.body["error"]["message"]
    recorded = stub.Feedback(pb.FeedbackRequest(feedback_token=answer.feedback_token, true_label=LABELS[1]),
                             timeout=10)  # nothing was recorded by the refusals
    assert recorded.true_label == LABELS[1] and recorded.model_version == answer.model_version


# ---------------------------------------------------------------------------------- Redis frozen: gRPC as HTTP
def test_grpc_feedback_is_unavailable_as_http_feedback_is_503_while_redis_is_frozen(stack, gateway, stub):
    tokens = [stub.Classify(pb.ClassifyRequest(photo=jpeg((40, 50, c))), timeout=20).feedback_token for c in (1, 2)]
    # one feedback first, so Redis holds the feedback script: the calls sent while it is frozen then run when it thaws
    warm = stub.Classify(pb.ClassifyRequest(photo=jpeg((40, 50, 4))), timeout=20).feedback_token
    assert stub.Feedback(pb.FeedbackRequest(feedback_token=warm, true_label=LABELS[0]), timeout=10).request_id
    redis = stack["redis"].process
    os.kill(redis.pid, signal.SIGSTOP)
    try:
        http = gateway.request("POST", "/v1/feedback", {"feedback_token": tokens[0], "true_label": LABELS[0]})
        with pytest.raises(grpc.RpcError) as caught:
            stub.Feedback(pb.FeedbackRequest(feedback_token=tokens[1], true_label=LABELS[0]), timeout=10)
        # the calls that need no Redis still answer (classify serves uncached)
        assert stub.Classify(pb.ClassifyRequest(photo=jpeg((40, 50, 3))), timeout=20).predictions
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10).versions
    finally:
        os.kill(redis.pid, signal.SIGCONT)
    assert_error(http, 503, "redis_unavailable")
    assert int(http.headers["Retry-After"]) >= 1
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert caught.value.details().startswith("redis_unavailable: Redis (routing, audit and feedback state) is "
                                             "unavailable: ")
    # the writes answered 503 reached Redis when it thawed: the retries are answered as recorded
    wait_until(lambda: gateway.request("POST", "/v1/feedback", {"feedback_token": tokens[0], "true_label": LABELS[0]})
               .status == 200, timeout=15, what="feedback recorded after Redis thawed")
    assert stub.Feedback(pb.FeedbackRequest(feedback_token=tokens[1], true_label=LABELS[0]), timeout=10).request_id


class _Aborted(Exception):
    pass


class _Context:
    """What grpc.aio's ServicerContext.abort does: raise, after noting the status; a call without a deadline."""

    def time_remaining(self):
        return None

    async def abort(self, code, details="", trailing_metadata=()):
        self.code, self.details, self.trailers = code, details, dict(trailing_metadata)
        raise _Aborted()


class _RedisDownClassifier:
    async def classify(self, *args, **kwargs):
        raise RedisTimeoutError("Timeout reading from 127.0.0.1:1")

    async def version_states(self):
        raise RedisTimeoutError("Timeout reading from 127.0.0.1:1")


def test_every_grpc_method_answers_a_redis_failure_as_unavailable():
    """A unit test of grpc_api alone: Redis errors reaching any method are UNAVAILABLE (a stream's frame: its
    ``error``), as GatewayErrors are answered, not UNKNOWN."""
    service = ClassifierService(_RedisDownClassifier(), router=None, stats=None)

    async def scenario():
        answers = {}
        for name, call in (("Classify", lambda c: service.Classify(pb.ClassifyRequest(photo=b"x"), c)),
                           ("ListModels", lambda c: service.ListModels(pb.ListModelsRequest(), c))):
            context = _Context()
            with pytest.raises(_Aborted):
                await call(context)
            answers[name] = (context.code, context.details, context.trailers)

        async def frames():
            yield pb.ClassifyRequest(photo=b"x")
            yield pb.ClassifyRequest(photo=b"y")

        answers["ClassifyStream"] = [(r.error.code, r.error.message)
                                     async for r in service.ClassifyStream(frames(), _Context())]
        return answers

    answers = asyncio.run(scenario())
    for name in ("Classify", "ListModels"):
        code, details, trailers = answers[name]
        assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("redis_unavailable: "), (name, details)
        assert trailers == {"grpc-retry-pushback-ms": "2000"}  # Retry-After: 2, as gRPC retry policies read it
    assert [code for code, _ in answers["ClassifyStream"]] == ["redis_unavailable"] * 2
    assert GatewayError(503, "x", "y").grpc_code == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------------- JSON bodies, on every route
JSON_ROUTES = [("POST", "/v1/classify"), ("POST", "/v1/feedback"), ("PUT", "/v1/admin/routing")]
BAD_JSON = {"not JSON": b"{nope", "not UTF-8": b'{"a": "caf\xe9"}',
            "50,000 nested arrays": b"[" * 50_000 + b"]" * 50_000,
            "an integer of 5,000 digits": b'{"feedback_token": "x", "true_label": "y", "n": ' + b"1" * 5000 + b"}"}


@pytest.mark.parametrize("what", BAD_JSON)
@pytest.mark.parametrize("method, path", JSON_ROUTES)
def test_json_a_route_cannot_parse_is_a_400_on_every_route(gateway, method, path, what):
    reply = gateway.request(method, path, BAD_JSON[what], "application/json", token=TOKEN)
    assert_error(reply, 400, "bad_json")


def test_a_routing_weight_of_400_digits_is_a_400(gateway):
    reply = gateway.request("PUT", "/v1/admin/routing", b'{"weights": {"1": 1' + b"0" * 400 + b"}}",
                            "application/json", token=TOKEN)
    assert_error(reply, 400, "bad_routing")
    assert "between 0 and 1000000" in reply.body["error"]["message"] and len(reply.body["error"]["message"]) < 300


# ---------------------------------------------------------------------------------- body encodings and multipart
def multipart(part: bytes) -> tuple[bytes, str]:
    return b"--XYZ\r\n" + part + b"\r\n--XYZ--\r\n", "multipart/form-data; boundary=XYZ"


def test_a_multipart_part_header_line_without_a_colon_is_a_400(gateway):
    body, content_type = multipart(b'Content-Disposition: form-data; name="photo"\r\n\r\n' + jpeg((60, 1, 1)))
    assert gateway.request("POST", "/v1/classify", body, content_type).status == 200
    body, content_type = multipart(b"this header line has no colon\r\n\r\nabc")
    assert_error(gateway.request("POST", "/v1/classify", body, content_type), 400, "bad_multipart")


def test_a_form_of_more_parts_than_a_photo_upload_has_is_a_400_before_they_are_read(gateway):
    """aiohttp reads a multipart body's parts on the event loop, tens of microseconds each: 200,000 empty parts
    before the photo (1.8 MB, or a few KB gzipped) held every client of the gateway for 10 s."""
    field = b'Content-Disposition: form-data; name="note"\r\n\r\nx\r\n--XYZ\r\n'
    photo = b'Content-Disposition: form-data; name="photo"\r\n\r\n' + jpeg((60, 2, 1))
    body, content_type = multipart(field * 10_000 + photo)
    before = cpu_seconds(gateway.process.pid)
    assert_error(gateway.request("POST", "/v1/classify", body, content_type), 400, "too_many_parts")
    assert cpu_seconds(gateway.process.pid) - before < 0.2  # the parts past the limit were never parsed
    body, content_type = multipart(field * 20 + photo)  # a form's own fields before its photo
    assert gateway.request("POST", "/v1/classify", body, content_type).status == 200


@pytest.mark.parametrize("padding", ["[" + "0," * 500_000 + "0]", "{" + ",".join(f'"{i:x}": 0' for i in range(300_000)) + "}"])
def test_a_json_classify_body_of_more_values_than_its_fields_is_a_400_before_it_is_parsed(gateway, padding):
    """json.loads runs on the event loop: a 28 MB body of two million keys (a few hundred KB gzipped) took 1.4 s
    of it, every client of the gateway waiting. A classify body holds image_b64 and at most six options."""
    photo = base64.b64encode(jpeg((60, 3, 1))).decode()
    body = f'{{"image_b64": "{photo}", "note": {padding}}}'.encode()
    before = cpu_seconds(gateway.process.pid)
    assert_error(gateway.request("POST", "/v1/classify", body, "application/json"), 400, "too_many_json_values")
    assert cpu_seconds(gateway.process.pid) - before < 0.2  # refused without being parsed
    with_options = {"image_b64": f"data:image/jpeg;base64,{photo}", "client_id": "user:1,2", "top_k": 2}
    assert gateway.request("POST", "/v1/classify", json.dumps(with_options).encode(), "application/json").status == 200


ENCODED = [("POST", "/v1/classify", jpeg((70, 1, 1)), "image/jpeg"),
           ("POST", "/v1/classify", *multipart(b'Content-Disposition: form-data; name="photo"\r\n\r\n'
                                               + jpeg((70, 1, 2)))),
           ("POST", "/v1/feedback", b'{"feedback_token": "x", "true_label": "y"}', "application/json"),
           ("PUT", "/v1/admin/routing", b'{"weights": {"1": 100}}', "application/json")]


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
@pytest.mark.parametrize("method, path, body, content_type", ENCODED, ids=["raw", "multipart", "feedback", "routing"])
def test_a_body_not_encoded_as_its_content_encoding_says_is_a_400(gateway, method, path, body, content_type,
                                                                   encoding):
    reply = gateway.request(method, path, body, content_type, {"Content-Encoding": encoding}, token=TOKEN)
    assert_error(reply, 400, "bad_encoding")


def test_a_body_really_gzipped_is_read(gateway):
    reply = gateway.request("POST", "/v1/classify", gzip.compress(jpeg((80, 1, 1))), "image/jpeg",
                            {"Content-Encoding": "gzip"})
    assert reply.status == 200, reply


def raw_deflate(data: bytes) -> bytes:
    encoder = zlib.compressobj(wbits=-15)
    return encoder.compress(data) + encoder.flush()


@pytest.mark.parametrize("encoding, encode", [
    ("deflate", zlib.compress), ("deflate", raw_deflate), ("br", brotli.compress), ("x-gzip", gzip.compress),
    ("gzip", lambda data: gzip.compress(data[:100]) + gzip.compress(data[100:]))],  # two members, as `cat` makes
    ids=["deflate", "raw-deflate", "br", "x-gzip", "gzip-members"])
def test_a_body_compressed_any_accepted_way_is_read_as_sent_plain(gateway, encoding, encode):
    photo = jpeg((80, 2, 1))
    plain = gateway.request("POST", "/v1/classify", photo, "image/jpeg")
    reply = gateway.request("POST", "/v1/classify", encode(photo), "image/jpeg", {"Content-Encoding": encoding})
    assert reply.status == 200 and reply.body["predictions"] == plain.body["predictions"], reply


@pytest.mark.parametrize("side", [64, 600])
def test_a_multipart_body_sent_gzipped_is_read(gateway, side):
    """The larger photo (a few hundred KB) is more than the stream the decoded body is read from holds before it
    asks the connection to pause: aiohttp's parser asserted, a 500 for any such upload."""
    noise = Image.fromarray(np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8))
    out = io.BytesIO()
    noise.save(out, "JPEG", quality=95)
    body, content_type = multipart(b'Content-Disposition: form-data; name="photo"\r\n\r\n' + out.getvalue())
    reply = gateway.request("POST", "/v1/classify", gzip.compress(body), content_type, {"Content-Encoding": "gzip"})
    assert reply.status == 200, reply


@pytest.mark.parametrize("encoding", ["zstd", "compress", "gzip, br"])
def test_a_content_encoding_not_accepted_is_a_415_naming_the_accepted_ones(gateway, encoding):
    reply = gateway.request("POST", "/v1/classify", jpeg((80, 4, 1)), "image/jpeg", {"Content-Encoding": encoding})
    assert_error(reply, 415, "unsupported_encoding")
    assert reply.headers["Accept-Encoding"] == "gzip, deflate, br"


def test_a_compression_bomb_is_decoded_no_further_than_the_limit(gateway):
    """4 GiB of zeros sent as 4 MB of gzip. aiohttp decoded a body on the event loop, and went on decoding what was
    left of a refused one to keep the connection: about 3 s of CPU for this one, every other client waiting."""
    bomb = zeros_gzipped(4096)
    before = cpu_seconds(gateway.process.pid)
    assert_error(gateway.request("POST", "/v1/classify", bomb, "image/jpeg", {"Content-Encoding": "gzip"}), 413,
                 "too_large")
    time.sleep(2)  # aiohttp reads the rest of a refused body for up to 10 s after the answer ("lingering")
    assert cpu_seconds(gateway.process.pid) - before < 1.0


# ---------------------------------------------------------------------------------- a progressive JPEG's scans
@pytest.mark.parametrize("side, scans", [(1000, 2000), (3000, 20000)])
def test_a_jpeg_of_more_scans_than_any_encoder_writes_is_a_400_not_minutes_of_decoding(gateway, stub, side, scans):
    """Every scan has the decoder pass over the picture's coefficients again and may be thirty bytes
    (bench.common.jpeg_scan_bomb). The smaller photo (30 KB) was decoded on the event loop, every other client
    waiting; the larger (513 KB, seconds of CPU) in the preprocessing pool, and two such requests held all of it."""
    bomb = jpeg_scan_bomb(side, scans)
    assert_error(gateway.request("POST", "/v1/classify", bomb, "image/jpeg"), 400, "too_many_scans")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(pb.ClassifyRequest(photo=bomb), timeout=20)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith("too_many_scans: ")


def test_a_photo_in_a_format_phones_and_browsers_do_not_send_is_a_415(gateway, stub):
    """Pillow opens dozens of formats, each with a header reader and a decoder of its own (a TIFF of 5,000 tags in
    60 KB took 80 ms to open, on the event loop). A service takes what phones and browsers send."""
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(out, "TIFF")
    reply = gateway.request("POST", "/v1/classify", out.getvalue(), "image/tiff")
    assert_error(reply, 415, "unsupported_format")
    assert "JPEG, PNG, WEBP" in reply.body["error"]["message"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(pb.ClassifyRequest(photo=out.getvalue()), timeout=20)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith("unsupported_format: ")



def test_an_error_quoting_a_long_request_field_reaches_a_grpc_client_cut_short(gateway, stub):
    """A refusal quotes what the request said: a version label of 100,000 characters made status details a gRPC
    client refuses to receive (beyond its metadata limit: it saw RESOURCE_EXHAUSTED instead of NOT_FOUND)."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(pb.ClassifyRequest(photo=jpeg((10, 20, 32)), label="x" * 100_000), timeout=20)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()[:200]
    assert caught.value.details().startswith("unknown_label: unknown version label 'xxx")
    assert len(caught.value.details()) <= MAX_STATUS_DETAILS + len("unknown_label: ")

# ---------------------------------------------------------------------------------- 405 keeps its Allow header
@pytest.mark.parametrize("method, path, allowed", [("GET", "/v1/classify", {"POST"}),
                                                   ("DELETE", "/v1/admin/routing", {"GET", "PUT"}),
                                                   ("PUT", "/v1/feedback", {"POST"})])
def test_a_405_answers_json_and_keeps_its_allow_header(gateway, method, path, allowed):
    reply = gateway.request(method, path)
    assert_error(reply, 405, "method_not_allowed")
    assert reply.headers.get("Content-Type", "").startswith("application/json"), reply.headers
    assert allowed <= set(reply.headers.get("Allow", "").replace(" ", "").split(",")), reply.headers
