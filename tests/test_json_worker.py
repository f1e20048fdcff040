"""json_worker.JsonWorker: JSON work below its threshold runs in place; above it, in a spawned worker process whose
death fails that request alone (INTERNAL) and not the next one, and which does not outlive a killed server."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from services.model_server.errors import LargeJson, ServingError
from services.model_server.json_worker import (
    IN_PLACE_ROWS, IN_PLACE_SLOW_VALUES, LARGE_JSON_BYTES, LARGE_JSON_MEMBERS, JsonWorker,
)
from tests.model_server_harness import MODEL, serve_registry, stop_server
from training_job.paths import PROJECT_ROOT
from training_job.tiny_model import publish_tiny_versions


def pid_of_caller() -> int:
    return os.getpid()


def refuse(message: str) -> None:
    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def die() -> None:
    os._exit(1)  # as the kernel's OOM killer would end it


def test_small_work_runs_in_place_large_work_in_a_worker_that_a_death_does_not_break():
    async def scenario():
        worker = JsonWorker(large_json_bytes=1000)
        try:
            here = await worker.run(pid_of_caller, 999)
            away = [await worker.run(pid_of_caller, 1000) for _ in range(2)]
            with pytest.raises(ServingError) as refused:  # an error crosses the process as it was raised
                await worker.run(refuse, 5000, "Missing 'inputs' or 'instances' key")
            assert (refused.value.code, refused.value.message) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                  "Missing 'inputs' or 'instances' key")
            with pytest.raises(ServingError) as died:
                await worker.run(die, 5000)
            assert died.value.code == grpc.StatusCode.INTERNAL and "5000 bytes of JSON died" in died.value.message
            after = await worker.run(pid_of_caller, 5000)
        finally:
            worker.close()
        return here, away, after

    here, away, after = asyncio.run(scenario())
    assert here == os.getpid()
    assert away[0] == away[1] != os.getpid()  # one worker, kept
    assert after not in (os.getpid(), away[0])  # a new one


def test_a_worker_killed_while_idle_is_replaced_for_the_next_request():
    """A worker the kernel's OOM killer (or an operator) ends between requests took no request with it: the next one
    gets a new worker, not an error."""
    async def scenario():
        worker = JsonWorker(large_json_bytes=1000)
        try:
            first = await worker.run(pid_of_caller, 1000)
            os.kill(first, signal.SIGKILL)
            await asyncio.sleep(1.0)  # the pool sees its process gone at once, and is broken from then on
            return first, await worker.run(pid_of_caller, 1000)
        finally:
            worker.close()

    first, second = asyncio.run(scenario())
    assert second not in (first, os.getpid())


PHOTO_JSON_BYTES = len(json.dumps({"instances": [[[[120, 80, 40]] * 224] * 224]}))  # a 224 x 224 photo as numbers


async def photos_until_the_worker_runs(worker: JsonWorker) -> tuple[int, int]:
    """The pid that handled a photo's JSON first, and the one that handled it once the worker it started runs (the
    caller's own, still, when none does within 30 s)."""
    first = later = await worker.run(pid_of_caller, PHOTO_JSON_BYTES)
    deadline = time.monotonic() + 30
    while later == os.getpid() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        later = await worker.run(pid_of_caller, PHOTO_JSON_BYTES)
    return first, later


def test_a_photos_json_is_handled_in_place_only_while_the_worker_it_starts_is_starting():
    """One photo as JSON numbers (0.8 MB) held the event loop, and every other request of both APIs, for tens of
    milliseconds in place; in the worker it adds a small part of that to its own request's time, and nothing to the
    others'. The worker's start takes longer than that parse: the photo that starts it is not kept waiting."""
    async def scenario():
        worker = JsonWorker()
        try:
            first, later = await photos_until_the_worker_runs(worker)
            small = await worker.run(pid_of_caller, 1000)
        finally:
            worker.close()
        return first, later, small

    first, later, small = asyncio.run(scenario())
    assert first == os.getpid()
    assert later != os.getpid(), "a photo's JSON is still parsed on the event loop while the worker runs"
    assert small == os.getpid()


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_photos_json_does_not_wait_behind_a_large_body_being_parsed():
    """A batch of photos as JSON (25 MB for 32) takes the worker most of a second: a photo's JSON sent meanwhile is
    parsed in a worker of its own, not after it (as TF Serving parses each on a thread of its own)."""
    async def scenario():
        worker = JsonWorker()
        try:
            photo = (await photos_until_the_worker_runs(worker))[1]
            large = asyncio.create_task(worker.run(pid_after, LARGE_JSON_BYTES, 5.0))
            await asyncio.sleep(1.0)  # its worker started and busy
            beside = await worker.run(pid_of_caller, PHOTO_JSON_BYTES)
            large_done_first = large.done()
            return photo, beside, await large, large_done_first
        finally:
            worker.close()

    photo, beside, large, large_done_first = asyncio.run(scenario())
    assert not large_done_first, "the photo's JSON waited for the large body's parse"
    assert beside == photo not in (large, os.getpid())


