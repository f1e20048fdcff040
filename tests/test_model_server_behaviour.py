"""Our model server beyond the conformance suite: labels and config reload, batching, flags, config parsing."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    model_management_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from services.model_server.config import BatchingParameters, ConfigError, MonitoringConfig
from services.model_server.source import aspired_versions
from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from training_job.tiny_model import write_tiny_model
from training_job.publish import publish_dir

AVAILABLE = ModelVersionStatus.AVAILABLE


def publish_tiny(models_dir, model=MODEL, bias=0.0) -> int:
    return publish_dir(lambda d: write_tiny_model(d, bias=bias), models_dir, model)[0]


def predict(stub, model=MODEL, label=None, version=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if label:
        request.model_spec.version_label = label
    if version:
        request.model_spec.version.value = version
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 224, 224, 3), np.uint8)))
    return stub.Predict(request, timeout=30).model_spec.version.value


def reload(target, config_text: str) -> model_management_pb2.ReloadConfigResponse:
    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(config_text, request.config)
    with grpc.insecure_channel(target) as channel:
        return model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=60)


def config_text(models: dict, labels: dict[str, int] | None = None) -> str:
    """Labels apply to MODEL only."""
    parts = []
    for name, base in models.items():
        label_text = "".join(f' version_labels {{ key: "{k}" value: {v} }}'
                             for k, v in (labels or {}).items()) if name == MODEL else ""
        parts.append(f'config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" '
                     f'model_version_policy {{ all {{}} }}{label_text} }}')
    return "model_config_list { " + " ".join(parts) + " }"


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    models_dir = tmp_path_factory.mktemp("registry")
    publish_tiny(models_dir)
    config = models_dir / "models.config"
    write_config(config, {MODEL: models_dir / MODEL}, labels={MODEL: {"stable": 1}}, policy="all {}")
    (models_dir / "batching.config").write_text(
        "max_batch_size { value: 16 }\nbatch_timeout_micros { value: 20000 }\nnum_batch_threads { value: 1 }\n"
        "allowed_batch_sizes: 4\nallowed_batch_sizes: 16\n")
    (models_dir / "monitoring.config").write_text('prometheus_config { enable: true path: "/metrics" }')
    server = start_server(models_dir, config, "--enable_batching",
                          f"--batching_parameters_file={models_dir / 'batching.config'}",
                          f"--monitoring_config_file={models_dir / 'monitoring.config'}")
    wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="version 1")
    channel = grpc.insecure_channel(server.grpc_target)
    yield server, prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()
    stop_server(server)


def test_concurrent_requests_share_model_calls(batching_server):
    server, stub = batching_server
    versions, errors = [], []

    def call():
        try:
            versions.append(predict(stub))
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and versions == [1] * 24
    text = urllib.request.urlopen(f"{server.rest_url}/metrics", timeout=10).read().decode()
    count = float(re.search(r'processed_batch_size_count\{model_name="mushrooms"\} (\S+)', text).group(1))
    total = float(re.search(r'processed_batch_size_sum\{model_name="mushrooms"\} (\S+)', text).group(1))
    assert count < 24 and total >= 24, f"24 requests ran as {count} model calls"


def test_labels_move_and_config_reload_adds_and_removes_models(batching_server, tmp_path):
    server, stub = batching_server
    base = server.models_dir / MODEL
    assert predict(stub, label="stable") == 1
    v2 = publish_tiny(server.models_dir, bias=1.0)
    wait_until(lambda: version_states(server.grpc_target, MODEL).get(v2, (0,))[0] == AVAILABLE, what="v2")

    response = reload(server.grpc_target, config_text({MODEL: base}, {"stable": 1, "canary": v2}))
    assert response.status.error_code == 0, response.status.error_message
    assert (predict(stub, label="stable"), predict(stub, label="canary")) == (1, v2)

    assert reload(server.grpc_target, config_text({MODEL: base}, {"stable": v2})).status.error_code == 0
    assert predict(stub, label="stable") == v2
    with pytest.raises(grpc.RpcError) as err:
        predict(stub, label="canary")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # as TF Serving, even with --allow_version_labels_for_unavailable_models: an existing label moves only to an
    # AVAILABLE version, and the reload's error is the RPC's status
    with pytest.raises(grpc.RpcError) as refused:
        reload(server.grpc_target, config_text({MODEL: base}, {"stable": 99}))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "99" in refused.value.details()
    assert predict(stub, label="stable") == v2

    other_dir = tmp_path / "registry"
    publish_tiny(other_dir, model="other")
    added = reload(server.grpc_target, config_text({MODEL: base, "other": other_dir / "other"}, {"stable": v2}))
    assert added.status.error_code == 0
    assert predict(stub, model="other") == 1
    assert reload(server.grpc_target, config_text({MODEL: base}, {"stable": v2})).status.error_code == 0
    with pytest.raises(grpc.RpcError) as err:
        predict(stub, model="other")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_unknown_tf_serving_flag_gets_a_clear_message():
    result = subprocess.run([sys.executable, "-m", "services.model_server", "--platform_config_file=x.conf",
                             "--model_base_path=/tmp"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--platform_config_file is a tensorflow_model_server flag this server does not implement" in result.stderr


def test_help_documents_the_tf_serving_flags():
    out = subprocess.run([sys.executable, "-m", "services.model_server", "--help"], capture_output=True,
                         text=True).stdout
    for flag in ("--port", "--rest_api_port", "--model_name", "--model_base_path", "--model_config_file",
                 "--model_config_file_poll_wait_seconds", "--file_system_poll_wait_seconds", "--enable_batching",
                 "--batching_parameters_file", "--monitoring_config_file",
                 "--allow_version_labels_for_unavailable_models", "--tensorflow_intra_op_parallelism",
                 "--tensorflow_inter_op_parallelism"):
        assert flag in out


THREADS_PROBE = """
import os, sys
import tensorflow as tf
from services.model_server.core import configure_tensorflow_threads
configure_tensorflow_threads(2, int(sys.argv[1]), int(sys.argv[2]))  # as PredictionCore with two batch threads
print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads(),
      os.cpu_count())
