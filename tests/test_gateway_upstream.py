"""upstream.py against an in-process fake PredictionService/ModelService (grpc.aio): the one mocked module test."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from services.gateway.tf_serving_api import (
    get_model_status_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc, tensor_to_numpy,
)
from services.gateway.upstream import ModelServerClient, UpstreamError


class FakeServing(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.calls = 0
        self.seen: list[predict_pb2.PredictRequest] = []

    async def Predict(self, request, context):
        self.calls += 1
        if self.calls <= self.fail_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if request.model_spec.version.value == 99:
            await context.abort(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(m, 99)")
        self.seen.append(request)
        pixels = tensor_to_numpy(request.inputs["images"])
        mean = float(pixels.mean()) / 255
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = request.model_spec.version.value or 7
        probs = response.outputs["probabilities"]
        probs.dtype = 1  # DT_FLOAT
        probs.tensor_shape.dim.add(size=1)
        probs.tensor_shape.dim.add(size=2)
        probs.float_val.extend([mean, 1 - mean])
        classes = response.outputs["classes"]
        classes.dtype = 7  # DT_STRING
        classes.tensor_shape.dim.add(size=1)
        classes.tensor_shape.dim.add(size=2)
        classes.string_val.extend([b"a", b"b"])
        for name, dtype, field, value in [("mushroom_score", 1, "float_val", 0.9), ("not_a_mushroom", 10, "bool_val", False)]:
            t = response.outputs[name]
            t.dtype = dtype
            t.tensor_shape.dim.add(size=1)
            getattr(t, field).append(value)
        return response

    async def GetModelStatus(self, request, context):
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state in [(6, get_model_status_pb2.ModelVersionStatus.END),
                               (7, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]:
            response.model_version_status.add(version=version, state=state)
        return response


async def _serve(fake):
    server = grpc.aio.server()
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(fake, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_predict_retries_unavailable_and_parses_outputs():
    async def scenario():
        fake = FakeServing(fail_first=2)
        server, port = await _serve(fake)
        client = ModelServerClient(f"127.0.0.1:{port}", "m", retries=3, backoff_seconds=0.01)
        pixels = np.full((224, 224, 3), 51, np.uint8)
        out = await client.predict(pixels, label="stable")
        assert fake.calls == 3 and out.version == 7 and out.labels == ["a", "b"]
        np.testing.assert_allclose(out.probabilities, [0.2, 0.8], atol=1e-6)
        assert out.mushroom_score == pytest.approx(0.9) and out.not_a_mushroom is False
        assert fake.seen[0].model_spec.version_label == "stable"
        assert tensor_to_numpy(fake.seen[0].inputs["images"]).shape == (1, 224, 224, 3)
        with pytest.raises(UpstreamError) as err:
            await client.predict(pixels, version=99)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert await client.available_versions() == {7}
        await client.close()
        await server.stop(None)

    asyncio.run(scenario())


def test_server_down_is_unavailable_after_retries():
    async def scenario():
        fake = FakeServing(fail_first=100)
        server, port = await _serve(fake)
        client = ModelServerClient(f"127.0.0.1:{port}", "m", retries=2, backoff_seconds=0.01)
        with pytest.raises(UpstreamError) as err:
            await client.predict(np.zeros((4, 4, 3), np.uint8))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and fake.calls == 3
        await client.close()
        await server.stop(None)

    asyncio.run(scenario())