PARENT = """
import asyncio, os
from services.model_server.json_worker import JsonWorker
from tests.test_json_worker import pid_of_caller
worker = JsonWorker(large_json_bytes=1)
print(asyncio.run(worker.run(pid_of_caller, 10)), flush=True)
os.kill(os.getpid(), 9)  # as the kernel or an operator kills a server: nothing of it runs after
"""


def test_a_worker_exits_once_the_server_that_started_it_is_killed():
    parent = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, cwd=PROJECT_ROOT,
                            timeout=60)
    worker_pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = Path(f"/proc/{worker_pid}").exists()
    if alive:
        os.kill(worker_pid, signal.SIGKILL)
    assert not alive, "the worker outlived its server"


def test_the_rest_apis_bodies_come_back_from_the_worker_as_parsed_in_place():
    """The REST handlers' parsers (json_tensor.py's for predict, rest_api.py's for classify and regress) give the
    same request from the worker as in place: their results and their errors cross the process."""
    import json

    import numpy as np

    from services.model_server.json_tensor import predict_request_from_json
    from services.model_server.rest_api import examples_request_from_json

    predict = json.dumps({"instances": [{"images": [[[1, 2, 3]]], "note": "a"}]}).encode()
    signatures = {"serving_default": {"images": "uint8", "note": "string"}}
    regress = json.dumps({"examples": [{"x": 1.5}, {"x": [2, 3]}]}).encode()
    bad = b'{"instances": [[1, 2], [3]]}'

    async def parse(worker):
        return (await worker.run(predict_request_from_json, len(predict), predict, signatures, None),
                await worker.run(examples_request_from_json, len(regress), regress, "regress"))

    in_place, away = JsonWorker(), JsonWorker(large_json_bytes=1)
    try:
        (name, rows, tensors), request = asyncio.run(parse(in_place))
        (name_away, rows_away, tensors_away), request_away = asyncio.run(parse(away))
        with pytest.raises(ServingError) as refused:
            asyncio.run(away.run(predict_request_from_json, len(bad), bad, {"serving_default": {"x": "int32"}}, None))
    finally:
        away.close()
    assert (name_away, rows_away) == (name, rows) == ("", True)
    assert tensors_away.keys() == tensors.keys() == {"images", "note"}
    np.testing.assert_array_equal(tensors_away["images"], tensors["images"])
    assert tensors_away["images"].dtype == np.uint8 and tensors_away["note"].tolist() == [b"a"]
    assert request_away == request and len(request.input.example_list.examples) == 2
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.message.endswith("Expecting tensor size: 2 but got: 1")  # TF Serving's words


def many_members(count: int) -> bytes:
    return ("{" + ",".join(f'"{i:x}": 0' for i in range(count)) + ', "instances": [[1]]}').encode()


def test_a_body_of_many_object_members_counts_as_large_whatever_its_size():
    """json.loads spends about ten times as long on an object's member as on a number in a list, byte for byte: 3.7 MB
    of distinct keys, under the large size, held the event loop (gRPC's too) 0.27 s in place."""
    worker = JsonWorker()
    assert worker.parse_bytes(many_members(LARGE_JSON_MEMBERS)) == LARGE_JSON_BYTES  # and "instances"
    photo = {"instances": [[[[120, 80, 40]] * 224] * 224]}  # a 224 x 224 photo as numbers: no member per value
    photos = {"instances": [{"b64": "QUJD"}] * 1000, "signature_name": "predict_image_bytes"}
    for body in (json.dumps(photo).encode(), json.dumps(photos).encode(), many_members(LARGE_JSON_MEMBERS - 1)):
        assert worker.parse_bytes(body) == len(body) < LARGE_JSON_BYTES


