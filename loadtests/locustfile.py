"""Locust traffic against the gateway: HTTP clients, gRPC clients and, when named (run.py --operator), one operator
shifting the A/B weights mid-run, whose moves the ``RoutingKeeper`` undoes when the run stops.

Host = the gateway's HTTP URL; the gRPC target and admin token come from $LOADTEST_GRPC_TARGET / $LOADTEST_ADMIN_TOKEN
or from the latest local stack (var/run/latest); the photos from $LOADTEST_PHOTOS, the phone-size ones from
$LOADTEST_PHONE_PHOTOS (run.py makes them; without it, none are sent). Rejections of deliberately bad inputs count as
successes; anything else that is not a 2xx (or gRPC OK) within the request timeout ($LOADTEST_REQUEST_TIMEOUT_S) is a
failure. When locust quits, the run's ``Outcome`` (loadtests/outcome.py) is written to $LOADTEST_OUTCOME_DIR, and the
exit status is 1 when it names a problem (a user class that made no request, too)."""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # grpc's own threads would otherwise block locust's gevent loop

import grpc  # noqa: E402
import requests  # noqa: E402
from locust import HttpUser, User, between, events, task  # noqa: E402

from loadtests.outcome import Outcome, grpc_failure, http_failure, problems_of  # noqa: E402
from loadtests.traffic import (PhotoFiles, Traffic, admin_token, grpc_target, phone_photo_paths,  # noqa: E402
                               photo_paths, request_label, request_timeout_s, settable, shifted_routing)
from devstack.grpc_client import ClassifierClient  # noqa: E402

PHOTOS = photo_paths()
PHONES = phone_photo_paths()  # made by run.py, before locust starts (see loadtests/phone_photos.py)
FILES = PhotoFiles()  # every user's photos, read once
ROUTING_STEPS = [0.9, 0.5, 0.1]  # share of traffic for the entry on the older of the two newest versions, in turn
REQUEST_TIMEOUT_S = request_timeout_s()  # every HTTP request and gRPC call; run.py stops users after a longer wait


class Tally:
    """What the run's users did, from locust's request events: requests by user class (the users' ``context()``
    names it) and photos answered with predictions (requests sent with ``{"photo": True}`` that succeeded)."""

    def __init__(self):
        self.requests: Counter[str] = Counter()
        self.photos_answered = 0

    def count(self, context: dict, exception, **_) -> None:
        self.requests[context.get("user", "?")] += 1
        if context.get("photo") and exception is None:
            self.photos_answered += 1

    def outcome(self, environment, other_problems: list[str]) -> Outcome:
        """The run's outcome; ``other_problems``: found outside the requests (the ``RoutingKeeper``'s)."""
        users = [user_class.__name__ for user_class in environment.user_classes]
        requests_by_user = {user: self.requests[user] for user in users}
        classifying = any(user_class.classifies_photos for user_class in environment.user_classes)
        failures = [error.serialize() for error in environment.runner.stats.errors.values()]
        exceptions = [{"count": e["count"], "msg": e["msg"], "traceback": e["traceback"]}
                      for e in environment.runner.exceptions.values()]
        photos = self.photos_answered if classifying else None
        return Outcome(requests_by_user, photos, failures, exceptions,
                       problems_of(requests_by_user, photos, failures, exceptions) + other_problems)


TALLY = Tally()
events.request.add_listener(TALLY.count)


@events.quitting.add_listener
def record_outcome(environment, **_):
    """After the users have stopped: the outcome into $LOADTEST_OUTCOME_DIR, and exit status 1 on any problem."""
    outcome = TALLY.outcome(environment, KEEPER.problems)
    if os.environ.get("LOADTEST_OUTCOME_DIR"):
        outcome.write(Path(os.environ["LOADTEST_OUTCOME_DIR"]))
    if outcome.problems:
        environment.process_exit_code = 1


class NamedUser(User):
    """Names its class in the context of every request it reports, for the ``Tally``; ``classifies_photos``: its
    users send photos, so a run with them must answer some."""

    abstract = True
    classifies_photos = False

    def context(self) -> dict:
        return {"user": type(self).__name__}


def http_problem(response) -> str:
    """Why an HTTP request got no usable answer: the connection's error (a timeout, a refusal) or the status and the
    gateway's error code (outcome.failure_name)."""
    if response.error is not None:
        return f"no answer: {response.error}"
    return http_failure(response.status_code, response.text)


class PhotoClassifier(HttpUser, NamedUser):
    """A person or an app posting photos over HTTP."""

    wait_time = between(0.05, 0.3)
    weight = 3
    classifies_photos = True

    def on_start(self):
        self.traffic = Traffic(PHOTOS, PHONES, files=FILES)
        self.client_id = f"locust-http-{id(self)}"

    @task
    def classify(self):
        kind, body, bad = self.traffic.next()
        with self.client.post("/v1/classify?top_k=3", data=body, name=f"/v1/classify [{kind}]",
                              headers={"Content-Type": "application/octet-stream", "X-Client-Id": self.client_id},
                              timeout=REQUEST_TIMEOUT_S, context={"photo": not bad}, catch_response=True) as response:
            if bad:
                if 400 <= response.status_code < 500:
                    response.success()
                else:
                    response.failure(f"bad input: {http_problem(response)}; expected a 4xx")
            elif response.status_code != 200:
                response.failure(http_problem(response))
            else:
                answer = response.json()
                # the row is named once the answer says whether it came from the cache
                response.request_meta["name"] = f"/v1/classify [{request_label(kind, answer.get('cached'))}]"
                if not answer.get("predictions"):
                    response.failure("no predictions in the answer")


