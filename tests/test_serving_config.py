"""The operator side of TF Serving's version policy: the stack's model config pins the versions that are routed or
labelled with a `specific` policy, so a newer folder -- even one that never loads -- costs no routed version."""
from __future__ import annotations

import shutil

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from devstack import configs
from devstack.health import StackError
from devstack.pinning import pin
from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until
from training_job.tiny_model import write_tiny_model
from training_job.publish import publish_dir

AVAILABLE, END = ModelVersionStatus.AVAILABLE, ModelVersionStatus.END


def test_served_versions_are_the_newest_two_the_pinned_and_the_labelled():
    assert configs.served_versions([1, 2, 3, 4, 5]) == [4, 5]
    assert configs.served_versions([1, 2, 3, 4, 5], pinned=[2], labels={"stable": 1}) == [1, 2, 4, 5]
    assert configs.served_versions([]) == []


def test_the_config_text_parses_with_the_serving_protos(tmp_path):
    text = configs.model_config_text(MODEL, tmp_path, [1, 3], {"stable": 1})
    [model] = text_format.Parse(text, model_server_config_pb2.ModelServerConfig()).model_config_list.config
    assert list(model.model_version_policy.specific.versions) == [1, 3] and dict(model.version_labels) == {"stable": 1}
    [empty] = text_format.Parse(configs.model_config_text(MODEL, tmp_path), model_server_config_pb2.ModelServerConfig()
                                ).model_config_list.config
    assert empty.model_version_policy.latest.num_versions == configs.NEWEST_SERVED  # the first publish is served


def fake_run(tmp_path, versions_on_disk):
    base = tmp_path / "registry" / MODEL
    for v in versions_on_disk:
        (base / str(v)).mkdir(parents=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    configs.write_model_config(run_dir / "models.config", MODEL, base)
    return run_dir, base


def test_pinning_is_additive_and_never_drops_a_labelled_or_newest_version(tmp_path):
    run_dir, base = fake_run(tmp_path, [1, 2])
    assert configs.read_model_config(run_dir / "models.config")[2] == [1, 2]
    (base / "3").mkdir()
    assert pin(run_dir)[0] == [1, 2, 3]  # version 1 was served: it stays until unpinned
    assert pin(run_dir, labels={"stable": 1})[0] == [1, 2, 3]
    with pytest.raises(StackError, match="label"):
        pin(run_dir, unpin=[1])
    with pytest.raises(StackError, match="newest"):
        pin(run_dir, unpin=[3])
    assert pin(run_dir, labels={"stable": 2})[0] == [1, 2, 3]
    assert pin(run_dir, unpin=[1])[0] == [2, 3]


def test_a_label_moves_only_to_a_version_already_served(tmp_path):
    """TF Serving moves an existing label only to an AVAILABLE version, and refuses the whole config otherwise, so
    serving a version and moving a label onto it in one edit would never apply: the version is pinned first."""
    run_dir, base = fake_run(tmp_path, [1, 2, 3, 4])
    assert pin(run_dir, labels={"stable": 3})[0] == [3, 4]  # a new label: it may wait for its version
    with pytest.raises(StackError, match=r"pin 1 first"):
        pin(run_dir, labels={"stable": 1})
    assert configs.read_model_config(run_dir / "models.config")[2:] == ([3, 4], {"stable": 3})  # unchanged
    assert pin(run_dir, add=[1])[0] == [1, 3, 4]
    assert pin(run_dir, labels={"stable": 1})[1] == {"stable": 1}


def test_a_version_the_gateway_still_routes_to_cannot_be_unpinned(tmp_path):
    from services.rollout.serving_config import routed_versions

    run_dir, base = fake_run(tmp_path, [1, 2])
    (base / "3").mkdir()
    pin(run_dir)
    # GET /v1/admin/routing of a gateway splitting "stable" (version 1) 90/10 with version 2, shadowing "canary" (3)
    routing = {"weights": {"stable": 90.0, "2": 10.0}, "shadow": "canary",
               "resolved": {"stable": 1, "2": 2, "canary": 3}, "effective": {"1": 90.0, "2": 10.0}}
    assert routed_versions(routing) == {1, 2, 3}
    assert routed_versions({"weights": {"1": 100.0, "2": 0.0}, "shadow": 2, "resolved": {"1": 1, "2": 2},
                            "effective": {"1": 100.0}}) == {1, 2}
    with pytest.raises(StackError, match=r"versions \[1\] still get traffic"):
        pin(run_dir, unpin=[1], routed=routed_versions(routing))
    assert pin(run_dir, unpin=[1], routed={2, 3})[0] == [2, 3]


def test_a_broken_new_version_costs_no_pinned_version_on_a_real_server(tmp_path):
    models_dir = tmp_path / "registry"
    for bias in (0.0, 1.0):
        publish_dir(lambda d, b=bias: write_tiny_model(d, bias=b), models_dir, MODEL)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    configs.write_model_config(run_dir / "models.config", MODEL, models_dir / MODEL)
    # a failed load is retried every --load_retry_interval_micros (TF Serving's minute by default): 0 gives up at once
    server = start_server(models_dir, run_dir / "models.config", "--model_config_file_poll_wait_seconds=1",
                          "--load_retry_interval_micros=0")
    try:
        wait_until(lambda: all(version_states(server.grpc_target, MODEL).get(v, (0,))[0] == AVAILABLE
                               for v in (1, 2)), what="versions 1 and 2")
        staging = models_dir / MODEL / ".tmp-empty"
        staging.mkdir()
        staging.rename(models_dir / MODEL / "3")  # an empty folder: it will never load
        pin(run_dir, [3])  # the operator adds it (as `scripts/stack.py pin 3`), routing still on 1 and 2
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(3, (0, ""))[1], timeout=60,
                   what="version 3's load error")
        states = version_states(server.grpc_target, MODEL)
        assert states[1][0] == AVAILABLE and states[2][0] == AVAILABLE  # under `latest 2`, version 1 was gone here
        shutil.rmtree(models_dir / MODEL / "3")
        publish_dir(lambda d: write_tiny_model(d, bias=2.0), models_dir, MODEL)  # version 3 again, a good one now
        pin(run_dir, [3])
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(3, (0,))[0] == AVAILABLE, timeout=60,
                   what="the good version 3")
        assert all(version_states(server.grpc_target, MODEL)[v][0] == AVAILABLE for v in (1, 2))
    finally:
        stop_server(server)


