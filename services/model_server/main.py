"""`python -m services.model_server`: flags as `tensorflow_model_server` names them."""
from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from aiohttp import web

from services.model_server.config import (
    BatchingParameters, ConfigError, MonitoringConfig, read_model_config, single_model_config,
)
from services.model_server.errors import ServingError

log = logging.getLogger("model_server")

# Real tensorflow_model_server flags this server does not implement: named in a clear error instead of argparse's.
UNSUPPORTED_TF_SERVING_FLAGS = {
    "ssl_config_file", "platform_config_file", "tensorflow_session_parallelism",
    "per_process_gpu_memory_fraction",
    "saved_model_tags", "enable_model_warmup", "num_request_iterations_for_warmup",
    "rest_api_num_threads", "enable_signature_method_name_check", "xla_cpu_compilation_enabled",
    "remove_unused_fields_from_bundle_metagraph", "mixed_precision", "thread_pool_factory_config_file",
    "use_tflite_model", "flush_filesystem_caches", "model_version_policy",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.model_server",
        description="A model server speaking the TensorFlow Serving API (gRPC PredictionService/ModelService and REST "
        "/v1/models) over a folder of versioned SavedModels. Flags are those of tensorflow_model_server.",
    )
    p.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500)")
    p.add_argument("--rest_api_port", type=int, default=8501, help="REST port (default 8501; 0 = no REST)")
    p.add_argument("--grpc_socket_path", default="",
                   help="also serve gRPC on this Unix domain socket (a path; empty = no socket)")
    p.add_argument("--grpc_channel_arguments", default="",
                   help="gRPC server arguments, comma-separated key=value (integers are passed as numbers), "
                   "e.g. grpc.max_connection_age_ms=2000")
    p.add_argument("--rest_api_timeout_in_ms", type=int, default=30000,
                   help="a REST request still running after this many ms answers 504 (default 30000; 0 = none)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (not a TF Serving flag; default 0.0.0.0)")
    p.add_argument("--model_name", default="default", help="name of the single model to serve (with --model_base_path)")
    p.add_argument("--model_base_path", default="", help="folder holding the model's numbered version folders")
    p.add_argument("--model_config_file", default="", help="text ModelServerConfig; overrides --model_name/--model_base_path")
    p.add_argument("--model_config_file_poll_wait_seconds", type=int, default=0,
                   help="re-read --model_config_file every N seconds (0 = never)")
    p.add_argument("--file_system_poll_wait_seconds", type=int, default=1,
                   help="look for new versions every N seconds (0 = once at start, negative = never)")
    p.add_argument("--enable_batching", type=_bool, nargs="?", const=True, default=False,
                   help="batch concurrent requests server-side")
    p.add_argument("--batching_parameters_file", default="",
                   help="text BatchingParameters: max_batch_size, batch_timeout_micros, max_enqueued_batches, "
                   "num_batch_threads, allowed_batch_sizes, pad_variable_length_inputs")
    p.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0,
                   help="threads one model call may use; 0 (default) = the cores divided by the calls that can run "
                   "at once (num_batch_threads, or --predict_threads without batching). TF Serving's 0 means all "
                   "cores, which made two concurrent calls on 2 cores spin: 16.2 -> 14.1 ms CPU per request here")
    p.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0,
                   help="TensorFlow inter-op threads; 0 (default) = TensorFlow's choice")
    p.add_argument("--prefer_tflite_model", type=_bool, nargs="?", const=True, default=False,
                   help="serve a version's model.tflite (beside saved_model.pb) in place of its SavedModel, with "
                   "LiteRT and XNNPACK, one interpreter per model call that can run at once; versions without one "
                   "are served from their SavedModel")
    p.add_argument("--enable_profiler", type=_bool, nargs="?", const=True, default=True,
                   help="serve TensorFlow's profiler service (tensorflow.ProfilerService) on the gRPC port, for "
                   "tf.profiler.experimental.client.trace and TensorBoard (default true)")
    p.add_argument("--monitoring_config_file", default="",
                   help='text MonitoringConfig, e.g. prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }')
    p.add_argument("--allow_version_labels_for_unavailable_models", type=_bool, nargs="?", const=True, default=False,
                   help="let NEW version labels point at versions that are not AVAILABLE yet")
    p.add_argument("--max_num_load_retries", type=int, default=5, help="retries of a failed load (default 5)")
    p.add_argument("--load_retry_interval_micros", type=int, default=60_000_000,
                   help="accepted for compatibility: failed loads are retried on each file-system poll")
    p.add_argument("--num_load_threads", type=int, default=1, help="accepted for compatibility (loads are serial)")
    p.add_argument("--num_unload_threads", type=int, default=1, help="accepted for compatibility")
    p.add_argument("--predict_threads", type=int, default=os.cpu_count() or 2,
                   help="threads running the model when batching is off (not a TF Serving flag)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    for arg in argv:
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("--") and name in UNSUPPORTED_TF_SERVING_FLAGS:
            build_parser().error(f"--{name} is a tensorflow_model_server flag this server does not implement; "
                                 "leave it out (see --help for the flags it does accept)")
    args = build_parser().parse_args(argv)
    if not args.model_config_file and not args.model_base_path:
        build_parser().error("give --model_config_file, or --model_name with --model_base_path")
    try:
        parse_grpc_channel_arguments(args.grpc_channel_arguments)
    except ValueError as exc:
        build_parser().error(str(exc))
    return args


def parse_grpc_channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """--grpc_channel_arguments as gRPC options: ``k=v,k=v``, each value an int when it parses as one (as TF Serving)."""
    options: list[tuple[str, int | str]] = []
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--grpc_channel_arguments: {pair!r} is not key=value")
        try:
            options.append((key.strip(), int(value)))
        except ValueError:
            options.append((key.strip(), value.strip()))
    return options


def rest_timeout_middleware(seconds: float):
    """Answers 504 (TF Serving's status for DEADLINE_EXCEEDED) for a REST request still running after ``seconds``."""
    @web.middleware
    async def timeout(request: web.Request, handler):
        try:
            async with asyncio.timeout(seconds):
                return await handler(request)
        except TimeoutError:
            return web.json_response({"error": f"Deadline Exceeded: no answer within {seconds * 1000:.0f} ms "
                                               "(--rest_api_timeout_in_ms)"}, status=504)
    return timeout


def _traced(name: str, work):
    """Run ``work()`` as a named event of TensorFlow's profiler (a no-op unless a profile is being recorded), so a
    profile shows the server's load passes beside its model calls."""
    import tensorflow as tf

    with tf.profiler.experimental.Trace(name):
        return work()


class StartupError(Exception):
    """The server cannot start serving (TF Serving then prints 'Failed to start server' and exits with -1)."""


def _unavailable_message(failed: list[str], noun: str) -> str:
    return f"{len(failed)} {noun} did not become available: {{" + "".join(f"{{{f}}}, " for f in failed) + "}"


class ModelServer:
    def __init__(self, args: argparse.Namespace):
        from services.model_server.core import PredictionCore
        from services.model_server.manager import Manager

        self.args = args
        batching = None
        if args.enable_batching:
            batching = BatchingParameters()
            if args.batching_parameters_file:
                batching = BatchingParameters.from_text(open(args.batching_parameters_file).read())
        self.monitoring = MonitoringConfig()
        if args.monitoring_config_file:
            self.monitoring = MonitoringConfig.from_text(open(args.monitoring_config_file).read())
        from services.model_server.servable import LoadOptions, load_servable

        load_options = LoadOptions(prefer_tflite_model=args.prefer_tflite_model)
        self.manager = Manager(args.max_num_load_retries, args.allow_version_labels_for_unavailable_models,
                               load=functools.partial(load_servable, options=load_options))
        self.core = PredictionCore(self.manager, batching, args.predict_threads, args.tensorflow_intra_op_parallelism,
                                   args.tensorflow_inter_op_parallelism)
        self.manager.set_config(self._initial_config())
        self._stopping = asyncio.Event()

    def _initial_config(self):
        if self.args.model_config_file:
            return read_model_config(self.args.model_config_file)
        return single_model_config(self.args.model_name, os.path.abspath(self.args.model_base_path))

    async def reload_config(self, config) -> None:
        """Apply a new ModelServerConfig as TF Serving's ReloadConfig does: wait until each model new in it has loaded
        its latest version, then apply version labels; raises ServingError (UNKNOWN naming the versions that did
        not become available, or the label error) after applying what could be applied."""
        import grpc

        for model in config.model_config_list.config:
            if not model.name or not model.base_path:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "every model needs a name and a base_path")
        before = set(self.manager.model_names())
        self.manager.set_config(config)
        log.info("model config reloaded: %s", ", ".join(m.name for m in config.model_config_list.config))
        new_models = [m.name for m in config.model_config_list.config if m.name not in before]
        failed, label_errors = await self._load_until_settled(new_models)
        if failed:
            raise ServingError(grpc.StatusCode.UNKNOWN, _unavailable_message(failed, "model(s)"))
        if label_errors:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, "; ".join(label_errors))

    async def _load_until_settled(self, names: list[str]) -> tuple[list[str], list[str]]:
        """Load passes until the latest version of each model in ``names`` is AVAILABLE or has spent its load
        retries (passes are --file_system_poll_wait_seconds apart, as the poller's retries are). Returns the
        versions that gave up, as TF Serving names them ('{name: m version: 1} due to error: ...'), and the
        label errors of the last pass. A model with no version on disk is not waited for."""
        from services.model_server.manager import State

        while True:
            label_errors = await self._reconcile()
            failed, pending = [], False
            for name in names:
                records = self.manager.status_records(name)
                if not records:
                    continue
                latest = max(records, key=lambda r: r.version)
                if latest.state == State.END and latest.error:
                    failed.append(f"{{name: {name} version: {latest.version}}} due to error: {latest.error}")
                elif latest.state != State.AVAILABLE:
                    pending = True
            if not pending:
                return failed, label_errors
            await asyncio.sleep(max(0, self.args.file_system_poll_wait_seconds))

    async def _reconcile(self) -> list[str]:
        errors = await asyncio.get_running_loop().run_in_executor(None, _traced, "reconcile", self.manager.reconcile)
        for error in errors:
            log.error("%s", error)
        if self.core.batcher is not None:
            live = {id(r.servable) for name in self.manager.model_names()
                    for r in self.manager.status_records(name) if r.servable is not None}
            self.core.batcher.forget(live)
        return errors

    async def _poll_file_system(self) -> None:
        wait = self.args.file_system_poll_wait_seconds
        while wait > 0 and not self._stopping.is_set():
            await asyncio.sleep(wait)
            await self._reconcile()

    async def _poll_config_file(self) -> None:
        wait = self.args.model_config_file_poll_wait_seconds
        last = None
        while wait > 0 and self.args.model_config_file and not self._stopping.is_set():
            await asyncio.sleep(wait)
            try:
                config = read_model_config(self.args.model_config_file)
            except ConfigError as exc:
                log.error("%s (keeping the previous config)", exc)
                continue
            text = str(config)
            if text != last:
                last = text
                try:
                    await self.reload_config(config)
                except ServingError as exc:
                    log.error("model config %s: %s", self.args.model_config_file, exc.message)

    async def serve(self) -> None:
        from services.model_server.grpc_api import build_server
        from services.model_server.rest_api import RestApi

        if self.args.file_system_poll_wait_seconds >= 0:
            failed, _ = await self._load_until_settled(self.manager.model_names())
            if failed:
                raise StartupError(f"UNKNOWN: {_unavailable_message(failed, 'servable(s)')}")
        grpc_server = build_server(self.core, self.reload_config, self.args.port, self.args.host,
                                   parse_grpc_channel_arguments(self.args.grpc_channel_arguments))
        if self.args.enable_profiler:
            from services.model_server.profiler_service import ProfilerService

            grpc_server.add_generic_rpc_handlers((ProfilerService().handler(),))
        if self.args.grpc_socket_path and not grpc_server.add_insecure_port(f"unix:{self.args.grpc_socket_path}"):
            raise OSError(f"cannot listen for gRPC on the Unix socket {self.args.grpc_socket_path}")
        await grpc_server.start()
        runner = None
        if self.args.rest_api_port:
            path = self.monitoring.path if self.monitoring.enable else None
            app = RestApi(self.core, path).app()
            if self.args.rest_api_timeout_in_ms > 0:
                app.middlewares.append(rest_timeout_middleware(self.args.rest_api_timeout_in_ms / 1000))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.args.host, self.args.rest_api_port).start()
        log.info("serving gRPC on %s:%d, REST on %s (metrics %s)", self.args.host, self.args.port,
                 f"{self.args.host}:{self.args.rest_api_port}" if runner else "off",
                 self.monitoring.path if self.monitoring.enable else "off")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        pollers = [asyncio.create_task(self._poll_file_system()), asyncio.create_task(self._poll_config_file())]
        await self._stopping.wait()
        log.info("shutting down: finishing in-flight requests")
        for task in pollers:
            task.cancel()
        await grpc_server.stop(grace=10)
        if runner:
            await runner.cleanup()
        self.core.executor.shutdown(wait=True)
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        server = ModelServer(args)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(server.serve())
    except StartupError as exc:
        print(f"Failed to start server. Error: {exc}", file=sys.stderr)
        return 255
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
