"""Rollout timing: from publishing a new version to 100 % (a good version) and to its rollback (bad versions), under
the rollout controller's default policy (services/rollout/policy.py) with simulated traffic and user feedback.

Each scenario starts the local stack with the controller (devstack.launch.start_stack(rollout=True): Redis,
model server, gateway, controller, Prometheus) on free loopback ports over a registry of our own holding the tests'
tiny model as version 1, waits until the controller takes version 1 as stable, starts the traffic, publishes
version 2 and measures, from the publish: when the model server has it AVAILABLE, when the controller starts the
rollout, each step, and the promotion or the rollback (with the rule that fired).
  promote                 version 2 answers like version 1 (a good version)
  rollback_shadow         version 2's labels are rotated (a head trained on shuffled labels): its mirrored answers
                          disagree in the shadow step
  rollback_feedback       the same version under the default policy without its shadow step (a deployment that
                          mirrors nothing): the users' feedback catches it at 5 %

Traffic: --concurrency clients (8) POST /v1/classify back to back with 1,000 client ids (sticky A/B routing),
alternating a repeated photo (16, cached after their first answer) and a photo never sent before (a shared photo
with a unique JPEG comment: a cache miss, so the shadow is asked); after --feedback-rate of the answers (0.5) the
client sends feedback whose true label is what version 1 answers for that picture (asked of the model server
directly, so it costs the gateway's figures nothing): the users agree with the stable version.

The default policy holds each of its 5 steps 600 s, so a promotion takes at least 50 minutes by design.
--time-scale N divides every hold and the tick by N and --request-scale F multiplies every request and feedback
minimum by F (the p95 rule's never below 20 answers), for a quicker run; the result says which scales were used.
Writes bench/results/<--result-name>.json.

Usage: python -m bench.rollout_bench [--time-scale 1] [--request-scale 1] [--concurrency 8] [--feedback-rate 0.5]
                                     [--only promote,rollback_feedback,rollback_shadow] [--result-name rollout]
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import math
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from bench.common import machine_description, write_result
from bench.faults import Photos, base_photos, with_comment
from services.rollout.policy import DEFAULT_POLICY
from devstack.launch import Ports, new_run_dir, start_stack, stop_stack
from devstack.servers import free_port
from training_job.publish import publish_dir
from training_job.tiny_model import LABELS, write_tiny_model

MODEL = "mushrooms"
ADMIN_TOKEN = "rollout-bench-admin-token"
SHUFFLED = {"labels": LABELS[1:] + LABELS[:1]}
SCENARIOS = {  # name: (version 2's tiny model, whether the policy keeps its shadow step)
    "promote": ({"bias": 0.0}, True),
    "rollback_shadow": (SHUFFLED, True),
    "rollback_feedback": (SHUFFLED, False),
}


# The fewest answers a p95 is judged on however small the request scale: of fewer, the p95 is their slowest one,
# and one stall of a shared machine would roll a good version back.
P95_MIN_ANSWERS = 20


def scaled_policy(time_scale: float, request_scale: float) -> dict:
    """The default policy with holds and the tick divided by ``time_scale`` and every minimum count multiplied by
    ``request_scale`` (at least 1; the p95 rule's at least ``P95_MIN_ANSWERS``)."""
    policy = copy.deepcopy(DEFAULT_POLICY)
    scale = lambda n: max(1, math.ceil(n * request_scale))  # noqa: E731
    policy["tick_seconds"] = max(DEFAULT_POLICY["tick_seconds"] / time_scale, 0.2)
    for step in policy["steps"]:
        step["hold_seconds"] = step["hold_seconds"] / time_scale
        step["min_requests"] = scale(step["min_requests"])
    for params in policy["rules"].values():
        for name in ("min_requests", "min_feedback"):
            if name in params:
                params[name] = scale(params[name])
    latency = policy["rules"]["p95_latency"]
    latency["min_requests"] = max(latency["min_requests"], P95_MIN_ANSWERS)
    return policy


def without_shadow(policy: dict) -> dict:
    return {**policy, "steps": [s for s in policy["steps"] if s["weight"] > 0]}


def derived_default_seconds(seconds_to_outcome: float | None, events: list[dict], scaled: dict,
                            default: dict = DEFAULT_POLICY) -> float | None:
    """The time the outcome would take under ``default`` (the unscaled policy of the run): each hold the version went
    through counted at the default's length instead of the scaled one (the rest, detection and reaction, as
    measured)."""
    if seconds_to_outcome is None:
        return None
    held = sum(e["outcome"] in ("advance", "promote") for e in events)  # a step held to its end before each
    return seconds_to_outcome + sum(default["steps"][i]["hold_seconds"] - scaled["steps"][i]["hold_seconds"]
                                    for i in range(held))


def call(url: str, body: bytes | None = None, content_type: str = "application/json", token: str | None = None,
         headers: dict | None = None, timeout: float = 30.0) -> tuple[int | None, dict]:
    request = urllib.request.Request(url, data=body, headers={**(headers or {}), "Content-Type": content_type,
                                                              **({"Authorization": f"Bearer {token}"} if token
                                                                 else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except OSError:
        return None, {}


class Oracle:
    """The users' truth: what version 1 answers for a picture, asked of the model server's REST API directly."""

    def __init__(self, rest_url: str):
        self.url = f"{rest_url}/v1/models/{MODEL}/versions/1:predict"
        self.answers: dict[int, str] = {}
        self.lock = threading.Lock()

    def truth(self, base_index: int, photo: bytes) -> str:
        with self.lock:
            if base_index in self.answers:
                return self.answers[base_index]
        body = json.dumps({"signature_name": "predict_image_bytes",
                           "instances": [{"b64": base64.b64encode(photo).decode()}]}).encode()
        status, reply = call(self.url, body)
        if status != 200:
            raise RuntimeError(f"the model server's predict answered {status}")
        prediction = reply["predictions"][0]
        label = prediction["classes"][max(range(len(LABELS)), key=lambda i: prediction["probabilities"][i])]
        with self.lock:
            self.answers[base_index] = label
        return label


class Traffic:
    def __init__(self, gateway: str, photos: Photos, oracle: Oracle, concurrency: int, feedback_rate: float):
        self.gateway, self.photos, self.oracle = gateway, photos, oracle
        self.concurrency, self.feedback_rate = concurrency, feedback_rate
        self.sent = self.failed = self.feedback = 0
        self.per_version: dict[int, int] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(concurrency)]

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stopping.is_set():
            with self.lock:
                i = self.sent
                self.sent += 1
            if i % 2:  # a picture never sent before: new bytes of a shared photo
                base = (i // 2) % len(self.photos.bases)
                photo = with_comment(self.photos.bases[base], f"new-{id(self)}-{i}")
            else:  # a repeated photo (hot[k] is bases[k] with a fixed comment)
                base = (i // 2) % len(self.photos.hot)
                photo = self.photos.hot[base]
            status, answer = call(f"{self.gateway}/v1/classify", photo, "image/jpeg",
                                  headers={"X-Client-Id": f"user-{rng.randrange(1000)}"})
            if status != 200:
                with self.lock:
                    self.failed += 1
                self.stopping.wait(0.05)
                continue
            version = answer["model"]["version"]
            with self.lock:
                self.per_version[version] = self.per_version.get(version, 0) + 1
            if rng.random() < self.feedback_rate:
                truth = self.oracle.truth(base, self.photos.bases[base])
                call(f"{self.gateway}/v1/feedback", json.dumps({"feedback_token": answer["feedback_token"],
                                                                "true_label": truth}).encode())
                with self.lock:
                    self.feedback += 1

    def __enter__(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)


def rollout_status(url: str) -> dict:
    status, body = call(f"{url}/v1/rollout", token=ADMIN_TOKEN)
    return body if status == 200 else {}


def run_scenario(name: str, policy: dict, concurrency: int, feedback_rate: float, timeout: float) -> dict:
    model, with_shadow = SCENARIOS[name]
    default = DEFAULT_POLICY if with_shadow else without_shadow(DEFAULT_POLICY)
    policy = policy if with_shadow else without_shadow(policy)
    root = Path(tempfile.mkdtemp(prefix=f"rollout-bench-{name}-"))
    registry = root / "registry"
    publish_dir(lambda d: write_tiny_model(d), registry, MODEL)
    policy_file = root / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy))
    ports = Ports(*(free_port() for _ in range(8)))
    stack = start_stack(registry, MODEL, new_run_dir(root / "run"), ports, scrape_interval_s=5.0,
                        admin_token=ADMIN_TOKEN, rollout=True, rollout_policy=policy_file)
    urls = stack.urls
    try:
        deadline = time.monotonic() + 60
        while not (rollout_status(urls["rollout controller"]).get("state") or {}).get("stable"):
            if time.monotonic() > deadline:
                raise TimeoutError("the controller did not adopt version 1")
            time.sleep(0.2)
        photos = Photos(base_photos())
        oracle = Oracle(urls["model server REST"])
        with Traffic(urls["gateway"], photos, oracle, concurrency, feedback_rate) as traffic:
            time.sleep(1.0)  # the stable version's figures start before the publish
            published = time.monotonic()
            publish_dir(lambda d: write_tiny_model(d, **model), registry, MODEL)
            # When version 2 became AVAILABLE lies between the last poll that saw it not yet so and the first that
            # saw it; the controller's own start can fall in between.
            available_at, unavailable_at = None, 0.0
            while available_at is None and time.monotonic() - published < timeout:
                asked = time.monotonic() - published
                status, body = call(f"{urls['model server REST']}/v1/models/{MODEL}/versions/2")
                if status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE":
                    available_at = time.monotonic() - published
                else:
                    unavailable_at = asked
                    time.sleep(0.05)
            while time.monotonic() - published < timeout:
                state = rollout_status(urls["rollout controller"]).get("state") or {}
                if state.get("stable") == 2 or 2 in state.get("rejected", []):
                    break
                time.sleep(0.25)
            ended = time.monotonic() - published
        body = rollout_status(urls["rollout controller"])
    finally:
        stop_stack(stack)
        shutil.rmtree(root, ignore_errors=True)
    wall_at_publish = time.time() - (time.monotonic() - published)
    events = [{"outcome": e["outcome"], "step": e.get("step"), "rule": e.get("rule"), "reason": e["reason"],
               "seconds_after_publish": round(e["at"] - wall_at_publish, 2)}
              for e in reversed(body.get("history", [])) if e.get("version") == 2]
    final = next((e for e in reversed(events) if e["outcome"] in ("promote", "rollback")), None)
    seconds = final["seconds_after_publish"] if final else None
    return {"scenario": name, "outcome": final["outcome"] if final else "timeout", "rule": final and final["rule"],
            "seconds_to_outcome": seconds,
            "default_policy_seconds_derived": derived_default_seconds(seconds, events, policy, default),
            "shadow_step": with_shadow,
            "requests_per_second": round(traffic.sent / ended, 1),
            "seconds_to_available": available_at, "seconds_last_seen_unavailable": round(unavailable_at, 3),
            "seconds_watched": round(ended, 2), "events": events,
            "requests": traffic.sent, "failed": traffic.failed, "feedback": traffic.feedback,
            "answers_per_version": traffic.per_version}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-scale", type=float, default=1.0, help="divide every hold and the tick by this")
    parser.add_argument("--request-scale", type=float, default=1.0, help="multiply every minimum count by this")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--feedback-rate", type=float, default=0.5)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for an outcome (default: 3 x the policy's total hold + 120)")
    parser.add_argument("--result-name", default="rollout")
    args = parser.parse_args(argv)
    policy = scaled_policy(args.time_scale, args.request_scale)
    timeout = args.timeout or 3 * sum(s["hold_seconds"] for s in policy["steps"]) + 120
    results = []
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        result = run_scenario(name, policy, args.concurrency, args.feedback_rate, timeout)
        results.append(result)
        print(f"   {result['outcome']} ({result['rule'] or 'all steps passed'}) {result['seconds_to_outcome']} s "
              f"after the publish (AVAILABLE after {result['seconds_to_available']} s); {result['requests']} "
              f"requests, {result['feedback']} feedback, {result['failed']} failed", flush=True)
        for event in result["events"]:
            print(f"     {event['seconds_after_publish']:>8.1f} s  {event['outcome']:<8} {event['step'] or ''}"
                  f"{' [' + event['rule'] + ']' if event['rule'] else ''}", flush=True)
    write_result(args.result_name, {"machine": machine_description(), "time_scale": args.time_scale,
                                           "request_scale": args.request_scale, "concurrency": args.concurrency,
                                           "feedback_rate": args.feedback_rate, "policy": policy,
                                           "scenarios": results})
    return 0 if all(r["outcome"] != "timeout" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
