"""Unit tests of the gateway's pure parts: routing, the shared preprocessing contract, generated stubs, tensor conversion."""
from __future__ import annotations

import asyncio
import io

from collections import Counter

import numpy as np
import pytest
from PIL import Image

import training_job.preprocessing as contract
from services.gateway import preprocess, routing
from services.gateway.routing import Arm, RoutingError, RoutingTable


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


def _split(table, clients, available=None):
    return Counter(routing.choose(table, c, available).target for c in clients)


def test_split_converges_to_the_weights_within_two_points():
    table = routing.parse_assignments(["stable=90", "canary=10"])
    counts = _split(table, [f"client-{i}" for i in range(20_000)])
    assert abs(counts["canary"] / 20_000 - 0.10) < 0.02


def test_sticky_clients_and_a_weight_shift_moves_few_clients():
    clients = [f"c{i}" for i in range(5_000)]
    before = routing.parse_assignments(["1=90", "2=10"])
    after = routing.parse_assignments(["1=80", "2=20"])
    first = {c: routing.choose(before, c).target for c in clients}
    assert first == {c: routing.choose(before, c).target for c in clients}  # sticky
    moved = sum(first[c] != routing.choose(after, c).target for c in clients)
    assert moved / len(clients) < 0.15  # ~10 % must move; a modulo hash would move far more
    assert all(first[c] == "1" for c in clients if routing.choose(after, c).target == "1")  # only 1 -> 2 moves


def test_unavailable_version_share_is_spread_over_the_rest():
    table = routing.parse_assignments(["1=50", "2=25", "3=25"])
    counts = _split(table, [f"u{i}" for i in range(8_000)], available={1, 3})
    assert set(counts) == {"1", "3"}
    assert abs(counts["1"] / 8_000 - 2 / 3) < 0.03
    assert routing.choose(table, "x", available_versions=set()) is None


@pytest.mark.parametrize("items, code", [
    (["stable"], "bad_routing"), (["a=-1"], "bad_routing"), (["a=x"], "bad_routing"), (["a=0"], "bad_routing"),
    (["a=1", "a=2"], "bad_routing"), (["bad-name=1"], "bad_routing"), (["a=nan"], "bad_routing"),
])
def test_bad_tables_are_refused(items, code):
    with pytest.raises(RoutingError) as err:
        routing.parse_assignments(items)
    assert err.value.code == code


def test_routing_to_a_version_that_is_not_available_is_refused():
    table = RoutingTable((Arm("3", 90), Arm("4", 10)), shadow="5")
    with pytest.raises(RoutingError) as err:
        routing.validate(table, available_versions={3})
    assert err.value.code == "version_unavailable"


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
