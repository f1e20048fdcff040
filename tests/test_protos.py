"""services.protos: stubs are compiled by setup, never at import; a stale stub is an error naming the command."""
from __future__ import annotations

import os

import pytest

from services import protos


def test_every_proto_has_a_current_stub_and_loads():
    assert not protos.stale()
    assert protos.load("tfs_config.batching_parameters_pb2").BatchingParameters.DESCRIPTOR.full_name == (
        "tensorflow.serving.BatchingParameters")
    assert protos.load("mushroom.v1.classifier_pb2").ClassifyRequest


def test_a_stale_stub_is_an_error_not_a_compile(tmp_path, monkeypatch):
    root, out = tmp_path / "protos", tmp_path / "gen"
    (root / "x").mkdir(parents=True)
    proto = root / "x" / "thing.proto"
    proto.write_text('syntax = "proto3"; package x; message Thing { int32 n = 1; }\n')
    monkeypatch.setattr(protos, "PROTO_ROOT", root)
    monkeypatch.setattr(protos, "OUT", out)
    with pytest.raises(RuntimeError, match=r"x/thing.proto are missing or older .*python -m services.protos"):
        protos.load("x.thing_pb2")
    assert not out.exists(), "load never compiles"
    protos.generate()
    assert protos.stale() == []
    stub = out / "x" / "thing_pb2.py"
    os.utime(stub, (0, 0))  # the .proto changed after the stub was made
    assert protos.stale() == [proto]
