"""A ~20 s headless locust smoke (loadtests/) against a real local stack: HTTP and gRPC users, bad inputs that must be
rejected with a 4xx / INVALID_ARGUMENT, and the operator shifting A/B weights; it must end with 0 unexpected failures.
The operator's moves on tables of version numbers, version labels and both, and its locust user run against a
gateway whose table holds labels of the model server's config, which it puts back. Runs of a few seconds against
that gateway or a port that never answers: a run that made no request, or none of a user class, fails and says why;
rows say whether the cache answered; phone-size photos are 12 MP JPEGs the gateway answers."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager, nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from loadtests.run import final_rows, gateway_problem, main, run_locust, summary, total
from loadtests.phone_photos import PHONE_PHOTOS, phone_photos
from loadtests.traffic import Traffic, describe_mix, settable, shifted_routing
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from devstack.grpc_client import ClassifierClient
from devstack.launch import stop_stack
from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from tests.support import MUSHROOMS, RedisServer, free_port
from tests.test_gateway import TOKEN, GatewayProcess, set_routing
from tests.test_stack import start_test_stack
from training_job.preprocessing import preprocess_bytes
from training_job.tiny_model import publish_tiny_versions


@pytest.fixture(scope="module", autouse=True)
def own_var(tmp_path_factory):
    """The module's var/ (MUSHROOM_VAR): the load test's phone-size photos are made there, once for the module, not
    in the checkout's; and it holds no local stack (var/run/latest) to take a gRPC target from."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MUSHROOM_VAR", str(tmp_path_factory.mktemp("var")))
        yield


@pytest.fixture(scope="module")
def stack(published_model, tmp_path_factory):
    stack = start_test_stack(published_model, tmp_path_factory.mktemp("loadtest-stack"))
    yield stack
    stop_stack(stack)


def test_locust_smoke_has_no_unexpected_failures(stack, tmp_path):
    out = tmp_path / "report"
    code = run_locust(stack.urls["gateway"], stack.urls["gateway gRPC"], users=6, spawn_rate=6, run_time="20s",
                      out=out, admin_token=stack.admin_token,
                      user_classes=["PhotoClassifier", "GrpcPhotoClassifier", "RoutingOperator"])
    rows = {(row.method, row.name): row.requests for row in final_rows(out)}
    assert code == 0, summary(out)
    assert total(final_rows(out)).requests > 50
    assert any(kind == "gRPC" and count > 0 for (kind, _), count in rows.items()), rows
    assert any(name.startswith("/v1/classify [bad:") for _, name in rows), rows
    assert rows.get(("PUT", "/v1/admin/routing"), 0) >= 2, rows
    assert (out / "report.html").stat().st_size > 0


# ------------------------------------------------------------------------------ the operator user's routing moves
def test_the_operator_moves_a_numeric_table_between_the_two_newest_versions():
    routing = {"weights": {"1": 20.0, "2": 30.0, "10": 50.0}, "shadow": 2, "available": [1, 2, 10],
               "resolved": {"1": 1, "2": 2, "10": 10}, "effective": {"1": 20.0, "2": 30.0, "10": 50.0}}
    assert shifted_routing(routing, 0.9) == {"weights": {"1": 0.0, "2": 0.9, "10": pytest.approx(0.1)}, "shadow": 2}


def test_the_operator_moves_a_label_table_and_sends_the_labels_back():
    """The gateway answers a label table with entries that are not integers: they used to crash the operator."""
    routing = {"weights": {"canary": 10.0, "stable": 90.0}, "shadow": "canary", "available": [1, 2],
               "resolved": {"canary": 2, "stable": 1}, "effective": {"1": 90.0, "2": 10.0}}
    assert shifted_routing(routing, 0.5) == {"weights": {"canary": 0.5, "stable": 0.5}, "shadow": "canary"}
    assert shifted_routing(routing, 0.9)["weights"] == {"stable": 0.9, "canary": pytest.approx(0.1)}
    routing["resolved"] = {"canary": 1, "stable": 2}  # the labels were swapped in the model server's config
    assert shifted_routing(routing, 0.9)["weights"] == {"canary": 0.9, "stable": pytest.approx(0.1)}