"""


def test_tensorflow_thread_flags_win_over_the_automatic_share():
    def probe(intra: str, inter: str) -> list[int]:
        result = subprocess.run([sys.executable, "-c", THREADS_PROBE, intra, inter], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return [int(x) for x in result.stdout.split()]

    intra, inter, cpus = probe("0", "0")
    assert inter == 0
    assert intra == (cpus // 2 if cpus // 2 < cpus else 0)  # each of two concurrent calls gets its share of cores
    assert probe("3", "2")[:2] == [3, 2]  # explicit --tensorflow_*_op_parallelism are kept


def test_batching_and_monitoring_text_formats():
    params = BatchingParameters.from_text(
        "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 500 }  # comment\n"
        "max_enqueued_batches { value: 7 }\nnum_batch_threads { value: 2 }\n"
        "allowed_batch_sizes: 8\nallowed_batch_sizes: 32\npad_variable_length_inputs: true\n")
    assert (params.max_batch_size, params.batch_timeout_micros, params.max_enqueued_batches,
            params.num_batch_threads, params.allowed_batch_sizes, params.pad_variable_length_inputs) == (
        32, 500, 7, 2, [8, 32], True)
    with pytest.raises(ConfigError, match="allowed_batch_sizes"):
        BatchingParameters.from_text("max_batch_size { value: 32 } allowed_batch_sizes: 8")
    monitoring = MonitoringConfig.from_text('prometheus_config { enable: true, path: "/m" }')
    assert (monitoring.enable, monitoring.path) == (True, "/m")
    assert BatchingParameters.from_text("").max_batch_size == BatchingParameters().max_batch_size


@pytest.mark.parametrize("text, message", [
    ("max_batch_sise { value: 32 }", 'no field named "max_batch_sise"'),  # misspelled
    ("max_batch_size: 32", "max_batch_size"),  # TF Serving's wrapper types want { value: 32 }
    ('max_batch_size { value: "many" }', "max_batch_size"),
    ("pad_variable_length_inputs: 3", "pad_variable_length_inputs"),
    ("max_batch_size { value: 32 } } ", "}"),
])
def test_batching_files_are_refused_where_tf_serving_refuses_them(text, message):
    with pytest.raises(ConfigError, match="Error parsing text-format tensorflow.serving.BatchingParameters") as err:
        BatchingParameters.from_text(text, "batching.config")
    assert message in str(err.value) and "Invalid protobuf file: 'batching.config'" in str(err.value)


def test_newer_batching_fields_parse_and_large_batch_splitting_is_refused_by_name():
    params = BatchingParameters.from_text('max_batch_size { value: 16 } max_execution_batch_size { value: 16 } '
                                          'thread_pool_name { value: "batch" }')
    assert params.max_batch_size == 16
    with pytest.raises(ConfigError, match="enable_large_batch_splitting is not implemented"):
        BatchingParameters.from_text("enable_large_batch_splitting { value: true }")
    with pytest.raises(ConfigError, match='no field named "prometheus"'):
        MonitoringConfig.from_text("prometheus { enable: true }")


def test_version_policies_and_non_numeric_folders(tmp_path):
    for name in ("1", "2", "10", ".tmp-3", "4-partial", "abc"):
        (tmp_path / name).mkdir()
    (tmp_path / "11").write_text("a file, not a version")

    def aspired(policy: str) -> list[int]:
        model = model_server_config_pb2.ModelConfig(name="m", base_path=str(tmp_path))
        text_format.Parse(policy, model.model_version_policy)
        return sorted(aspired_versions(model))

    assert aspired("") == [10]
    assert aspired("latest { num_versions: 2 }") == [2, 10]
    assert aspired("specific { versions: 1 versions: 7 }") == [1]
    assert aspired("all {}") == [1, 2, 10]


def test_output_tensors_are_written_as_tf_serving_writes_them():
    """Typed fields by default (Tensor::AsProtoField), raw tensor_content for numbers and bools on request
    (AsProtoTensorContent); either way the proto reads back as the same array."""
    from services.model_server.grpc_api import tensor_proto

    for value in (np.float32([[0.25, 0.75]]), np.float32([0.5]), np.float32(0.5), np.array([True]),
                  np.array([[True, False]]), np.array([[b"boletus", b"amanita"]], dtype=object),
                  np.array([b"x"], dtype=object), np.zeros((2, 0), np.float32), np.arange(6, dtype=np.int64),
                  np.float32([[1, 2, 3]])[:, ::2], np.float32([np.nan]), np.float32([[-1.5e-30]]),
                  np.float64([2.5]), np.int32([7]), np.int64([-3]), np.uint8([9, 200]), np.int8([-4]),
                  np.uint16([65535]), np.uint32([2**32 - 1]), np.uint64([2**64 - 1]),
                  np.array(np.float32(0.25)), np.float32([])):
        typed, content = tensor_proto(value), tensor_proto(value, as_content=True)
        assert typed.tensor_content == b""
        assert typed.dtype == content.dtype == tf.make_tensor_proto(value).dtype
        for proto in (typed, content):
            np.testing.assert_array_equal(tf.make_ndarray(proto), value)
        if value.dtype != object:
            assert content.tensor_content == np.ascontiguousarray(value).tobytes()
    assert list(tensor_proto(np.float32([[0.25, 0.75]])).float_val) == [0.25, 0.75]
    assert list(tensor_proto(np.array([[True, False]])).bool_val) == [True, False]
    assert list(tensor_proto(np.uint8([9, 200])).int_val) == [9, 200]
    odd = np.array(["not bytes"], dtype=object)  # anything unusual: tf.make_tensor_proto's proto
    assert tensor_proto(odd).SerializeToString() == tf.make_tensor_proto(odd).SerializeToString()


def test_input_tensors_parse_as_tf_make_ndarray_parses_them():
    from services.model_server.grpc_api import ndarray

    for value in (np.zeros((1, 224, 224, 3), np.uint8), np.arange(6, dtype=np.float32).reshape(2, 3),
                  np.int64([[1, -2]]), np.float32([0.5]), np.zeros((0, 3), np.uint8), np.array([b"a"], dtype=object)):
        proto = tf.make_tensor_proto(value)
        parsed = ndarray(proto)
        assert parsed.dtype == value.dtype and parsed.shape == value.shape and np.array_equal(parsed, value)
    short = tf.make_tensor_proto(np.zeros((2, 3), np.uint8))
    short.tensor_content = short.tensor_content[:-1]  # wrong size: tf.make_ndarray's own error
    with pytest.raises((ValueError, TypeError)):
        ndarray(short)


def test_typed_float_fields_parse_as_tf_make_ndarray_parses_them():
    """float_val and double_val (what clients that build a TensorProto by hand fill, TF Serving's own answers too)
    are read from their packed bytes; every way a proto can carry them gives tf.make_ndarray's array."""
    from google.protobuf.internal import encoder
    from tensorflow.core.framework import tensor_pb2, types_pb2

    from services.model_server.grpc_api import ndarray

    rng = np.random.default_rng(3)

    def typed(values: np.ndarray, field: str, dtype: int) -> tensor_pb2.TensorProto:
        proto = tensor_pb2.TensorProto(dtype=dtype)
        for size in values.shape:
            proto.tensor_shape.dim.add(size=size)
        getattr(proto, field).extend(values.ravel().tolist())
        return proto

    photo = typed(rng.random((1, 224, 224, 3)).astype(np.float32), "float_val", types_pb2.DT_FLOAT)
    cases = [photo, typed(rng.random((3, 5)), "double_val", types_pb2.DT_DOUBLE),
             typed(np.float32(2.5), "float_val", types_pb2.DT_FLOAT),  # a scalar
             typed(np.zeros((0, 4), np.float32), "float_val", types_pb2.DT_FLOAT),
             typed(np.float32([1.5]), "float_val", types_pb2.DT_FLOAT)]
    filled = typed(np.float32([1.5, 2.5]), "float_val", types_pb2.DT_FLOAT)
    filled.tensor_shape.dim[0].size = 5  # fewer values than the shape: the last one repeated
    cases.append(filled)
    # the same photo's values split over two packed records, and sent unpacked (one record a value)
    values = np.asarray(photo.float_val, np.float32)
    head = photo.SerializeToString().split(b"\x2a", 1)[0]  # dtype and shape, before float_val (field 5, packed)
    split = head
    for part in (values[:1000], values[1000:]):
        split += b"\x2a" + encoder._VarintBytes(part.nbytes) + part.tobytes()
    unpacked = head + b"".join(b"\x2d" + v.tobytes() for v in values[:50])
    short = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    short.tensor_shape.dim.add(size=50)
    cases += [tensor_pb2.TensorProto.FromString(split), tensor_pb2.TensorProto.FromString(
        short.SerializeToString() + unpacked[len(head):])]
    for proto in cases:
        parsed, expected = ndarray(proto), tf.make_ndarray(proto)
        assert parsed.dtype == expected.dtype and parsed.shape == expected.shape, proto.tensor_shape
        np.testing.assert_array_equal(parsed, expected)


def test_float32_decimals_agree_with_printf_over_every_magnitude():
    """The vectorised WriteDecimal gives the same doubles as TF Serving's printf rule, for random float32 bit
    patterns (every exponent, subnormals included) and the awkward ones."""
    from services.model_server.json_tensor import _decimal_printf, float32_decimals

    rng = np.random.default_rng(12)
    bits = rng.integers(0, 2**32, 60_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([bits[np.isfinite(bits)], rng.random(20_000).astype(np.float32),
                             np.float32([0.1, 0.3, 3.0, 1.5, 2.5, 999999.5, 9999999, 9e6, 1e-5, 1e-45, 3.4028235e38,
                                         -0.0, 0.0, 123456.5])])
    expected = np.array([_decimal_printf(v) for v in values.tolist()])
    np.testing.assert_array_equal(float32_decimals(values), expected)
    special = float32_decimals(np.float32([np.nan, np.inf, -np.inf]))
    assert np.isnan(special[0]) and special[1] == np.inf and special[2] == -np.inf
    assert float32_decimals(np.float32([[0.1, 0.25]])).tolist() == [[0.1, 0.25]]
