"""json_worker.JsonWorker: JSON work below its threshold runs in place; above it, in a spawned worker process whose
death fails that request alone (INTERNAL) and not the next one, and which does not outlive a killed server."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from services.model_server.errors import ServingError
from services.model_server.json_worker import JsonWorker
from training_job.paths import PROJECT_ROOT


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