def test_the_operator_handles_mixed_tables_vanished_labels_and_empty_tables():
    mixed = {"weights": {"1": 80.0, "canary": 20.0}, "shadow": None, "available": [1, 2],
             "resolved": {"1": 1, "canary": 2}}
    assert shifted_routing(mixed, 0.9)["weights"] == {"1": 0.9, "canary": pytest.approx(0.1)}
    # A label the model server dropped (resolved null) would be refused: it goes to 0, the newest version fills in.
    vanished = {"weights": {"stable": 50.0, "canary": 50.0}, "shadow": None, "available": [1, 2, 3],
                "resolved": {"stable": 1, "canary": None}}
    assert shifted_routing(vanished, 0.1)["weights"] == {"stable": 0.1, "canary": 0.0, "3": pytest.approx(0.9)}
    one_label = {"weights": {"stable": 100.0}, "shadow": None, "available": [1, 2], "resolved": {"stable": 2}}
    assert shifted_routing(one_label, 0.9)["weights"] == {"1": 0.9, "stable": pytest.approx(0.1)}
    empty = {"weights": {}, "shadow": None, "available": [1, 2, 3], "resolved": {}, "effective": {}}
    assert shifted_routing(empty, 0.5) == {"weights": {"2": 0.5, "3": 0.5}, "shadow": None}
    alone = {"weights": {}, "shadow": None, "available": [4], "resolved": {}}
    assert shifted_routing(alone, 0.5) == {"clear": True}


def test_tables_are_compared_as_the_gateway_stores_them():
    """The keeper puts the table back only from one the operator sent: entries of weight 0 are not stored."""
    sent = {"weights": {"1": 0.0, "stable": 0.9, "canary": 0.1}, "shadow": "canary"}
    stored = {"weights": {"stable": 0.9, "canary": 0.1}, "shadow": "canary", "resolved": {"stable": 1, "canary": 2}}
    assert settable(sent) == settable(stored) == {"weights": {"stable": 0.9, "canary": 0.1}, "shadow": "canary"}
    empty = {"weights": {}, "shadow": None, "available": [1, 2]}
    assert settable(empty) == settable({"clear": True}) == {"clear": True}
    assert settable(stored) != settable({**stored, "shadow": None})


@pytest.fixture(scope="module")
def label_stack(tmp_path_factory):
    """Our model server labelling versions 1 and 2 stable and canary, Redis and a gateway; small models only."""
    registry = tmp_path_factory.mktemp("label-registry")
    publish_tiny_versions(registry, MODEL)
    config = registry / "models.config"
    write_config(config, {MODEL: registry / MODEL}, labels={MODEL: {"stable": 1, "canary": 2}}, policy="all {}")
    redis = RedisServer().start()
    server = start_server(registry, config)
    gateway = None
    try:
        wait_until(lambda: all(version_states(server.grpc_target, MODEL).get(v, (0,))[0]
                           == ModelVersionStatus.AVAILABLE for v in (1, 2)),
                   what="versions 1 and 2")
        gateway = GatewayProcess(server.grpc_target, redis.url, registry / MODEL)
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        stop_server(server)
        redis.stop()


