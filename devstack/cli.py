"""``scripts/stack.py up|down|status|pin``: the whole serving stack on this machine."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from devstack.demo_report import demo_photos, format_report, latest_version_dir, run_demo
from devstack.health import StackError
from devstack.launch import Ports, Stack, latest_run, new_run_dir, runs_root, start_stack, stop_stack
from training_job.paths import DEFAULT_MODEL_NAME, PROJECT_ROOT, default_registry, var_dir
from training_job.cli import print_any_file_name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/stack.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="train if the registry is empty, start everything, print the demo report",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    up.add_argument("--data", default=os.environ.get("DATA") or None,
                    help="photo folder with one sub-folder per class, passed to the training job ($DATA)")
    up.add_argument("--registry", type=Path, default=default_registry())
    up.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    up.add_argument("--scrape-interval", type=float, default=5.0, help="Prometheus scrape interval, seconds")
    up.add_argument("--no-tensorboard", action="store_true")
    up.add_argument("--rollout", action="store_true",
                    help="also start the rollout controller (python -m services.rollout): each newly published "
                    "version is rolled out and judged automatically")
    up.add_argument("--rollout-policy", type=Path, default=None,
                    help="its policy file (default: the built-in policy, deploy/rollout/policy.yaml)")
    for port in fields(Ports):
        up.add_argument(Ports.flag(port.name), type=int, default=port.default, dest=port.name)
    commands.add_parser("down", help="stop every process of the latest run folder")
    commands.add_parser("status", help="which processes of the latest run folder are alive")
    pin = commands.add_parser("pin", help="keep versions loaded in the running stack's model server (a `specific` "
                              "policy: the newest two, the pinned ones, the labelled ones); route only to these")
    pin.add_argument("versions", nargs="*", type=int, help="versions to add (e.g. a new one before routing to it)")
    pin.add_argument("--unpin", nargs="+", type=int, default=[], help="versions no longer needed (not routed!)")
    pin.add_argument("--label", action="append", default=[], metavar="NAME=VERSION", help="set a version label")
    pin.add_argument("--force", action="store_true", help="unpin without asking the gateway whether traffic is "
                     "still routed to those versions")
    return parser.parse_args(argv)


def gateway_routed_versions(run_dir: Path) -> set[int]:
    """The versions the running stack's gateway routes to; a StackError when it cannot be asked."""
    import json
    import urllib.request

    from services.rollout.serving_config import routed_versions

    stack = Stack.load(run_dir)
    request = urllib.request.Request(stack.urls["gateway"] + "/v1/admin/routing",
                                     headers={"Authorization": f"Bearer {stack.admin_token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return routed_versions(json.loads(response.read()))
    except OSError as exc:
        raise StackError(f"cannot read the gateway's routing table to check that no traffic goes to the versions "
                         f"to unpin ({exc}); --force unpins without checking") from None


def pin_versions(args: argparse.Namespace) -> int:
    from devstack.pinning import pin

    run_dir = latest_run()
    if run_dir is None:
        print("No stack run folder found: `make run` first.", file=sys.stderr)
        return 1
    labels = {}
    for item in args.label:
        name, _, version = item.partition("=")
        if not version.isdigit():
            print(f"--label wants NAME=VERSION, got {item!r}", file=sys.stderr)
            return 2
        labels[name] = int(version)
    routed: set[int] = set()
    if args.unpin and not args.force:
        routed = gateway_routed_versions(run_dir)
    served, labels = pin(run_dir, args.versions, args.unpin, labels, routed)
    print(f"The model server keeps versions {served} loaded (labels {labels or 'none'}); it re-reads "
          f"{run_dir / 'models.config'} every second.")
    return 0


def train_if_needed(registry: Path, model_name: str, data: str | None, run_dir: Path) -> None:
    if latest_version_dir(registry, model_name) is not None:
        print(f"Registry {registry / model_name} already holds a model: not training.")
        return
    argv = [sys.executable, "-m", "training_job", "run", f"--registry={registry}", f"--model_name={model_name}"]
    if data:
        argv.append(f"--data={data}")
    print(f"No model in {registry / model_name}: training ({' '.join(argv[1:])}); log in {run_dir / 'training.log'}")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    with open(run_dir / "training.log", "w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   cwd=PROJECT_ROOT)
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
    if process.wait() != 0 or latest_version_dir(registry, model_name) is None:
        raise StackError(f"training failed (exit {process.returncode}); see {run_dir / 'training.log'}")


def up(args: argparse.Namespace) -> int:
    previous = latest_run()
    if previous is not None and Stack.load(previous).alive():
        print(f"A stack is already running from {previous}: `make stop` first.", file=sys.stderr)
        return 1
    run_dir = new_run_dir(runs_root())
    train_if_needed(args.registry, args.model_name, args.data, run_dir)
    ports = Ports(**{f.name: getattr(args, f.name) for f in fields(Ports)})
    print(f"Starting Redis, the model server, the gateway{', the rollout controller' if args.rollout else ''}, "
          f"Prometheus{'' if args.no_tensorboard else ', TensorBoard'}"
          f" (logs in {run_dir}) ...")
    stack = start_stack(args.registry, args.model_name, run_dir, ports, args.scrape_interval,
                        None if args.no_tensorboard else var_dir() / "tensorboard", rollout=args.rollout,
                        rollout_policy=args.rollout_policy)
    photos = demo_photos(latest_version_dir(args.registry, args.model_name))
    urls = stack.urls
    http_answers, grpc_answers, grpc_problem = run_demo(urls["gateway"], urls["gateway gRPC"], photos)
    report = format_report(http_answers, grpc_answers, grpc_problem, urls, run_dir)
    (run_dir / "report.txt").write_text(report + "\n", errors="backslashreplace")  # photo names may not be UTF-8
    print()
    print(report)
    print(f"{'admin token':>18}: in {run_dir / 'admin_token'}")
    return 0


def down() -> int:
    run_dir = latest_run()
    if run_dir is None:
        print("No stack run folder found: nothing to stop.")
        return 0
    stack = Stack.load(run_dir)
    stopped = stop_stack(stack)
    left = stack.alive()
    if left:
        print(f"Still running after stop: {', '.join(left)}", file=sys.stderr)
        return 1
    print(f"Stopped {', '.join(stopped) if stopped else 'nothing (already stopped)'} from {run_dir}.")
    return 0


def status() -> int:
    run_dir = latest_run()
    if run_dir is None:
        print("No stack run folder found.")
        return 1
    stack = Stack.load(run_dir)
    alive = set(stack.alive())
    for name, record in stack.processes.items():
        print(f"{name:>14}: {'running' if name in alive else 'stopped'} (pid {record.pid}, log {record.log})")
    return 0 if alive == set(stack.processes) else 1


def main(argv: list[str] | None = None) -> int:
    print_any_file_name()
    args = parse_args(argv)
    try:
        if args.command == "up":
            return up(args)
        if args.command == "pin":
            return pin_versions(args)
        return down() if args.command == "down" else status()
    except StackError as error:
        print(f"stack: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
