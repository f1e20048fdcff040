"""The model server, spoken to only through the TF Serving gRPC API (works against our server and real TF Serving).

One reused channel; ``Predict`` with a deadline and retries with exponential backoff on UNAVAILABLE; ``GetModelStatus``
tells which versions are AVAILABLE.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import grpc
import numpy as np

from services.gateway.tf_serving_api import (
    get_model_status_pb2, model_service_pb2_grpc, pixels_to_tensor, predict_pb2, prediction_service_pb2_grpc,
    tensor_to_numpy,
)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


@dataclass(frozen=True)
class ModelOutput:
    version: int
    labels: list[str]
    probabilities: np.ndarray  # float32 [C]
    mushroom_score: float
    not_a_mushroom: bool


class UpstreamError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ModelServerClient:
    def __init__(self, address: str, model_name: str, deadline_seconds: float = 5.0, retries: int = 3,
                 backoff_seconds: float = 0.05):
        self.address = address
        self.model_name = model_name
        self.deadline = deadline_seconds
        self.retries = retries
        self.backoff = backoff_seconds
        self.channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.enable_retries", 0),
            # reconnect within ~1 s once a restarted model server is back (gRPC default backoff grows to 120 s)
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)])
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    async def _with_retries(self, call, request):
        for attempt in range(self.retries + 1):
            try:
                return await call(request, timeout=self.deadline)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retries:
                    raise UpstreamError(exc.code(), exc.details() or str(exc.code())) from None
                await asyncio.sleep(self.backoff * 2**attempt * (0.5 + random.random()))

    async def predict(self, pixels: np.ndarray, version: int | None = None, label: str | None = None) -> ModelOutput:
        """One photo's uint8 pixels (H, W, 3) -> outputs of the version asked for (or the latest)."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = "serving_default"
        if version is not None:
            request.model_spec.version.value = version
        elif label is not None:
            request.model_spec.version_label = label
        request.inputs["images"].CopyFrom(pixels_to_tensor(pixels[None]))
        response = await self._with_retries(self.predictions.Predict, request)
        outputs = response.outputs
        try:
            return ModelOutput(
                version=int(response.model_spec.version.value),
                labels=[str(x) for x in tensor_to_numpy(outputs["classes"])[0]],
                probabilities=tensor_to_numpy(outputs["probabilities"])[0].astype(np.float32),
                mushroom_score=float(tensor_to_numpy(outputs["mushroom_score"]).reshape(-1)[0]),
                not_a_mushroom=bool(tensor_to_numpy(outputs["not_a_mushroom"]).reshape(-1)[0]),
            )
        except (KeyError, IndexError, ValueError) as exc:
            raise UpstreamError(grpc.StatusCode.INTERNAL, f"model outputs break the contract: {exc}") from None

    async def version_states(self) -> dict[int, str]:
        """{version: state name} from GetModelStatus (e.g. {3: "AVAILABLE", 4: "LOADING"})."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        response = await self._with_retries(self.models.GetModelStatus, request)
        return {int(v.version): get_model_status_pb2.ModelVersionStatus.State.Name(v.state)
                for v in response.model_version_status}

    async def available_versions(self) -> set[int]:
        return {v for v, state in (await self.version_states()).items() if state == "AVAILABLE"}

    async def close(self) -> None:
        await self.channel.close()
