"""bench/c1_stages.py: every rung answers the calls h2load sends it, and a rung whose calls fail is not timed as if
they had been answered (h2load takes a gRPC error, HTTP 200 with a grpc-status trailer, for an answer)."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from bench import c1_stages
from bench.common import RESULTS_DIR
from bench.model_server_bench import predict_requests
from services.model_server.tflite_servable import TfLiteServable
from training_job.tiny_model import write_tiny_model_with_tflite


def test_the_smallest_run_times_every_rung_and_the_stages_between():
    name = "c1-stages-test"
    assert c1_stages.main(["--rounds", "1", "--calls", "20", "--result-name", name]) == 0
    result = json.loads((RESULTS_DIR / f"{name}.json").read_text())
    (RESULTS_DIR / f"{name}.json").unlink()
    rungs = (*c1_stages.LADDER, *c1_stages.SERVERS)
    assert set(result["median_p50_ms"]) == set(rungs) and all(result["median_p50_ms"][r] > 0 for r in rungs)
    assert set(result["stage_ms"]) == {"parse_minus_grpc_floor", "thread_hop_minus_parse",
                                       "tiny_model_minus_thread_hop", "model_server_minus_tiny_model"}
    p50 = result["p50_ms"]
    assert result["stage_ms"]["model_server_minus_tiny_model"] == pytest.approx(p50["model_server"][0]
                                                                                - p50["tiny_model"][0])


class FailingRung(c1_stages.Rung):
    async def predict(self, request, context):
        await context.abort(grpc.StatusCode.INTERNAL, "this rung fails every call")


def test_a_rung_whose_calls_fail_is_refused(tmp_path):
    version_dir = write_tiny_model_with_tflite(tmp_path / "registry" / "tiny" / "1")
    pixels = np.zeros((1, 224, 224, 3), np.uint8)
    servable = TfLiteServable("tiny", 1, version_dir)
    rung = FailingRung("parse", servable, servable.run("serving_default", {"images": pixels}, ()))
    with c1_stages.serving(rung) as target, pytest.raises(RuntimeError, match="the rung answered 0"):
        c1_stages.rung_p50(rung, target, predict_requests("tiny", pixels)[0], 10, tmp_path)
