"""The local stack (devstack): real Redis, model server, gateway and Prometheus on free loopback ports serving
the session's published model as versions 1 and 2; traffic over HTTP and gRPC; the gateway's latency histogram with
per-version labels read back from Prometheus' HTTP API; `scripts/stack.py down` leaves no process behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from devstack.demo_report import Answer, demo_photos, format_report, run_demo
from devstack.launch import Ports, Stack, latest_run, new_run_dir, start_stack, stop_stack
from devstack.processes import group_members, port_is_free
from tests.gateway_harness import http_request
from tests.support import free_port
from training_job.paths import PROJECT_ROOT

MODEL = "mushrooms"


def start_test_stack(published_model, root):
    """A stack under ``root``: its registry (made on the first start) and ``var/run`` with a new run folder."""
    registry = root / "registry"
    for version in (1, 2):
        if not (registry / MODEL / str(version)).exists():
            shutil.copytree(published_model.version_dir, registry / MODEL / str(version))
    ports = Ports(*(free_port() for _ in range(7)))
    run_dir = new_run_dir(root / "var" / "run")
    return start_stack(registry, MODEL, run_dir, ports, scrape_interval_s=1.0, admin_token="stack-test-token")


@pytest.fixture(scope="module")
def stack(published_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    stack = start_test_stack(published_model, root)
    yield stack
    stop_stack(stack)


def prometheus_query(stack: Stack, query: str) -> list[dict]:
    url = f"{stack.urls['Prometheus']}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_run_folder_records_pids_ports_and_logs(stack):
    assert latest_run(stack.run_dir.parent) == stack.run_dir.resolve()
    loaded = Stack.load(stack.run_dir)
    assert set(loaded.processes) == {"redis", "model_server", "gateway", "prometheus"}
    assert loaded.ports == stack.ports and loaded.admin_token == "stack-test-token"
    assert sorted(loaded.alive()) == sorted(loaded.processes)
    assert "--prefer_tflite_model" in loaded.processes["model_server"].argv  # model.tflite when it agrees
    for record in loaded.processes.values():
        assert (stack.run_dir / f"{record.name}.log").exists()


def test_demo_photos_classified_over_http_and_grpc(stack, published_model):
    labels = json.loads((published_model.version_dir / "assets.extra" / "labels.json").read_text())["labels"]
    photos = demo_photos(published_model.version_dir)[:8]
    assert photos, "the published model's manifest has no demo rows"
    http_answers, grpc_answers, problem = run_demo(stack.urls["gateway"], stack.urls["gateway gRPC"], photos)
    assert problem == ""
    assert [a.top for a in http_answers] == [a.top for a in grpc_answers]
    assert all(a.top in labels for a in http_answers)
    report = format_report(http_answers, grpc_answers, problem, stack.urls, stack.run_dir)
    assert "accuracy over HTTP" in report and "(score=0." in report and stack.urls["Prometheus"] in report


def test_prometheus_scrapes_gateway_latency_per_version(stack, published_model):
    photos = demo_photos(published_model.version_dir)[:4]
    for i, photo in enumerate(photos * 3):
        request = urllib.request.Request(f"{stack.urls['gateway']}/v1/classify", data=photo.path.read_bytes(),
                                         headers={"Content-Type": "application/octet-stream",
                                                  "X-Client-Id": f"stack-test-{i}"}, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
    deadline = time.monotonic() + 60
    series, up = [], {}
    while time.monotonic() < deadline:  # both targets scraped at least once since the traffic, and both up
        series = [s["metric"] for s in prometheus_query(stack, '{job="gateway", __name__="mushroom_gateway_request_seconds_bucket"}')
                  if any("version" in k and v in ("1", "2") for k, v in s["metric"].items())]
        up = {s["metric"]["job"]: s["value"][1] for s in prometheus_query(stack, "up")}
        if series and up == {"gateway": "1", "model-server": "1"}:
            break
        time.sleep(1)
    assert series, prometheus_query(stack, 'count by (__name__) ({job="gateway"})')
    assert up == {"gateway": "1", "model-server": "1"}


def test_down_command_leaves_no_process_behind(published_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack-down")
    stack = start_test_stack(published_model, root)
    env = {**os.environ, "MUSHROOM_VAR": str(root / "var")}
    result = subprocess.run([sys.executable, "scripts/stack.py", "down"], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    stop_stack(stack)  # reaps our Popen handles; a no-op for processes already stopped
    assert result.returncode == 0, result.stderr
    assert "Stopped" in result.stdout
    assert Stack.load(stack.run_dir).alive() == []
    assert all(group_members(record.pid) == [] for record in stack.processes.values())
    for name in ("redis", "model_server_rest", "gateway_http", "prometheus"):
        assert port_is_free(getattr(stack.ports, name))


def test_feedback_on_an_answer_given_before_the_stack_restarted_is_taken(published_model, tmp_path_factory):
    """Redis keeps its state from one run of the stack to the next (feedback tallies, the routing table); the
    gateway's feedback secret now does too, kept beside it: feedback on an answer given before `make stop && make
    run` was refused as forged (403), each gateway having made up a secret of its own."""
    root = tmp_path_factory.mktemp("stack-restart")
    photo = demo_photos(published_model.version_dir)[0]
    stack = start_test_stack(published_model, root)
    try:
        status, answer, _ = http_request(stack.urls["gateway"], "POST", "/v1/classify", photo.path.read_bytes(),
                                         "image/jpeg")
        assert status == 200, answer
    finally:
        stop_stack(stack)
    stack = start_test_stack(published_model, root)
    try:
        feedback = {"feedback_token": answer["feedback_token"], "true_label": answer["predictions"][0]["label"]}
        status, recorded, _ = http_request(stack.urls["gateway"], "POST", "/v1/feedback", feedback)
    finally:
        stop_stack(stack)
    assert status == 200, recorded
    assert recorded["request_id"] == answer["request_id"] and recorded["correct"] is True
    secrets = list((root / "var" / "run").glob("feedback_secret"))
    assert len(secrets) == 1 and secrets[0].stat().st_mode & 0o777 == 0o600


def test_a_manifest_without_demo_photos_shows_its_test_photos_and_an_empty_one_says_so(tmp_path):
    """A small folder's demo photos can all be lent to the splits training needs (prepare): the demo then classifies
    the test photos, which the model never trained on either, and says so; with no photo at all the report said
    "accuracy over HTTP: 0.0%"."""
    from training_job.dataset import ManifestRow, write_manifest

    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"not read")
    version = tmp_path / "1"
    rows = [ManifestRow(str(photo), "amanita_muscaria", "a" * 64, split, 1, 1, 8) for split in ("train", "test")]
    write_manifest(rows, version / "assets.extra" / "manifest.csv")
    photos = demo_photos(version)
    assert [(p.path, p.split) for p in photos] == [(photo, "test")]
    shown = format_report([Answer(photos[0], [{"label": "amanita_muscaria", "score": 1.0}], 0.01)], [], "", {},
                          tmp_path)
    assert shown.startswith("Test split (no demo photos): 1 photo the model never trained on")

    write_manifest(rows[:1], version / "assets.extra" / "manifest.csv")
    assert demo_photos(version) == []
    empty = format_report([], [], "", {}, tmp_path)
    assert "no photo to classify" in empty and "0.0%" not in empty


def test_generated_prometheus_config_passes_promtool(tmp_path):
    from devstack.configs import MONITORING_PATH, write_prometheus_config

    config = tmp_path / "prometheus.yml"
    write_prometheus_config(config, "127.0.0.1:8080", "127.0.0.1:8501", scrape_interval_s=1.0)
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert MONITORING_PATH in config.read_text()


def test_the_gateway_command_line_is_written_out_not_guessed_from_help(monkeypatch, tmp_path):
    """launch.gateway_argv names the gateway's flags as services/gateway/main.py defines them, with no process run
    to read --help first."""
    from services.gateway.main import build_parser
    from devstack import launch

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"gateway_argv ran a process: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    ports = launch.Ports(redis=6391, model_server_grpc=8502, gateway_http=8081, gateway_grpc=50052)
    stack = launch.Stack(tmp_path, "mushrooms", ports, admin_token="t")
    argv = launch.gateway_argv(stack, tmp_path / "registry")
    assert argv[1:3] == ["-m", "services.gateway"]
    args = build_parser().parse_args(argv[3:])
    assert (args.host, args.http_port, args.grpc_port) == ("127.0.0.1", 8081, 50052)
    assert (args.model_server, args.redis_url) == ("127.0.0.1:8502", "redis://127.0.0.1:6391/0")
    assert (args.model_name, args.model_base_path) == ("mushrooms", str((tmp_path / "registry" / "mushrooms").resolve()))


def test_make_run_passes_a_photo_folder_with_spaces_as_one_argument():
    """`make run DATA="my photos"`: the folder reaches `scripts/stack.py up --data` whole (make -n prints the
    command it would run; the shell splits it as it would run it)."""
    import shlex

    printed = subprocess.run(["make", "-n", "run", "DATA=/tmp/my mushroom photos"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=60).stdout
    [command] = [line for line in printed.splitlines() if "scripts/stack.py up" in line]
    argv = shlex.split(command)
    assert argv[argv.index("--data") + 1] == "/tmp/my mushroom photos"


def test_a_port_in_use_is_named_with_the_flag_and_a_free_port_to_use(tmp_path):
    """Something else on the gateway's port (another web server on 8080, say): the stack starts nothing and says
    which flag moves it, with a port free now, and how `make run` passes it."""
    import socket

    from devstack.health import StackError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(StackError) as refused:
            start_stack(tmp_path / "registry", "mushrooms", tmp_path / "run", Ports(gateway_http=port))
    finally:
        taken.close()
    message = str(refused.value)
    assert f"gateway_http={port}" in message and "--gateway-http-port " in message, message
    suggested = int(message.split("--gateway-http-port ")[1].split()[0].strip("`'\""))
    assert suggested != port and port_is_free(suggested)
    assert "make run STACK_ARGS=" in message
    printed = subprocess.run(["make", "-n", "run", "STACK_ARGS=--gateway-http-port 18080"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=60).stdout
    assert "--gateway-http-port 18080" in printed
