"""Locust traffic against the gateway: HTTP clients, gRPC clients and one operator shifting the A/B weights mid-run.

Host = the gateway's HTTP URL; the gRPC target and admin token come from $LOADTEST_GRPC_TARGET / $LOADTEST_ADMIN_TOKEN
or from the latest local stack (var/run/latest). Rejections of deliberately bad inputs count as successes; anything
else that is not a 2xx (or gRPC OK) is a failure."""
from __future__ import annotations

import time

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # grpc's own threads would otherwise block locust's gevent loop

import grpc  # noqa: E402
from locust import HttpUser, User, between, events, task  # noqa: E402

from loadtests.traffic import Traffic, admin_token, grpc_target, photo_paths, shifted_routing  # noqa: E402
from devstack.grpc_client import ClassifierClient  # noqa: E402

PHOTOS = photo_paths()
ROUTING_STEPS = [0.9, 0.5, 0.1]  # share of traffic for the entry on the older of the two newest versions, in turn


class PhotoClassifier(HttpUser):
    """A person or an app posting photos over HTTP."""

    wait_time = between(0.05, 0.3)
    weight = 3

    def on_start(self):
        self.traffic = Traffic(PHOTOS)
        self.client_id = f"locust-http-{id(self)}"

    @task
    def classify(self):
        name, body, bad = self.traffic.next()
        with self.client.post("/v1/classify?top_k=3", data=body, name=f"POST /v1/classify [{name}]",
                              headers={"Content-Type": "application/octet-stream", "X-Client-Id": self.client_id},
                              catch_response=True) as response:
            if bad:
                if 400 <= response.status_code < 500:
                    response.success()
                else:
                    response.failure(f"bad input answered {response.status_code}, expected a 4xx")
            elif response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif not response.json().get("predictions"):
                response.failure("no predictions in the answer")


class GrpcPhotoClassifier(User):
    """A backend service calling mushroom.v1.Classifier over gRPC; each call is reported as a locust request."""

    wait_time = between(0.05, 0.3)
    weight = 1

    def on_start(self):
        target = grpc_target()
        if not target:
            raise RuntimeError("no gRPC target: set LOADTEST_GRPC_TARGET or bring the local stack up")
        self.grpc = ClassifierClient(target)
        self.client_id = f"locust-grpc-{id(self)}"
        self.traffic = Traffic(PHOTOS)

    def on_stop(self):
        self.grpc.close()

    @task
    def classify(self):
        name, body, bad = self.traffic.next()
        started = time.perf_counter()
        exception, length = None, 0
        try:
            answer = self.grpc.classify(body, top_k=3, client_id=self.client_id)
            length = len(str(answer))
            if bad:
                exception = AssertionError("bad input was accepted")
            elif not answer.get("predictions"):
                exception = AssertionError("no predictions in the answer")
        except grpc.RpcError as error:
            if not (bad and error.code() == grpc.StatusCode.INVALID_ARGUMENT):
                exception = error
        events.request.fire(request_type="gRPC", name=f"Classify [{name}]", response_time=(time.perf_counter() - started)
                            * 1000, response_length=length, exception=exception, context={})


class RoutingOperator(HttpUser):
    """One operator who moves the A/B weights between the two entries on the newest versions every few seconds;
    entries may be version numbers or version labels ("stable", "canary"), which are kept as labels."""

    fixed_count = 1
    wait_time = between(8, 10)

    def on_start(self):
        self.headers = {"Authorization": f"Bearer {admin_token()}"}
        self.step = 0

    @task
    def shift_weights(self):
        with self.client.get("/v1/admin/routing", headers=self.headers, name="GET /v1/admin/routing",
                             catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            routing = response.json()
        table = shifted_routing(routing, ROUTING_STEPS[self.step % len(ROUTING_STEPS)])
        self.step += 1
        with self.client.put("/v1/admin/routing", json=table, headers=self.headers,
                             name="PUT /v1/admin/routing", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
