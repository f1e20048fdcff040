"""`python -m services.model_server`: flags as `tensorflow_model_server` names them."""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from aiohttp import web

from services import event_loop
from services.daemon_thread import in_daemon_thread
from services.http_bodies import RUNNER_OPTIONS
from services.http_listen import SITE_OPTIONS
from services.http_stop import stop_serving
from services.model_server.config import (
    BatchingParameters, ConfigError, MonitoringConfig, SslConfig, check_model_config_list, read_model_config,
    single_model_config,
)
from services.model_server.errors import ServingError

log = logging.getLogger("model_server")
SHUTDOWN_GRACE_SECONDS = 10.0  # SIGTERM: requests already admitted get this long to finish, then the process exits

# Real tensorflow_model_server flags this server refuses, each with the reason (also printed by --help).
UNSUPPORTED_TF_SERVING_FLAGS = {
    "platform_config_file": "a PlatformConfigMap configures TF Serving's C++ session bundles, which this server "
                            "does not have",
    "tensorflow_session_config_file": "a Session ConfigProto configures TF1 sessions; use "
                                      "--tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism",
    "thread_pool_factory_config_file": "custom thread pool factories are C++ plug-ins",
    "mixed_precision": "TF Serving's mixed-precision graph rewrite is a C++ session option",
    "xla_gpu_compilation_enabled": "CPU-only server: there is no XLA:GPU",
    "enable_per_model_batching_parameters": "batching parameters come from --batching_parameters_file only",
    "num_tflite_pools": "TFLite interpreter pools are not implemented",
    "num_tflite_interpreters_per_pool": "TFLite interpreter pools are not implemented",
    "use_tflite_model": "an old name: use --prefer_tflite_model",
}
# Real flags accepted with no effect here, and why (also printed by --help).
NO_EFFECT_TF_SERVING_FLAGS = {
    "grpc_max_threads": "the gRPC server runs on an asyncio event loop, not a thread pool",
    "flush_filesystem_caches": "no file-system caches to flush",
    "remove_unused_fields_from_bundle_metagraph": "a memory optimisation of TF Serving's C++ bundles",
    "per_process_gpu_memory_fraction": "CPU only: no GPU memory to reserve",
    "skip_initialize_tpu": "no TPU to initialise",
    "xla_cpu_compilation_enabled": "XLA:CPU JIT stays available either way (TF Serving's default, false, switches it "
                                   "off; a Python TensorFlow process cannot)",
}