def test_the_locust_operator_works_on_a_label_table(label_stack, tmp_path, monkeypatch):
    gateway = label_stack
    status, body, _ = set_routing(gateway, {"stable": 70, "canary": 30}, shadow="canary")
    assert status == 200, body
    monkeypatch.setenv("LOADTEST_PHOTOS", str(MUSHROOMS))
    out = tmp_path / "report"
    code = run_locust(gateway.url, f"127.0.0.1:{gateway.grpc_port}", users=1, spawn_rate=1, run_time="14s", out=out,
                      admin_token=TOKEN, user_classes=["RoutingOperator"])
    rows = {(row.method, row.name): row.requests for row in final_rows(out)}
    assert code == 0, summary(out)
    assert rows.get(("PUT", "/v1/admin/routing"), 0) >= 2, rows
    # Every change the operator made kept the labels (stable on version 1 gets 0.9, then 0.5, ...) and the shadow.
    entries = gateway.request("GET", "/v1/admin/audit", token=TOKEN)[1]["entries"]
    moves = [e["new"] for e in reversed(entries)][1:]  # oldest first, after the table set above
    assert len(moves) >= 2, entries
    assert [m["weights"]["stable"] for m in moves[:2]] == [0.9, 0.5]
    assert all(set(m["weights"]) == {"stable", "canary"} and m["shadow"] == "canary" for m in moves), moves
    routing = gateway.request("GET", "/v1/admin/routing", token=TOKEN)[1]
    assert routing["resolved"] == {"canary": 2, "stable": 1}
    # The run over, the table is the one it found: the gateway keeps it (in Redis) after the load test.
    assert (routing["weights"], routing["shadow"]) == ({"stable": 70.0, "canary": 30.0}, "canary"), entries


# ------------------------------------------------------------------------------ a run that cannot pass
@contextmanager
def unanswering_port():
    """A port on 127.0.0.1 that accepts connections and reads what is sent but never answers: a hung gateway."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def drain(connection):
        try:
            while connection.recv(65536):
                pass
        except OSError:
            pass

    def accept():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connections.append(connection)
            threading.Thread(target=drain, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for connection in connections:
            connection.close()


def test_a_gateway_that_stops_answering_fails_the_run(tmp_path, monkeypatch):
    """Each request times out before locust stops its users, so every one is counted, as a failure. (A gateway hung
    before the run starts is not run against: the next test.)"""
    monkeypatch.setenv("LOADTEST_PHOTOS", str(MUSHROOMS))
    out = tmp_path / "report"
    with unanswering_port() as http_port, unanswering_port() as grpc_port:
        code = run_locust(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", users=4, spawn_rate=4,
                          run_time="3s", out=out)
    printed = summary(out)
    assert code != 0, printed
    assert "timed out" in printed.lower() or "deadline" in printed.lower(), printed
    # The requests failed after the run time, while locust stopped its users: its CSV never sees them.
    every = total(final_rows(tmp_path / "report"))
    assert every.requests > 0 and every.failures == every.requests, printed
    assert "FAILED: no photo was answered with predictions" in printed, printed
    assert "5 % phone-size photos" in printed, printed  # the mix is part of the report


def test_no_run_starts_against_a_gateway_that_is_not_there_hung_or_not_ready(tmp_path, capsys, monkeypatch):
    """`make loadtest` without a stack used to spend its whole run time (a minute) collecting connection errors;
    it now says at once what is wrong and starts nothing (status 2)."""
    monkeypatch.setenv("LOADTEST_PHOTOS", str(MUSHROOMS))
    with unanswering_port() as grpc_port:
        for host, said in ((f"http://127.0.0.1:{free_port()}", "refused"),
                           (None, "timed out")):
            with (unanswering_port() if host is None else nullcontext(None)) as hung_port:
                host = host or f"http://127.0.0.1:{hung_port}"
                started = time.monotonic()
                code = main(["--host", host, "--grpc", f"127.0.0.1:{grpc_port}", "--run-time", "60s",
                             "--out", str(tmp_path / "report")])
            err = capsys.readouterr().err
            assert code == 2 and time.monotonic() - started < 20, err
            assert f"nothing answers {host}/readyz" in err and said in err and "make run" in err, err
            assert not (tmp_path / "report").exists()
    with not_ready_gateway() as url:
        problem = gateway_problem(url, "127.0.0.1:1", ready_wait=1.5)
    assert problem == f"the gateway at {url} is not ready after 1.5 s: 503 no model version is AVAILABLE", problem


@contextmanager
def not_ready_gateway():
    """An HTTP server answering /readyz as a gateway with no model yet: 503 {"ready": false, "reason": ...}."""
    class NotReady(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"ready": False, "reason": "no model version is AVAILABLE"}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_user_class_that_made_no_request_fails_the_run(label_stack, tmp_path, monkeypatch):
    """The gRPC users cannot start (no gRPC target): the HTTP users' requests alone must not pass for the run."""
    monkeypatch.setenv("LOADTEST_PHOTOS", str(MUSHROOMS))  # own_var holds no local stack to take a gRPC target from
    out = tmp_path / "report"
    code = run_locust(label_stack.url, "", users=4, spawn_rate=4, run_time="4s", out=out,
                      user_classes=["PhotoClassifier", "GrpcPhotoClassifier"])
    report = summary(out)
    assert code != 0, report
    assert "GrpcPhotoClassifier made no request" in report, report
    assert "no gRPC target" in report, report