def test_the_rest_api_parses_a_body_of_many_members_in_the_worker(tmp_path):
    registry = tmp_path / "registry"
    publish_tiny_versions(registry, MODEL)
    server = serve_registry(registry, (1,))
    try:
        body = many_members(LARGE_JSON_MEMBERS + 1)
        request = urllib.request.Request(f"{server.rest_url}/v1/models/{MODEL}:predict", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # parsed, then refused: instances of the wrong shape
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 400
        pid = server.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert children, "no worker was started: the body was parsed on the event loop"
    finally:
        stop_server(server)


def pid_unless_in_place_with_a_row_limit(max_rows: int | None = None) -> int:
    if max_rows is not None:
        raise LargeJson(f"more rows than {max_rows}")
    return os.getpid()


def test_a_parse_that_finds_many_rows_in_place_runs_again_in_the_worker():
    async def scenario():
        worker = JsonWorker()
        try:
            return await worker.run(pid_unless_in_place_with_a_row_limit, 10, in_place={"max_rows": 1})
        finally:
            worker.close()

    assert asyncio.run(scenario()) != os.getpid()


RAGGED = [[0] * 100 for _ in range(IN_PLACE_SLOW_VALUES // 100)] + [[0]]  # the last row short: found at the end


@pytest.mark.parametrize("path, body, message", [
    # each instance of a predict body is turned into a tensor by Python code of its own: 250,000 one-value rows
    # (1 MB) held the event loop, gRPC's calls too, for 1.6 s in place
    (":predict", {"instances": [[1]] * (IN_PLACE_ROWS + 1)}, "of rank 2; the signature takes rank 4"),
    # a ragged nest is converted value by value (about 0.1 s a MB in place), and refused at its end
    (":predict", {"inputs": RAGGED}, "Encountered list at unexpected size: 1 at level: 1 expected size: 100"),
    # each feature value of a classify body is added to its tf.Example one by one (about 0.15 s a MB in place)
    (":classify", {"examples": [{"mean_colour": [0.5] * IN_PLACE_SLOW_VALUES}]}, ""),
])
def test_the_rest_api_converts_many_rows_or_values_in_the_worker(tmp_path, path, body, message):
    registry = tmp_path / "registry"
    publish_tiny_versions(registry, MODEL)
    server = serve_registry(registry, (1,))
    try:
        request = urllib.request.Request(f"{server.rest_url}/v1/models/{MODEL}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # none of these suits the tiny model
            urllib.request.urlopen(request, timeout=120)
        assert refused.value.code == 400 and message in refused.value.read().decode()
        pid = server.process.pid
        assert Path(f"/proc/{pid}/task/{pid}/children").read_text().split(), "the body was converted in place"
    finally:
        stop_server(server)


def test_a_parse_in_place_leaves_values_numpy_converts_uncounted_and_counts_the_others():
    """A photo as pixels (a regular nest of numbers, converted by numpy) stays in place however many values it has;
    values converted one by one are counted, over all the inputs and instances of a body, and past the limit the
    parse raises LargeJson (json_worker then runs it again in the worker, without the limit)."""
    from services.model_server.json_tensor import predict_request_from_json

    def parse(body: dict, dtypes: dict[str, str], limit: int | None = IN_PLACE_SLOW_VALUES):
        return predict_request_from_json(json.dumps(body).encode(), {"serving_default": dtypes}, None,
                                         max_rows=IN_PLACE_ROWS, max_slow_values=limit)

    photo = [[[120, 80, 40]] * 224] * 224
    assert parse({"instances": [photo]}, {"images": "uint8"})[2]["images"].shape == (1, 224, 224, 3)
    half = IN_PLACE_SLOW_VALUES // 2
    assert parse({"inputs": {"a": ["x"] * half, "b": ["y"] * half}}, {"a": "string", "b": "string"})  # the limit
    for body, dtypes in (({"inputs": {"a": ["x"] * half, "b": ["y"] * (half + 1)}}, {"a": "string", "b": "string"}),
                         ({"instances": [["x"] * (half + 1), ["y"] * (half + 1)]}, {"a": "string"}),
                         ({"inputs": [0] * IN_PLACE_SLOW_VALUES + ["x"]}, {"a": "uint8"}),
                         ({"inputs": RAGGED}, {"a": "uint8"})):
        with pytest.raises(LargeJson):
            parse(body, dtypes)
    with pytest.raises(ServingError, match="expected size: 100"):
        parse({"inputs": RAGGED}, {"a": "uint8"}, limit=None)


def test_parsing_a_body_sets_off_no_garbage_collection():
    """Parsing makes containers, each counting towards the next collection, but no cycle; in the model server,
    which holds TensorFlow's objects, those collections cost several times the parse: one photo as JSON (705 KB)
    took 96 ms of CPU per REST predict (p90 246 ms), 26 ms with the collector paused."""
    import gc

    from services.model_server.json_tensor import json_body

    collections = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    body = json.dumps({"instances": [[[[120, 80, 40]] * 224] * 224]}).encode()
    gc.callbacks.append(count)
    try:
        parsed = json_body(body)
    finally:
        gc.callbacks.remove(count)
    assert len(parsed["instances"][0]) == 224
    assert collections == [] and gc.isenabled()
