"""`python -m services.gateway`: HTTP and gRPC classify in front of a TF-Serving-API model server."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger("gateway")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    def env(name: str, default: str) -> str:  # the one variable named in the flag's help
        return os.environ.get(name) or default

    p = argparse.ArgumentParser(
        prog="python -m services.gateway",
        description="Mushroom classifier gateway: HTTP JSON (/v1/classify, /openapi.json) and gRPC "
        "(mushroom.v1.Classifier) in front of a model server speaking the TF Serving API. Every flag can also be "
        "set by the environment variable named in its help.",
    )
    p.add_argument("--host", default=env("GATEWAY_HOST", "0.0.0.0"), help="listen address (GATEWAY_HOST)")
    p.add_argument("--http-port", type=int, default=int(env("GATEWAY_HTTP_PORT", "8080")),
                   help="HTTP port (GATEWAY_HTTP_PORT, default 8080)")
    p.add_argument("--grpc-port", type=int, default=int(env("GATEWAY_GRPC_PORT", "8090")),
                   help="gRPC port (GATEWAY_GRPC_PORT, default 8090; 0 = off)")
    p.add_argument("--model-server", default=env("GATEWAY_MODEL_SERVER", "127.0.0.1:8500"),
                   help="gRPC target of TF Serving or services.model_server: host:port, or several replicas as "
                   "dns:///<name>:port (every address the name resolves to) or ipv4:<a>:<port>,<b>:<port>, calls "
                   "spread over them in turn (GATEWAY_MODEL_SERVER)")
    p.add_argument("--explain-model-server", default=env("GATEWAY_EXPLAIN_MODEL_SERVER", ""),
                   help="gRPC address answering explain=1 (Grad-CAM), when --model-server is a TF Serving started "
                   "with --prefer_tflite_model, whose TFLite engine has no explain signature: a TF Serving on the "
                   "same registry without that flag (GATEWAY_EXPLAIN_MODEL_SERVER; default: --model-server)")
    p.add_argument("--model-name", default=env("MODEL_NAME", "mushrooms"), help="model to serve (MODEL_NAME)")
    p.add_argument("--model-base-path", default=env("MODEL_BASE_PATH", ""),
                   help="the model's registry folder, if mounted: display names and demo photos come from its "
                   "assets.extra/ (MODEL_BASE_PATH; optional)")
    p.add_argument("--redis-url", default=env("GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   help="cache, routing table, audit and feedback (GATEWAY_REDIS_URL)")
    p.add_argument("--admin-token", default=env("GATEWAY_ADMIN_TOKEN", ""),
                   help="bearer token of the operator named 'admin' (GATEWAY_ADMIN_TOKEN); no token at all = routing "
                   "changes refused")
    p.add_argument("--operator-tokens", default=env("GATEWAY_OPERATOR_TOKENS", ""),
                   help="named operator tokens: a file of 'name:token' lines, or a folder with one file per operator "
                   "(a mounted Kubernetes Secret); the audit records the token's owner (GATEWAY_OPERATOR_TOKENS)")
    p.add_argument("--feedback-secret-file", default=env("FEEDBACK_SECRET_FILE", ""),
                   help="file holding the secret that signs answers' feedback tokens, shared by every replica; "
                   "one secret per line to rotate it, the first signing and every one verifying; read again when it "
                   "changes (FEEDBACK_SECRET_FILE; or one secret itself in FEEDBACK_SECRET; neither = a random one "
                   "per process)")
    p.add_argument("--feedback-window", type=int, default=int(env("FEEDBACK_WINDOW_SECONDS", str(7 * 24 * 3600))),
                   help="seconds after an answer that its feedback is accepted (FEEDBACK_WINDOW_SECONDS, default "
                   "7 days)")
    p.add_argument("--forget-versions-after", type=float,
                   default=float(env("FORGET_VERSIONS_AFTER_SECONDS", "600")),
                   help="seconds a version that left the model server (or is routed around) keeps its figures in "
                   "/v1/admin/status and its series in /metrics, so Prometheus scrapes its last counts; then they "
                   "are dropped, and a version coming back is counted from zero (FORGET_VERSIONS_AFTER_SECONDS)")
    p.add_argument("--rollout-url", default=env("ROLLOUT_URL", ""),
                   help="the rollout controller's API (services/rollout), shown in the web operator panel through "
                   "/v1/admin/rollout (ROLLOUT_URL; optional)")
    p.add_argument("--photo-store", default=env("PHOTO_STORE_DIR", ""),
                   help="opt-in: keep every classified photo by its hash in this folder (bounded), so feedback that "
                   "corrects an answer becomes training data for `python -m training_job collect` (PHOTO_STORE_DIR; "
                   "off by default)")
    p.add_argument("--photo-store-max-bytes", type=int,
                   default=int(env("PHOTO_STORE_MAX_BYTES", str(2 * 1024 ** 3))),
                   help="bytes kept for plain classifications, and again for corrected photos; the oldest go first "
                   "(PHOTO_STORE_MAX_BYTES, default 2 GiB)")
    p.add_argument("--cache-ttl", type=int, default=int(env("CACHE_TTL_SECONDS", "86400")),
                   help="seconds a cached answer lives (CACHE_TTL_SECONDS)")
    p.add_argument("--max-bytes", type=int, default=int(env("MAX_PHOTO_BYTES", str(20 * 1024 * 1024))),
                   help="largest photo accepted, bytes (MAX_PHOTO_BYTES)")
    p.add_argument("--max-pixels", type=int, default=int(env("MAX_PHOTO_PIXELS", "60000000")),
                   help="largest photo accepted, width x height (MAX_PHOTO_PIXELS)")
    p.add_argument("--redis-timeout", type=float, default=float(env("REDIS_TIMEOUT_SECONDS", "0.1")),
                   help="Redis socket timeout before serving uncached (REDIS_TIMEOUT_SECONDS)")
    p.add_argument("--redis-cache-connections", type=int, default=int(env("REDIS_CACHE_CONNECTIONS", "4")),
                   help="the most connections the cache opens to Redis, each carrying its lookups and writes "
                   "pipelined (REDIS_CACHE_CONNECTIONS, default 4)")
    p.add_argument("--upstream-timeout", type=float, default=float(env("UPSTREAM_TIMEOUT_SECONDS", "10")),
                   help="deadline of one model server call (UPSTREAM_TIMEOUT_SECONDS)")
    p.add_argument("--health-timeout", type=float, default=float(env("HEALTH_TIMEOUT_SECONDS", "1")),
                   help="deadline of the model server status check behind /readyz, run every second: a server "
                   "that does not answer within it makes the gateway unready (HEALTH_TIMEOUT_SECONDS, default 1)")
    p.add_argument("--keepalive-timeout", type=float, default=float(env("KEEPALIVE_TIMEOUT_SECONDS", "15")),
                   help="seconds an idle HTTP connection stays open, which is also the most a client has to send a "
                   "complete request header after connecting or after the previous response "
                   "(KEEPALIVE_TIMEOUT_SECONDS, default 15)")
    p.add_argument("--body-timeout", type=float, default=float(env("BODY_TIMEOUT_SECONDS", "60")),
                   help="seconds an HTTP request body may take to arrive once its headers have; then 408 "
                   "(BODY_TIMEOUT_SECONDS, default 60; 0 = no limit)")
    p.add_argument("--shutdown-delay", type=float, default=float(env("SHUTDOWN_DELAY_SECONDS", "0")),
                   help="seconds the gateway keeps serving after SIGTERM while /readyz answers 503 and gRPC health "
                   "NOT_SERVING, every HTTP answer closing its connection, so that load balancers stop sending to it "
                   "before it stops listening; a second SIGTERM or SIGINT ends the wait (SHUTDOWN_DELAY_SECONDS, "
                   "default 0)")
    p.add_argument("--shutdown-grace", type=float, default=float(env("SHUTDOWN_GRACE_SECONDS", "15")),
                   help="once the gateway stops listening, seconds its calls in flight get to finish before they are "
                   "cancelled (SHUTDOWN_GRACE_SECONDS, default 15: longer than --upstream-timeout's default, so a "
                   "call waiting on the model server ends by that call's own deadline)")
    p.add_argument("--max-queue-wait", type=float, default=float(env("MAX_QUEUE_WAIT_SECONDS", "1")),
                   help="seconds a cache miss may expect to wait for those already in progress, at the rate they "
                   "have been answered lately; a miss beyond that is refused at once with 503 overloaded and "
                   "Retry-After (gRPC UNAVAILABLE); 0 takes every miss on (MAX_QUEUE_WAIT_SECONDS)")
    p.add_argument("--no-single-flight", dest="single_flight", action="store_false",
                   default=env("SINGLE_FLIGHT", "1").lower() not in ("0", "false", "off", "no"),
                   help="every identical concurrent miss makes its own model server call (SINGLE_FLIGHT=0; "
                   "for benchmarks: single-flight is on by default)")
    p.add_argument("--predict-batch-max", type=positive_int, default=int(env("PREDICT_BATCH_MAX", "32")),
                   help="concurrent misses for the same version share one Predict call of up to this many photos, "
                   "sent when one of the version's calls in flight returns (PREDICT_BATCH_MAX; 1 = a call per photo; "
                   "at most the model server's max_batch_size, which TF Serving enforces on each request)")
    p.add_argument("--predict-batch-in-flight", type=positive_int,
                   default=int(env("PREDICT_BATCH_IN_FLIGHT", "2")),
                   help="Predict calls per version in flight at once before photos wait to share the next "
                   "(PREDICT_BATCH_IN_FLIGHT)")
    return p


class Gateway:
    def __init__(self, args: argparse.Namespace):
        from services.gateway.admission import MissAdmission
        from services.gateway.cache import ResultCache
        from services.gateway.classifier import Classifier
        from services.gateway.feedback import tokens_from_config
        from services.gateway.labels import LabelResolver
        from services.gateway.loops import Loops
        from services.gateway.model_info import ModelInfo
        from services.gateway.operators import OperatorTokens
        from services.gateway.predict_batching import NoBatching, PredictBatcher
        from services.gateway.routing import Router
        from services.gateway.single_flight import NoSingleFlight, SingleFlight
        from services.gateway.stats import Stats
        from services.gateway.upstream import ModelServerClient
        from services.gateway.version_facts import VersionFacts
        from services.redis_pool import state_client
        from training_job.preprocessing import Limits

        self.args = args
        self.redis = state_client(args.redis_url, args.redis_timeout)  # the cache has connections of its own
        self.upstream = ModelServerClient(args.model_server, args.model_name, timeout=args.upstream_timeout,
                                          explain_target=args.explain_model_server or None)
        self.router = Router(self.redis, args.model_name, LabelResolver(self.upstream))
        self.version_facts = VersionFacts(self.upstream)
        self.stats = Stats(self.redis, args.model_name, tokens_from_config(
            args.feedback_secret_file or None, os.environ.get("FEEDBACK_SECRET"), args.model_name,
            args.feedback_window), self.version_facts, args.forget_versions_after)
        self.model_info = ModelInfo(args.model_base_path or None)
        cache = ResultCache(self.redis, args.cache_ttl, max_connections=args.redis_cache_connections)
        self.classifier = Classifier(self.upstream, cache, self.router, self.stats,
                                     self.model_info, Limits(args.max_bytes, args.max_pixels),
                                     SingleFlight() if args.single_flight else NoSingleFlight(), self.version_facts,
                                     batcher=PredictBatcher(self.upstream, args.predict_batch_max,
                                                            args.predict_batch_in_flight)
                                     if args.predict_batch_max > 1 else NoBatching(self.upstream),
                                     admission=MissAdmission(args.max_queue_wait))
        self.classifier.admission.export()
        self.upstream_ok = False
        self.upstream_problem = "not checked yet"
        self._draining = asyncio.Event()  # SIGTERM or SIGINT came: unready
        self._hurry = asyncio.Event()  # a second one: the shutdown delay ends at once
        self._closing_connections = asyncio.Event()  # HTTP answers close their connections, gRPC streams end
        self._stopping = asyncio.Event()  # nothing is served any more: the background loops end
        self.loops = Loops(self._stopping)
        self.operators = OperatorTokens(args.operator_tokens or None, args.admin_token or None)

    def ready(self) -> tuple[bool, str]:
        if self._draining.is_set():
            return False, "shutting down"
        stale = self.loops.stale()
        if not self.upstream_ok:
            return False, f"model server {self.args.model_server} unreachable: {self.upstream_problem}"
        if "versions" in stale:
            return False, f"the version watcher is stale: {stale['versions']}"
        unusable = "; ".join(f"version {v} unusable: {why}" for v, why in sorted(self.router.unusable.items()))
        if not self.router.available:
            return False, f"no usable AVAILABLE version of {self.args.model_name}" + (f" ({unusable})" if unusable
                                                                                        else "")
        problems = ["stale loops: " + "; ".join(f"{name} {why}" for name, why in sorted(stale.items()))] \
            if stale else []  # still serving (the last routing table and label answers); reported, not fatal
        problems += [unusable] if unusable else []  # routed around
        problems += [f"version {v} AVAILABLE on {p.available_on} of {p.serving} model server replicas (routed to once "
                     "on all)" for v, p in sorted(self.upstream.partial.items())]
        return True, "; ".join(["ok", *problems])

    async def _poll_versions(self) -> None:
        from services.gateway.upstream import AVAILABLE, UpstreamUnavailable

        try:
            states = await self.upstream.version_states(timeout=self.args.health_timeout)
        except UpstreamUnavailable as exc:
            self.upstream_ok, self.upstream_problem = False, str(exc)
            self.version_facts.doubt()  # it may serve other models under the same numbers when it answers again
            raise
        available = {v for v, s in states.items() if s == AVAILABLE}
        changed = await self.version_facts.refresh(available, timeout=self.args.health_timeout)  # before routed to
        self.model_info.keep(available - changed)
        self.router.set_available(available, self.version_facts.unusable)
        self.stats.keep(self.router.available)
        self.upstream_ok = True

    async def serve(self) -> None:
        from aiohttp import web

        from services.gateway.descriptors import CHECK_INTERVAL_S, DescriptorWatch
        from services.gateway.grpc_api import SERVICE_NAME, build_server, serving_status
        from services.gateway.http_api import HttpApi

        # Routing: re-read twice a second, keeping the last table while Redis is down or the stored one is refused.
        watchers = [asyncio.create_task(self.loops.run("versions", self._poll_versions, 1.0, max_backoff=2.0)),
                    asyncio.create_task(self.loops.run("routing", self.router.refresh, 0.5, max_backoff=2.0)),
                    asyncio.create_task(self.loops.run("labels", self.router.refresh_labels, 1.0, max_backoff=5.0)),
                    asyncio.create_task(self.loops.run("descriptors", DescriptorWatch().check, CHECK_INTERVAL_S))]
        from services.gateway.photo_store import PhotoStore
        from services.gateway.rollout_proxy import RolloutProxy
        from services.http_bodies import RUNNER_OPTIONS
        from services.http_listen import SITE_OPTIONS
        from services.urls import without_password

        photo_store = PhotoStore(self.args.photo_store, self.stats.tokens,
                                 self.args.photo_store_max_bytes) if self.args.photo_store else None
        runner = web.AppRunner(HttpApi(self.classifier, self.router, self.stats, self.model_info, self.operators,
                                       self.args.max_bytes, self.ready, self.args.body_timeout,
                                       RolloutProxy(self.args.rollout_url or None), photo_store,
                                       closing=self._closing_connections.is_set).app(),
                               access_log=None, keepalive_timeout=self.args.keepalive_timeout,
                               shutdown_timeout=self.args.shutdown_grace, handler_cancellation=True,
                               **RUNNER_OPTIONS)
        await runner.setup()
        site = web.TCPSite(runner, self.args.host, self.args.http_port, **SITE_OPTIONS)
        grpc_server = health = None
        try:  # gRPC first: the HTTP port listening tells a launcher both are bound
            if self.args.grpc_port:
                grpc_server, health = build_server(self.classifier, self.router, self.stats, self.args.host,
                                                   self.args.grpc_port, photo_store, self._closing_connections)
                await grpc_server.start()
            await site.start()
        except BaseException:  # a port taken: everything started so far ends, so that the process exits
            if grpc_server is not None:
                await grpc_server.stop(None)
            await runner.cleanup()
            await self._close(watchers)
            raise
        log.info("gateway on http://%s:%d and gRPC %s:%s -> model server %s, redis %s", self.args.host,
                 self.args.http_port, self.args.host, self.args.grpc_port or "off", self.args.model_server,
                 without_password(self.args.redis_url))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled)
        while True:
            if health is not None:
                status = serving_status(self.ready()[0])
                for service in ("", SERVICE_NAME):  # the server's health, and the Classifier's
                    await health.set(service, status)
            if self._draining.is_set():
                break
            try:
                await asyncio.wait_for(self._draining.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        await self._shut_down(runner, site, grpc_server)
        await self._close(watchers)

    async def _close(self, watchers: list[asyncio.Task]) -> None:
        """The background loops end; the model server channel, the cache's and Redis's connections close."""
        self._stopping.set()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await self.upstream.close()
        await self.classifier.cache.close()
        await self.redis.aclose()

    def _signalled(self) -> None:
        """SIGTERM or SIGINT: the first starts the shutdown, the next ends its delay."""
        if self._draining.is_set():
            self._hurry.set()
        self._draining.set()

    async def _shut_down(self, runner, site, grpc_server) -> None:
        """After SIGTERM (readiness is off already, ``ready``): for --shutdown-delay still serving, each HTTP answer
        closing its connection so that its client reconnects, through its load balancer, elsewhere; then both
        listeners close, open HTTP connections get their last request answered (``services.http_stop``) and the
        calls in flight --shutdown-grace to finish."""
        from services.http_stop import stop_serving

        if self.args.shutdown_delay > 0:
            log.info("stopping: unready, still serving for %.1f s", self.args.shutdown_delay)
            self._closing_connections.set()
            try:
                await asyncio.wait_for(self._hurry.wait(), self.args.shutdown_delay)
            except asyncio.TimeoutError:
                pass
        log.info("shutting down: no new connections; calls in flight get %.0f s", self.args.shutdown_grace)
        stopped = [stop_serving(runner, site, self._closing_connections)]
        if grpc_server is not None:
            stopped.append(grpc_server.stop(grace=self.args.shutdown_grace))
        await asyncio.gather(*stopped)
        self._stopping.set()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from services import event_loop

    try:
        event_loop.run(Gateway(args).serve())
    except (OSError, ValueError) as exc:  # ports in use, unreadable or invalid token and secret files
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