class GrpcPhotoClassifier(NamedUser):
    """A backend service calling mushroom.v1.Classifier over gRPC; each call is reported as a locust request."""

    wait_time = between(0.05, 0.3)
    weight = 1
    classifies_photos = True

    def on_start(self):
        target = grpc_target()
        if not target:
            raise RuntimeError("no gRPC target: set LOADTEST_GRPC_TARGET or bring the local stack up")
        self.grpc = ClassifierClient(target)
        self.client_id = f"locust-grpc-{id(self)}"
        self.traffic = Traffic(PHOTOS, PHONES, files=FILES)

    def on_stop(self):
        self.grpc.close()

    @task
    def classify(self):
        kind, body, bad = self.traffic.next()
        started = time.perf_counter()
        exception, length, cached = None, 0, None
        try:
            answer = self.grpc.classify(body, top_k=3, client_id=self.client_id, timeout=REQUEST_TIMEOUT_S)
            length = len(str(answer))
            cached = answer.get("cached", False)  # proto3 leaves a false bool out of the dict
            if bad:
                exception = AssertionError("bad input was accepted")
            elif not answer.get("predictions"):
                exception = AssertionError("no predictions in the answer")
        except grpc.RpcError as error:
            if not (bad and error.code() == grpc.StatusCode.INVALID_ARGUMENT):
                # DEADLINE_EXCEEDED with no gateway error code in its details when the call's own deadline expired
                exception = RuntimeError(grpc_failure(error.code().name, error.details() or ""))
        events.request.fire(request_type="gRPC", name=f"Classify [{request_label(kind, None if bad else cached)}]",
                            response_time=(time.perf_counter() - started) * 1000, response_length=length,
                            exception=exception, context={**self.context(), "photo": not bad})


class RoutingOperator(HttpUser, NamedUser):
    """One operator who moves the A/B weights between the two entries on the newest versions every few seconds;
    entries may be version numbers or version labels ("stable", "canary"), which are kept as labels. It moves
    nothing unless the ``RoutingKeeper`` saved the table first."""

    fixed_count = 1
    wait_time = between(8, 10)

    def on_start(self):
        if KEEPER.saved is None:
            raise RuntimeError("the routing table the run started with was not saved: the operator leaves it alone")
        self.headers = {"Authorization": f"Bearer {admin_token()}"}
        self.step = 0

    @task
    def shift_weights(self):
        with self.client.get("/v1/admin/routing", headers=self.headers, name="/v1/admin/routing",
                             timeout=REQUEST_TIMEOUT_S, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(http_problem(response))
                return
            routing = response.json()
        table = shifted_routing(routing, ROUTING_STEPS[self.step % len(ROUTING_STEPS)])
        self.step += 1
        KEEPER.sent.append(settable(table))  # before it is sent: an answer lost to a timeout may still have set it
        with self.client.put("/v1/admin/routing", json=table, headers=self.headers, name="/v1/admin/routing",
                             timeout=REQUEST_TIMEOUT_S, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(http_problem(response))


class RoutingKeeper:
    """When RoutingOperator is one of the run's users: the gateway's routing table as the run found it, saved before
    any user starts and put back once they have all stopped. The table is operator state (kept in Redis, never
    expiring), so the operator's moves must not outlast the run. It is put back only from a table the operator set;
    one someone else set during the run (a rollout controller, a person) is left as it is, and named as a problem."""

    PATH = "/v1/admin/routing"

    def __init__(self):
        self.saved: dict | None = None  # ``settable`` of the table found at the start
        self.sent: list[dict] = []  # ``settable`` of every table the operator sent
        self.problems: list[str] = []  # for the run's outcome

    def _call(self, environment, method: str, body: dict | None = None) -> dict:
        answer = requests.request(method, environment.host + self.PATH, json=body, timeout=REQUEST_TIMEOUT_S,
                                  headers={"Authorization": f"Bearer {admin_token()}",
                                           "X-Operator": "locust: the table as the load test found it"})
        if answer.status_code != 200:
            raise RuntimeError(f"{method} {self.PATH} answered {answer.status_code}: {answer.text[:200]}")
        return answer.json()

    def save(self, environment, **_) -> None:
        if RoutingOperator not in environment.user_classes:
            return
        try:
            self.saved = settable(self._call(environment, "GET"))
        except (requests.RequestException, RuntimeError, ValueError) as exc:
            self.problems.append(f"the routing table could not be saved: {exc}")

    def restore(self, environment, **_) -> None:
        if self.saved is None or not self.sent:
            return
        try:
            now = settable(self._call(environment, "GET"))
            if now == self.saved:
                return
            if now not in self.sent:
                self.problems.append(f"the routing table was set by someone else during the run; left as it is, "
                                     f"not put back to {self.saved}")
                return
            self._call(environment, "PUT", self.saved)
        except (requests.RequestException, RuntimeError, ValueError) as exc:
            self.problems.append(f"the routing table could not be put back to {self.saved}: {exc}")


KEEPER = RoutingKeeper()
events.test_start.add_listener(KEEPER.save)
events.test_stop.add_listener(KEEPER.restore)
