"""`python -m services.rollout`: the progressive rollout controller (services/rollout/controller.py).

Needs: Redis (its state and lease), the gateway's admin API and an operator token for it (the audit records that
token's owner, e.g. ``rollout-controller``), the model server's REST port (version states), and optionally the
registry folder of the model (offline scores in assets.extra/metrics.json). Serves its own API on --http-port.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from services import event_loop
from services.rollout.policy import DEFAULT_POLICY, PolicyError, load_policy
from services.watched_file import WatchedFile

log = logging.getLogger("rollout")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m services.rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default=env("ROLLOUT_POLICY", ""),
                   help="policy file, YAML or JSON (ROLLOUT_POLICY; default: the built-in policy, see "
                   "--print-default-policy)")
    p.add_argument("--print-default-policy", action="store_true", help="print the default policy as YAML and exit")
    p.add_argument("--check-policy", action="store_true", help="validate --policy, print it and exit")
    p.add_argument("--redis-url", default=env("REDIS_URL", "redis://127.0.0.1:6379/0"), help="(REDIS_URL)")
    p.add_argument("--gateway-url", default=env("GATEWAY_URL", "http://127.0.0.1:8080"),
                   help="the gateway's HTTP API, for routing changes (GATEWAY_URL)")
    p.add_argument("--gateway-status-url", action="append", default=None,
                   help="a gateway replica whose figures count; repeat for every replica (default: --gateway-url; "
                   "the gateway keeps request figures per process)")
    p.add_argument("--gateway-status-dns", default=env("GATEWAY_STATUS_DNS", ""),
                   help="HOST:PORT whose every IPv4 address is a gateway replica to count, resolved at each tick, "
                   "e.g. a Kubernetes headless Service (GATEWAY_STATUS_DNS; overrides --gateway-status-url)")
    p.add_argument("--gateway-token", default=env("ROLLOUT_GATEWAY_TOKEN", ""),
                   help="the controller's operator token for the gateway's admin API (ROLLOUT_GATEWAY_TOKEN)")
    p.add_argument("--gateway-token-file", default=env("ROLLOUT_GATEWAY_TOKEN_FILE", ""),
                   help="file holding that token, e.g. a mounted Secret, read again when it changes "
                   "(ROLLOUT_GATEWAY_TOKEN_FILE)")
    p.add_argument("--model-server-rest", default=env("MODEL_SERVER_REST", "http://127.0.0.1:8501"),
                   help="the model server's REST address, for version states (MODEL_SERVER_REST)")
    p.add_argument("--model-name", default=env("MODEL_NAME", "mushrooms"), help="(MODEL_NAME)")
    p.add_argument("--model-base-path", default=env("MODEL_BASE_PATH", ""),
                   help="the model's registry folder, for the offline scores (MODEL_BASE_PATH; optional)")
    p.add_argument("--labels-config", default=env("ROLLOUT_LABELS_CONFIG", ""),
                   help="the model server's --model_config_file: route by the labels 'stable' and 'canary' and move "
                   "them in this file (the model server must poll it: --model_config_file_poll_wait_seconds) "
                   "(ROLLOUT_LABELS_CONFIG; default: route by version numbers)")
    p.add_argument("--serve-new-versions", default=env("ROLLOUT_SERVE_NEW_VERSIONS", ""),
                   help="the model server's --model_config_file, when it serves a 'specific' list of versions: "
                   "each newly published version is added to the list so that it loads and can be rolled out, and "
                   "with no rollout in progress the versions not among the newest two, not stable, not routed and "
                   "not labelled are removed so that it unloads them "
                   "(ROLLOUT_SERVE_NEW_VERSIONS; default: the model server's policy serves new versions itself)")
    p.add_argument("--host", default=env("ROLLOUT_HOST", "0.0.0.0"), help="(ROLLOUT_HOST)")
    p.add_argument("--http-port", type=int, default=int(env("ROLLOUT_HTTP_PORT", "8095")),
                   help="the controller's API and /metrics (ROLLOUT_HTTP_PORT, default 8095)")
    p.add_argument("--keepalive-timeout", type=float, default=float(env("KEEPALIVE_TIMEOUT_SECONDS", "15")),
                   help="seconds an idle HTTP connection stays open, which is also the most a client has to send a "
                   "complete request header, as for the gateway (KEEPALIVE_TIMEOUT_SECONDS, default 15)")
    p.add_argument("--operator-tokens", default=env("GATEWAY_OPERATOR_TOKENS", ""),
                   help="operator tokens for the controller's own API, the gateway's format "
                   "(GATEWAY_OPERATOR_TOKENS)")
    p.add_argument("--admin-token", default=env("GATEWAY_ADMIN_TOKEN", ""),
                   help="token of the operator 'admin' for the controller's API (GATEWAY_ADMIN_TOKEN)")
    p.add_argument("--lease-seconds", type=float, default=float(env("ROLLOUT_LEASE_SECONDS", "15")),
                   help="the lease's time to live: a dead controller is replaced after at most this long "
                   "(ROLLOUT_LEASE_SECONDS, default 15; at least 3 ticks)")
    p.add_argument("--identity", default=env("ROLLOUT_IDENTITY", "") or env("HOSTNAME", ""),
                   help="this controller's name in the lease and the history (default: the host name + pid)")
    return p


def read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path} holds no token")
    return token


def gateway_token(args: argparse.Namespace) -> Callable[[], str]:
    """The controller's operator token for the gateway as it is now: --gateway-token-file's is read again when the
    file changes (the gateway reads its operator tokens again too, so a rotated Secret reaches both); a file that
    does not read is an error at start, later it keeps the token read before."""
    if args.gateway_token_file:
        return WatchedFile(args.gateway_token_file, read_token, "the gateway token").current
    if not args.gateway_token:
        raise ValueError("the controller needs an operator token for the gateway (--gateway-token or "
                         "--gateway-token-file): it changes the routing only through the gateway's admin API")
    return lambda: args.gateway_token


async def supervise(name: str, step, interval: float, stopping: asyncio.Event, max_backoff: float = 30.0) -> None:
    """Runs ``step`` every ``interval`` seconds until stopping; a failure is logged (1st, 2nd, 4th ... in a row),
    counted and retried after min(interval * 2**n, max_backoff)."""
    from services.rollout import metrics

    failures = 0
    while not stopping.is_set():
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - supervised: logged, counted, retried
            failures += 1
            metrics.LOOP_FAILURES.inc()
            if failures & (failures - 1) == 0:
                log.warning("%s failed (%d in a row): %s: %s", name, failures, type(exc).__name__, exc,
                            exc_info=failures == 1)
            delay = min(interval * 2 ** failures, max(max_backoff, interval))
        else:
            if failures:
                log.info("%s recovered after %d failures", name, failures)
            failures = 0
            metrics.LAST_TICK.set_to_current_time()
            delay = interval
        try:
            await asyncio.wait_for(stopping.wait(), delay)
        except asyncio.TimeoutError:
            pass


async def serve(args: argparse.Namespace, policy) -> None:
    import aiohttp
    from aiohttp import web

    from services.gateway.operators import OperatorTokens
    from services.http_bodies import RUNNER_OPTIONS
    from services.http_stop import stop_serving
    from services.redis_pool import state_client
    from services.urls import without_password
    from services.rollout.clients import GatewayAdmin, ModelServerStates
    from services.rollout.controller import Controller
    from services.rollout.http_api import RolloutApi

    operators = OperatorTokens(args.operator_tokens or None, args.admin_token or None)
    token = gateway_token(args)
    lease_seconds = max(args.lease_seconds, 3 * policy.tick_seconds)
    redis = state_client(args.redis_url, socket_timeout=2.0)
    session = aiohttp.ClientSession()
    http_timeout = max(min(lease_seconds / 3, 10.0), 0.5)
    model_server = ModelServerStates(session, args.model_server_rest, args.model_name, timeout=http_timeout)
    labels = None
    if args.labels_config:
        from google.protobuf.text_format import ParseError

        from services.rollout.labels import LabelConfig, LabelsNotApplied

        labels = LabelConfig(args.labels_config, args.model_name, model_server)
        try:
            labels.current()  # a missing or unreadable file or model fails at start, not at the first rollout
        except (LabelsNotApplied, ParseError) as exc:
            raise ValueError(f"--labels-config: {exc}") from None
    serve_new = retire = None
    if args.serve_new_versions:
        from services.rollout.serving_config import retire_versions, serve_new_versions

        serve_new = functools.partial(serve_new_versions, args.serve_new_versions, args.model_name)
        serve_new()  # an unreadable file fails at start, not at the first tick
        retire = functools.partial(retire_versions, args.serve_new_versions, args.model_name)
    controller = Controller(
        redis, GatewayAdmin(session, args.gateway_url, token, args.gateway_status_url, timeout=http_timeout,
                                status_dns=args.gateway_status_dns or None),
        model_server, policy, args.model_name, args.model_base_path or None,
        args.identity and f"{args.identity}-{os.getpid()}", lease_seconds, labels=labels,
        serve_new_versions=serve_new, retire_versions=retire)
    closing = asyncio.Event()  # stopping: answers close their connections (services.http_stop)
    runner = web.AppRunner(RolloutApi(controller, operators, closing.is_set).app(), access_log=None,
                           keepalive_timeout=args.keepalive_timeout, **RUNNER_OPTIONS)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.http_port)
    try:
        await site.start()
    except BaseException:  # the port taken: what was opened closes, and the process exits saying why
        await runner.cleanup()
        await session.close()
        await redis.aclose()
        raise
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("rollout controller %s for %s on http://%s:%d: gateway %s, model server %s, redis %s, policy %s",
             controller.identity, args.model_name, args.host, args.http_port, without_password(args.gateway_url),
             without_password(args.model_server_rest), without_password(args.redis_url), args.policy or "default")
    try:
        await supervise("controller tick", controller.tick, policy.tick_seconds, stopping)
    finally:
        try:
            await controller.release_lease()  # a clean stop hands over at once
        except Exception as exc:  # noqa: BLE001 - the lease expires on its own anyway
            log.warning("lease not released: %s", exc)
        await stop_serving(runner, site, closing)
        await session.close()
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.print_default_policy:
        import yaml

        print(yaml.safe_dump(DEFAULT_POLICY, sort_keys=False), end="")
        return 0
    try:
        policy = load_policy(args.policy or None)
    except PolicyError as exc:
        print(f"error: bad rollout policy: {exc}", file=sys.stderr)
        return 2
    if args.check_policy:
        print(json.dumps(policy.to_json(), indent=2))
        return 0
    try:
        event_loop.run(serve(args, policy))
    except (OSError, ValueError) as exc:  # ports in use, unreadable token files
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