def test_a_retired_version_is_unloaded_while_the_kept_ones_and_labels_keep_serving(tmp_path):
    """The rollout controller's rewrite (serving_config.retire_versions) as a real model server polling its config
    sees it: the version it removes is unloaded, the stable, the newest and the labelled ones stay AVAILABLE."""
    import json
    import urllib.request

    from services.rollout.serving_config import retire_versions

    models_dir = tmp_path / "registry"
    for bias in (0.0, 1.0, 2.0, 3.0):
        publish_dir(lambda d, b=bias: write_tiny_model(d, bias=b), models_dir, MODEL)
    config = tmp_path / "models.config"
    config.write_text(configs.model_config_text(MODEL, models_dir / MODEL, [1, 2, 3, 4], {"old": 1}))
    server = start_server(models_dir, config, "--model_config_file_poll_wait_seconds=1")
    try:
        wait_until(lambda: all(version_states(server.grpc_target, MODEL).get(v, (0,))[0] == AVAILABLE
                               for v in (1, 2, 3, 4)), timeout=120, what="versions 1 to 4")
        # GET /v1/admin/routing of a gateway sending everything to the stable version 3
        routing = {"weights": {"3": 100.0}, "shadow": None, "resolved": {"3": 3}, "effective": {"3": 100.0}}
        assert retire_versions(config, MODEL, stable=3, routing=routing) == [2]
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(2, (END,))[0] == END, timeout=60,
                   what="version 2 unloaded")
        states = version_states(server.grpc_target, MODEL)
        assert all(states[v][0] == AVAILABLE for v in (1, 3, 4))
        with urllib.request.urlopen(f"{server.rest_url}/v1/models/{MODEL}/labels/old/metadata",
                                    timeout=10) as response:
            assert json.loads(response.read())["model_spec"]["version"] == "1"
    finally:
        stop_server(server)