def _epilog() -> str:
    refused = "\n".join(f"  --{k}: {v}" for k, v in UNSUPPORTED_TF_SERVING_FLAGS.items())
    no_effect = "\n".join(f"  --{k}: {v}" for k, v in NO_EFFECT_TF_SERVING_FLAGS.items())
    return (f"tensorflow_model_server flags refused (startup fails, naming the flag):\n{refused}\n"
            f"tensorflow_model_server flags accepted with no effect:\n{no_effect}")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _KeepEpilogLines(argparse.HelpFormatter):
    """Wraps the description and the flags' help as usual; the epilog keeps one refused flag per line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.model_server",
        description="A model server speaking the TensorFlow Serving API (gRPC PredictionService/ModelService and REST "
        "/v1/models) over a folder of versioned SavedModels. Flags are those of tensorflow_model_server.",
        epilog=_epilog(), formatter_class=_KeepEpilogLines,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500; 0 = no TCP gRPC, with "
                   "--grpc_socket_path)")
    p.add_argument("--grpc_socket_path", default="",
                   help="also listen for gRPC on this UNIX socket (clients use unix:<path>)")
    p.add_argument("--grpc_channel_arguments", default="",
                   help="gRPC server arguments key=value,key=value (e.g. grpc.max_connection_age_ms=2000); a value "
                   "that is an integer is passed as one, anything else as a string")
    p.add_argument("--ssl_config_file", default="",
                   help="text SSLConfig (server_key, server_cert PEM; custom_ca; client_verify): gRPC over TLS")
    p.add_argument("--use_alts_credentials", type=_bool, nargs="?", const=True, default=False,
                   help="gRPC with Google ALTS credentials (needs Google Cloud's ALTS handshaker)")
    p.add_argument("--enable_grpc_healthcheck_service", type=_bool, nargs="?", const=True, default=False,
                   help="serve grpc.health.v1.Health (ModelService and PredictionService SERVING)")
    p.add_argument("--enable_serialization_as_tensor_content", type=_bool, nargs="?", const=True, default=False,
                   help="Predict answers carry numbers as raw tensor_content instead of the typed fields "
                   "(float_val, ...)")
    p.add_argument("--rest_api_port", type=int, default=8501, help="REST port (default 8501; 0 = no REST)")
    p.add_argument("--rest_api_num_threads", type=int, default=4 * (os.cpu_count() or 1),
                   help="REST requests processed at once (default 4 x cores, TF Serving's HTTP threads); more wait")
    p.add_argument("--rest_api_timeout_in_ms", type=int, default=30_000,
                   help="deadline of a REST predict/classify/regress (default 30000; 504 when exceeded; 0 = none); "
                   "also how long a body, or the next request's headers, may take to arrive")
    p.add_argument("--rest_api_enable_cors_support", type=_bool, nargs="?", const=True, default=False,
                   help="add CORS headers (Access-Control-Allow-Origin: *) to REST answers")
    p.add_argument("--saved_model_tags", default="serve",
                   help="comma-separated tag set of the MetaGraphDef to load (default serve)")
    p.add_argument("--enable_model_warmup", type=_bool, nargs="?", const=True, default=True,
                   help="replay assets.extra/tf_serving_warmup_requests, then saved_model_warmup_requests, at load "
                        "(default true)")
    p.add_argument("--num_request_iterations_for_warmup", type=int, default=0,
                   help="times each warm-up record is replayed (0 = once)")
    p.add_argument("--enable_signature_method_name_check", type=_bool, nargs="?", const=True, default=False,
                   help="Classify/Regress only on signatures whose method_name says so (default off, as in TF "
                   "Serving: TF2 exports all say tensorflow/serving/predict)")
    p.add_argument("--tensorflow_session_parallelism", type=int, default=0,
                   help="intra- and inter-op threads both, unless --tensorflow_intra_op_parallelism or "
                   "--tensorflow_inter_op_parallelism is given (0 = automatic)")
    for name, why in NO_EFFECT_TF_SERVING_FLAGS.items():
        p.add_argument(f"--{name}", default=None, nargs="?", const="true", help=f"accepted, no effect: {why}")
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
                   "at once (num_batch_threads, or --predict_threads without batching), so concurrent calls do not "
                   "fight over the cores; TF Serving's 0 means all cores")
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
    p.add_argument("--max_num_load_retries", type=int, default=5,
                   help="retries of a failed load before it is given up on (default 5; 0 = one attempt)")
    p.add_argument("--load_retry_interval_micros", type=int, default=60_000_000,
                   help="the wait between a failed load and its retry (default 1 minute; negative = none); the "
                   "retry runs at the first file-system poll after it")
    p.add_argument("--num_load_threads", type=int, default=1, help="accepted for compatibility (loads are serial)")
    p.add_argument("--num_unload_threads", type=int, default=1, help="accepted for compatibility")
    p.add_argument("--predict_threads", type=int, default=os.cpu_count() or 2,
                   help="threads running the model when batching is off (not a TF Serving flag)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    for arg in argv:
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("--") and name in UNSUPPORTED_TF_SERVING_FLAGS:
            build_parser().error(f"--{name} is a tensorflow_model_server flag this server does not implement: "
                                 f"{UNSUPPORTED_TF_SERVING_FLAGS[name]}; leave it out (see --help)")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        return args
    if not args.model_config_file and not args.model_base_path:
        parser.error("give --model_config_file, or --model_name with --model_base_path")
    if args.use_alts_credentials and args.ssl_config_file:
        parser.error("Either use_alts_credentials must be false or ssl_config_file must be empty.")
    if not args.port and not args.grpc_socket_path:
        parser.error("At least one of server_options.grpc_port or server_options.grpc_socket_path must be set.")
    if min(args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism,
           args.tensorflow_session_parallelism) > 0:
        parser.error("Either configure server_options.tensorflow_session_parallelism or "
                     "(server_options.tensorflow_intra_op_parallelism, server_options.tensorflow_inter_op_parallelism)"
                     " separately. You cannot configure all.")
    try:
        from services.model_server.grpc_api import parse_channel_arguments

        args.channel_arguments = parse_channel_arguments(args.grpc_channel_arguments)
    except ValueError as exc:
        parser.error(f"--grpc_channel_arguments: {exc}")
    if args.num_load_threads > 1:
        parser.error("--num_load_threads above 1 is not implemented: this server loads one version at a "
                     "time (0 or 1)")
    return args


def thread_counts(args: argparse.Namespace) -> tuple[int, int]:
    """(intra-op, inter-op) threads as TF Serving's server.cc picks them: the two explicit flags when either is
    given, otherwise --tensorflow_session_parallelism for both (0 = automatic)."""
    if args.tensorflow_intra_op_parallelism > 0 or args.tensorflow_inter_op_parallelism > 0:
        return args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism
    return args.tensorflow_session_parallelism, args.tensorflow_session_parallelism


def grpc_credentials(args: argparse.Namespace):
    """The gRPC server's credentials as TF Serving's BuildServerCredentials picks them: ALTS, TLS from the
    SSLConfig file, or None for plain text."""
    import grpc

    if args.use_alts_credentials:
        return grpc.alts_server_credentials()
    if not args.ssl_config_file:
        return None
    try:
        with open(args.ssl_config_file) as f:
            ssl = SslConfig.from_text(f.read(), args.ssl_config_file)
    except OSError as exc:
        raise ConfigError(f"cannot read --ssl_config_file: {exc}") from None
    return grpc.ssl_server_credentials([(ssl.server_key.encode(), ssl.server_cert.encode())],
                                       root_certificates=ssl.custom_ca.encode() or None,
                                       require_client_auth=ssl.client_verify)


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
        from services.model_server.inference import Inference
        from services.model_server.manager import Manager
        from services.model_server.loader import LoadOptions
        from services.model_server.source import FileSystemSource

        self.args = args
        batching = None
        if args.batching_parameters_file and not args.enable_batching:  # as server.cc refuses it
            raise ConfigError("server_options.batching_parameters_file is set without setting "
                              "server_options.enable_batching to true.")
        if args.enable_batching:
            batching = BatchingParameters()
            if args.batching_parameters_file:
                batching = BatchingParameters.from_text(open(args.batching_parameters_file).read(),
                                                       args.batching_parameters_file)
        self.grpc_credentials = grpc_credentials(args)
        self.monitoring = MonitoringConfig()
        if args.monitoring_config_file:
            self.monitoring = MonitoringConfig.from_text(open(args.monitoring_config_file).read(),
                                                       args.monitoring_config_file)
        load_options = LoadOptions(tags=tuple(t for t in args.saved_model_tags.split(",") if t),
                                   warmup=args.enable_model_warmup,
                                   warmup_iterations=max(1, args.num_request_iterations_for_warmup),
                                   prefer_tflite_model=args.prefer_tflite_model,
                                   intra_op_threads=thread_counts(args)[0])
        self.manager = Manager(args.max_num_load_retries, args.allow_version_labels_for_unavailable_models,
                               load_retry_interval=max(0, args.load_retry_interval_micros) / 1e6)
        self.core = PredictionCore(self.manager, batching, args.predict_threads, *thread_counts(args))
        self.inference = Inference(self.core, args.enable_signature_method_name_check)
        self.source = FileSystemSource(self.manager.set_aspired_versions, load_options)
        config = self._initial_config()
        self.manager.set_config(config)
        self.source.set_config(config)
        self._stopping = asyncio.Event()
        self._closing_connections = asyncio.Event()  # stopping: REST answers close their connections
        # load passes (poll, then load and unload) run here, one at a time, not on asyncio's default executor, which
        # asyncio.run waits for at exit: a pass still loading a version at shutdown is abandoned (_drain)
        self._load_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._load_pass: concurrent.futures.Future | None = None  # the latest pass
        self._reloading = asyncio.Lock()  # one config reload at a time, to its end (TF Serving's config_mu_)

    def _initial_config(self):
        if self.args.model_config_file:
            config = read_model_config(self.args.model_config_file)
            try:
                check_model_config_list(config)
            except ConfigError as exc:
                raise ConfigError(f"{self.args.model_config_file}: {exc}") from None
            return config
        return single_model_config(self.args.model_name, os.path.abspath(self.args.model_base_path))

    async def reload_config(self, config) -> None:
        """Apply a new ModelServerConfig as TF Serving's ServerCore::ReloadConfig does. A config it would refuse
        (INVALID_ARGUMENT: ``check_model_config_list``; FAILED_PRECONDITION: a label on a version not AVAILABLE,
        ``Manager.set_config``) changes nothing. Otherwise its labels and models take effect, and this waits until
        each model new in it has loaded its latest version: UNKNOWN names the versions that did not. Reloads (the
        RPC's and the config file's) run one at a time, each to its end, as ServerCore::ReloadConfig holds its
        config lock: a reload applied while another waits would leave that one waiting for models it no longer
        configures."""
        async with self._reloading:
            await self._reload_config(config)

    async def _reload_config(self, config) -> None:
        import grpc

        try:
            check_model_config_list(config)
        except ConfigError as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        before = set(self.manager.model_names())
        self.manager.set_config(config)
        self.source.set_config(config)
        log.info("model config reloaded: %s", ", ".join(m.name for m in config.model_config_list.config))
        new_models = [m.name for m in config.model_config_list.config if m.name not in before]
        failed = await self._load_until_settled(new_models)
        if failed:
            raise ServingError(grpc.StatusCode.UNKNOWN, _unavailable_message(failed, "model(s)"))

    async def _load_until_settled(self, names: list[str]) -> list[str]:
        """Load passes until the latest version of each model in ``names`` is AVAILABLE or has spent its load
        retries (passes are --file_system_poll_wait_seconds apart, as the poller's are; a failed load is retried at
        the first pass --load_retry_interval_micros after it, as TF Serving waits for its loads). Returns the
        versions that gave up, as TF Serving names them ('{name: m version: 1} due to error: ...'). A model with
        no version on disk is not waited for."""
        from services.model_server.manager import State

        while True:
            try:
                await self._reconcile()
            except OSError as exc:  # a base path that cannot be listed: its models have nothing to wait for yet
                log.error("file-system poll failed: %s", exc)
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
                return failed
            wait = max(0, self.args.file_system_poll_wait_seconds)
            retry_in = self.manager.seconds_to_next_retry()
            if wait == 0 and retry_in is not None:  # no poll to wait for: sleep until a failed load's retry is due
                wait = retry_in
            await asyncio.sleep(wait)

    def _poll_and_manage(self) -> None:
        """The source pushes what is on disk, then the manager acts; a base path that could not be listed is
        raised after the manager ran (the other models were served)."""
        from services.model_server.source import SourceError

        failure = None
        try:
            self.source.poll()
        except SourceError as exc:
            failure = exc
        self.manager.manage_state()
        if failure is not None:
            raise failure

    async def _reconcile(self) -> None:
        try:
            self._load_pass = self._load_executor.submit(_traced, "reconcile", self._poll_and_manage)
            await asyncio.wrap_future(self._load_pass)
        finally:
            if self.core.batcher is not None:
                live = {id(r.servable) for name in self.manager.model_names()
                        for r in self.manager.status_records(name) if r.servable is not None}
                self.core.batcher.forget(live)

    async def _poll_config_file_once(self, applied: list[str], refused: list[str]) -> None:
        """Reload the config file unless its content is the config in force. A refused config is tried again at
        every poll, as TF Serving's poller tries it (a label may become valid once its version loads), and raised
        (reported) only the first time. The file is read off the event loop: on a volume that stops answering, the
        read blocks until it is back, and this poll with it, never a request."""
        import grpc

        config = await in_daemon_thread(read_model_config, self.args.model_config_file, name="config-file-read")
        text = str(config)
        if text == applied[0]:
            return
        try:
            await self.reload_config(config)
        except ServingError as exc:
            if exc.code == grpc.StatusCode.UNKNOWN:  # applied: only a new model failed to load, which is reported
                applied[0] = text
            if text == refused[0]:
                return
            refused[0] = text
            raise
        applied[0], refused[0] = text, ""

    def _pollers(self) -> list[asyncio.Task]:
        from services.model_server.supervision import supervised_loop

        tasks = []
        if self.args.file_system_poll_wait_seconds > 0:
            tasks.append(asyncio.create_task(supervised_loop(
                "file_system_poll", self._reconcile, self.args.file_system_poll_wait_seconds, self._stopping)))
        if self.args.model_config_file and self.args.model_config_file_poll_wait_seconds > 0:
            applied, refused = [""], [""]
            tasks.append(asyncio.create_task(supervised_loop(
                "config_file_poll", lambda: self._poll_config_file_once(applied, refused),
                self.args.model_config_file_poll_wait_seconds, self._stopping)))
        return tasks

    async def serve(self) -> None:
        from services.model_server.grpc_api import GrpcOptions, build_server
        from services.model_server.rest_api import RestApi

        if self.args.file_system_poll_wait_seconds >= 0:
            failed = await self._load_until_settled(self.manager.model_names())
            if failed:
                raise StartupError(f"UNKNOWN: {_unavailable_message(failed, 'servable(s)')}")
        grpc_server = build_server(self.core, self.inference, self.reload_config, GrpcOptions(
            port=self.args.port, host=self.args.host, socket_path=self.args.grpc_socket_path,
            channel_arguments=self.args.channel_arguments,
            tensor_content=self.args.enable_serialization_as_tensor_content,
            health_check=self.args.enable_grpc_healthcheck_service, credentials=self.grpc_credentials))
        if self.args.enable_profiler:
            from services.model_server.profiler_service import ProfilerService

            grpc_server.add_generic_rpc_handlers((ProfilerService().handler(),))
        await grpc_server.start()
        runner = site = None
        if self.args.rest_api_port and self.args.rest_api_port == self.args.port:
            log.error("server_options.http_port cannot be same as grpc_port. Please use a different port for "
                      "HTTP/REST API. Skipped exporting HTTP/REST API.")
        elif self.args.rest_api_port:
            path = self.monitoring.path if self.monitoring.enable else None
            rest = RestApi(self.core, self.inference, path, timeout_ms=self.args.rest_api_timeout_in_ms,
                           max_concurrent=self.args.rest_api_num_threads,
                           cors=self.args.rest_api_enable_cors_support, closing=self._closing_connections.is_set)
            runner = web.AppRunner(rest.app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
                                   keepalive_timeout=rest.idle_seconds, **RUNNER_OPTIONS)
            await runner.setup()
            site = web.TCPSite(runner, self.args.host, self.args.rest_api_port, **SITE_OPTIONS)
            try:
                await site.start()
            except BaseException:  # the REST port taken: the gRPC server ends too, and the process with them
                await runner.cleanup()
                await grpc_server.stop(None)
                raise
        log.info("serving gRPC on %s:%d%s, REST on %s (metrics %s)", self.args.host, self.args.port,
                 f" and unix:{self.args.grpc_socket_path}" if self.args.grpc_socket_path else "",
                 f"{self.args.host}:{self.args.rest_api_port}" if runner else "off",
                 self.monitoring.path if self.monitoring.enable else "off")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        pollers = self._pollers()
        await self._stopping.wait()
        log.info("shutting down: finishing in-flight requests (grace %.0f s)", SHUTDOWN_GRACE_SECONDS)
        for task in pollers:
            task.cancel()
        await self._drain(grpc_server, runner, site)

    async def _drain(self, grpc_server, runner, site) -> None:
        """Stop listening, give admitted requests SHUTDOWN_GRACE_SECONDS to finish (queued batches included), then
        fail what is left with UNAVAILABLE; a model call still running after that, or a load pass (a version
        loading), is abandoned, not waited for. Open REST connections get their last request answered
        (``services.http_stop``)."""
        closing = [grpc_server.stop(grace=SHUTDOWN_GRACE_SECONDS)]
        if runner:
            closing.append(stop_serving(runner, site, self._closing_connections))
        if self.core.batcher is not None:
            closing.append(self.core.batcher.close(SHUTDOWN_GRACE_SECONDS))
        await asyncio.gather(*closing)
        executor_stopped = threading.Thread(target=self.core.executor.shutdown, kwargs={"cancel_futures": True},
                                            daemon=True)
        executor_stopped.start()
        await asyncio.get_running_loop().run_in_executor(None, executor_stopped.join, 1.0)
        abandoned = []
        if executor_stopped.is_alive():
            abandoned.append("model calls still running past the grace period")
        if self._load_pass is not None and not self._load_pass.done():
            abandoned.append("a load pass still running")
        if abandoned:
            log.warning("stopped with %s: not waiting for it", " and ".join(abandoned))
            logging.shutdown()
            os._exit(0)  # a normal interpreter exit would join the executors' threads and wait for that work
        self._load_executor.shutdown(wait=False)
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        import tensorflow as tf

        print(f"TensorFlow ModelServer: mushroom-serving (the TF Serving API)\nTensorFlow Library: {tf.__version__}")
        return 0
    try:
        server = ModelServer(args)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServingError as exc:  # the initial config refused as TF Serving's ReloadConfig refuses it
        print(f"Failed to start server. Error: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 255
    try:
        event_loop.run(server.serve())
    except StartupError as exc:
        print(f"Failed to start server. Error: {exc}", file=sys.stderr)
        return 255
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