def test_the_load_test_leaves_the_routing_table_alone_unless_asked(label_stack, tmp_path, monkeypatch):
    """Without --operator no user moves the A/B weights: the gateway's table is operator state, kept in Redis."""
    gateway = label_stack
    monkeypatch.setenv("LOADTEST_PHOTOS", str(MUSHROOMS))
    audit_before = gateway.request("GET", "/v1/admin/audit", token=TOKEN)[1]["entries"]
    code = main(["--host", gateway.url, "--grpc", f"127.0.0.1:{gateway.grpc_port}", "--admin-token", TOKEN,
                 "--users", "3", "--spawn-rate", "3", "--run-time", "3s", "--out", str(tmp_path / "report")])
    assert gateway.request("GET", "/v1/admin/audit", token=TOKEN)[1]["entries"] == audit_before
    assert code == 0, summary(tmp_path / "report")


# ------------------------------------------------------------------------------ cache hits and misses apart
def one_photo_per_format() -> dict[str, object]:
    """The first shared photo of each format (the shared folder holds JPEG, PNG and WebP under .jpg names)."""
    found = {}
    for path in sorted(MUSHROOMS.rglob("*.jpg")):
        with Image.open(path) as image:
            found.setdefault(image.format, path)
        if len(found) == 3:
            return found
    raise AssertionError(f"the shared photos hold only {sorted(found)}")


def test_distinct_photos_are_new_bytes_with_the_same_pixels():
    """Each distinct photo is sent with bytes of its own after the image's end: the gateway's cache (keyed by the
    bytes' sha256) has never seen it, and preprocessing decodes the very same pixels."""
    photos = one_photo_per_format()
    traffic = Traffic(list(photos.values()))
    for image_format, path in photos.items():
        first, second = traffic.distinct(path), traffic.distinct(path)
        assert len({first, second, path.read_bytes()}) == 3, image_format
        assert np.array_equal(preprocess_bytes(first), preprocess_bytes(path.read_bytes())), image_format


def test_rows_say_whether_the_cache_answered(label_stack, tmp_path, monkeypatch):
    """The photos are all in the cache before the run: the hot set is answered from it, no distinct photo is (its
    bytes are new), and each photo's row says which it was, over HTTP and gRPC."""
    gateway = label_stack
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(MUSHROOMS.rglob("*.jpg"))[:4]:
        shutil.copy(path, photos / path.name)
        for version in (1, 2):  # whichever version the routing table sends a user to
            wait_until(lambda: gateway.classify(path.read_bytes(), version=version).body["cached"],
                       what=f"{path.name} cached for version {version}")
    monkeypatch.setenv("LOADTEST_PHOTOS", str(photos))
    out = tmp_path / "report"
    code = run_locust(gateway.url, f"127.0.0.1:{gateway.grpc_port}", users=2, spawn_rate=2, run_time="3s", out=out)
    assert code == 0, summary(out)
    rows = {(row.method, row.name): row.requests for row in final_rows(out)}
    kinds = {name.split("[")[1].rstrip("]") for _, name in rows if "[bad:" not in name}  # "hot:hit", ...
    assert {"distinct:miss", "hot:hit"} <= kinds <= {"distinct:miss", "hot:hit", "phone:miss"}, rows
    assert {method for method, _ in rows} == {"POST", "gRPC"}, rows


