"""Classify, Regress and MultiInference (services/model_server/inference.py) in-process, on the real manager and
prediction core with the tiny model: what a request holds while versions come and go."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from tensorflow_serving.apis import inference_pb2

from services.model_server.config import single_model_config
from services.model_server.core import PredictionCore
from services.model_server.errors import ServingError
from services.model_server.inference import CLASSIFY_METHOD, REGRESS_METHOD, Inference
from services.model_server.loader import LoadOptions, Loader
from services.model_server.manager import Manager
from training_job.tiny_model import write_tiny_model

MODEL = "m"


@pytest.fixture(scope="module")
def tiny_version(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("registry") / MODEL / "1")


def serving(version_dir) -> tuple[Manager, Inference]:
    """A manager serving version 1 of MODEL from ``version_dir``, and the Inference over it (batching off)."""
    manager = Manager()
    manager.set_config(single_model_config(MODEL, str(version_dir.parent)))
    manager.set_aspired_versions(MODEL, {1: Loader(MODEL, 1, version_dir, LoadOptions(warmup=False))})
    manager.manage_state()
    return manager, Inference(PredictionCore(manager, None, threads=2))


def multi_inference_request() -> inference_pb2.MultiInferenceRequest:
    request = inference_pb2.MultiInferenceRequest()
    example = request.input.example_list.examples.add()
    example.features.feature["mean_colour"].float_list.value.extend([0.1, 0.2, 0.3])
    for signature, method in (("classify_mean_colour", CLASSIFY_METHOD), ("regress_mushroom_score", REGRESS_METHOD)):
        task = request.tasks.add()
        task.model_spec.name = MODEL
        task.model_spec.signature_name = signature
        task.method_name = method
    return request


def test_multi_inference_in_flight_finishes_on_its_version_when_that_version_is_unloaded(tiny_version):
    """TF Serving holds one ServableHandle for the whole request: a version unloaded between its tasks still
    answers them all."""
    async def scenario():
        manager, inference = serving(tiny_version)
        call = asyncio.create_task(inference.multi_inference(multi_inference_request()))
        await asyncio.sleep(0)  # the request resolved version 1 and its first task is running
        manager.set_aspired_versions(MODEL, {})  # the folder went away: version 1 is unloaded
        manager.manage_state()
        assert manager.status(MODEL)[0].servable is None
        response = await call
        inference.core.executor.shutdown()
        return response

    response = asyncio.run(scenario())
    assert [r.model_spec.version.value for r in response.results] == [1, 1]
    assert len(response.results[0].classification_result.classifications) == 1
    assert len(response.results[1].regression_result.regressions) == 1


def test_a_predict_s_inputs_are_read_once_their_names_are_the_signature_s(tiny_version):
    """Reading a gRPC request's inputs costs a turn of a Python loop each; their names are checked first, and a
    request of more names than its signature takes is refused without reading any."""
    async def scenario():
        manager, inference = serving(tiny_version)
        signature = manager.resolve(MODEL, None, None).signature("")
        read = []
        many = {f"x{i}": i for i in range(1000)}
        with pytest.raises(ServingError) as refused:
            await inference.core.predict("grpc_predict", MODEL, None, None, "", many, read=read.append)
        inference.core.executor.shutdown()
        return signature, refused.value, read

    signature, refused, read = asyncio.run(scenario())
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and "1000 names, among them 'x0'" in refused.message
    assert read == [] and len(signature.inputs) < 1000
