"""Unit tests of the gateway's pure parts: the shared preprocessing contract, generated stubs, tensor conversion."""
from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

import training_job.preprocessing as contract
from services.gateway import preprocess


def test_gateway_uses_the_training_jobs_preprocessing_function_object():
    assert preprocess.preprocess_bytes is contract.preprocess_bytes
    assert preprocess.PREPROCESSING_VERSION == contract.PREPROCESSING_VERSION


def test_preprocessor_runs_the_contract_and_refuses_bad_photos():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 10, 10)).save(buf, "JPEG")
    pre = preprocess.Preprocessor(contract.Limits(max_bytes=1_000_000, max_pixels=1_000_000))
    try:
        pixels = asyncio.run(pre.pixels(buf.getvalue()))
        np.testing.assert_array_equal(pixels, contract.preprocess_bytes(buf.getvalue()))
        with pytest.raises(contract.InvalidImage) as err:
            asyncio.run(pre.pixels(b"<html><body>hi</body></html>"))
        assert err.value.code == "not_an_image"
    finally:
        pre.close()


def test_generated_stubs_and_tensor_round_trip():
    from services.gateway.api_pb import pb, pb_grpc
    from services.gateway.tf_serving_api import pixels_to_tensor, tensor_to_numpy, tensor_pb2, types_pb2

    assert hasattr(pb_grpc, "ClassifierStub")
    assert pb.ClassifyRequest(label="stable").WhichOneof("override") == "label"
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(tensor_to_numpy(pixels_to_tensor(pixels)), pixels)
    probs = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[0.25, 0.75])
    probs.tensor_shape.dim.add(size=1)
    probs.tensor_shape.dim.add(size=2)
    np.testing.assert_allclose(tensor_to_numpy(probs), [[0.25, 0.75]])