# ------------------------------------------------------------------------------ phone-size photos
def test_phone_photos_are_12_megapixel_jpegs_the_gateway_answers(label_stack, tmp_path):
    """Phones send JPEGs of about 12 MP and megabytes, some stored sideways (EXIF orientation 6); the gateway answers
    them, followed by a distinct photo's own bytes, over HTTP and gRPC."""
    sources = sorted(MUSHROOMS.rglob("*.jpg"))
    phones = phone_photos(sources, tmp_path / "phones")
    assert len(phones) == PHONE_PHOTOS
    orientations = set()
    for path in phones:
        with Image.open(path) as image:
            assert image.format == "JPEG" and abs(image.width * image.height - 12_000_000) < 120_000, image.size
            orientations.add(image.getexif().get(0x0112, 1))
        assert path.stat().st_size > 2_000_000, path.stat().st_size
    assert orientations == {1, 6}
    assert phone_photos(sources, tmp_path / "phones") == phones  # made once, then found
    traffic = Traffic(sources, phones)
    http = label_stack.classify(traffic.distinct(phones[0]))
    assert http.status == 200 and http.body["predictions"] and not http.body["cached"], http
    with ClassifierClient(f"127.0.0.1:{label_stack.grpc_port}") as client:
        assert client.classify(traffic.distinct(phones[1]), timeout=30)["predictions"]


def test_one_request_in_20_sends_a_phone_size_photo():
    paths = sorted(MUSHROOMS.rglob("*.jpg"))[:40]
    phones = paths[-2:]  # stand-ins: the mix does not look inside them
    traffic = Traffic(paths[:-2], phones, seed=7)
    draws = [traffic.next() for _ in range(4000)]
    phone_bodies = [body for kind, body, _ in draws if kind == "phone"]
    assert 0.04 < len(phone_bodies) / len(draws) < 0.06
    assert all(any(body.startswith(phone.read_bytes()) for phone in phones) for body in phone_bodies)
    assert len(set(phone_bodies)) == len(phone_bodies)  # each is new to the cache, like a distinct photo
    mix = describe_mix(paths[:-2], phones)
    assert "5 % phone-size photos (2 JPEGs" in mix and "55 % distinct photos (38 photos" in mix, mix


def test_failures_are_named_by_status_and_error_code_so_locust_groups_them_and_shedding_is_told_apart():
    """The gateway's messages name figures of the moment (misses in progress, a rate): named by them, each refusal
    under overload was a row of its own in locust's failures table. Bodies and details as the gateway makes them."""
    from loadtests.outcome import grpc_failure, http_failure, problems_of
    from services.gateway.errors import GatewayError

    def body(error: GatewayError) -> str:
        return json.dumps(error.body())

    overloaded = [GatewayError(503, "overloaded", f"{n} in progress at {n + 7} answers per second") for n in (80, 93)]
    assert len({http_failure(e.status, body(e)) for e in overloaded}) == 1
    assert len({grpc_failure("UNAVAILABLE", f"{e.code}: {e.message}") for e in overloaded}) == 1
    shed = [http_failure(503, body(overloaded[0])), grpc_failure("UNAVAILABLE", "overloaded: 80 in progress"),
            http_failure(504, body(GatewayError(504, "deadline_unreachable", "0.2 s left"))),
            grpc_failure("DEADLINE_EXCEEDED", "deadline_unreachable: 0.2 s left")]
    other = [http_failure(503, body(GatewayError(503, "model_server_unavailable", "connection refused"))),
             http_failure(502, "<html>Bad Gateway</html>"),  # a proxy's, not the gateway's
             grpc_failure("DEADLINE_EXCEEDED", "Deadline Exceeded"),  # the caller's own deadline expired
             grpc_failure("UNAVAILABLE", "failed to connect to all addresses; last error: refused")]
    assert other[1] == "502: <html>Bad Gateway</html>" and other[2] == "DEADLINE_EXCEEDED: Deadline Exceeded"
    failures = [{"method": "POST", "name": "x", "error": f"CatchResponseError({name!r})", "occurrences": 3}
                for name in shed + other]
    problems = problems_of({"PhotoClassifier": 10}, 5, failures, [])
    assert problems[0] == "12 requests failed"
    assert problems[1].startswith("12 requests were shed by the gateway as overloaded"), problems
