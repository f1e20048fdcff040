"""`python -m services.model_server`: flags as `tensorflow_model_server` names them."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from aiohttp import web

from services.model_server.config import (
    BatchingParameters, ConfigError, MonitoringConfig, read_model_config, single_model_config,
)

log = logging.getLogger("model_server")
SHUTDOWN_GRACE_SECONDS = 10.0  # SIGTERM: requests already admitted get this long to finish, then the process exits

# Real tensorflow_model_server flags this server does not implement: named in a clear error instead of argparse's.
UNSUPPORTED_TF_SERVING_FLAGS = {
    "grpc_socket_path", "ssl_config_file", "platform_config_file", "tensorflow_session_parallelism",
    "per_process_gpu_memory_fraction",
    "saved_model_tags", "grpc_channel_arguments", "enable_model_warmup", "num_request_iterations_for_warmup",
    "rest_api_timeout_in_ms", "rest_api_num_threads", "enable_signature_method_name_check", "xla_cpu_compilation_enabled",
    "remove_unused_fields_from_bundle_metagraph", "prefer_tflite_model", "mixed_precision", "thread_pool_factory_config_file",
    "use_tflite_model", "flush_filesystem_caches", "model_version_policy", "enable_profiler",
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
    if args.num_load_threads > 1:
        build_parser().error("--num_load_threads above 1 is not implemented: this server loads one version at a "
                             "time (0 or 1)")
    return args


class ModelServer:
    def __init__(self, args: argparse.Namespace):
        from services.model_server.core import PredictionCore
        from services.model_server.manager import Manager
        from services.model_server.source import FileSystemSource

        self.args = args
        batching = None
        if args.enable_batching:
            batching = BatchingParameters()
            if args.batching_parameters_file:
                batching = BatchingParameters.from_text(open(args.batching_parameters_file).read())
        self.monitoring = MonitoringConfig()
        if args.monitoring_config_file:
            self.monitoring = MonitoringConfig.from_text(open(args.monitoring_config_file).read())
        self.manager = Manager(args.max_num_load_retries, args.allow_version_labels_for_unavailable_models)
        self.core = PredictionCore(self.manager, batching, args.predict_threads, args.tensorflow_intra_op_parallelism,
                                   args.tensorflow_inter_op_parallelism)
        self.source = FileSystemSource(self.manager.set_aspired_versions)
        config = self._initial_config()
        self.manager.set_config(config)
        self.source.set_config(config)
        self._stopping = asyncio.Event()

    def _initial_config(self):
        if self.args.model_config_file:
            return read_model_config(self.args.model_config_file)
        return single_model_config(self.args.model_name, os.path.abspath(self.args.model_base_path))

    async def reload_config(self, config) -> list[str]:
        from services.model_server.errors import ServingError
        import grpc

        for model in config.model_config_list.config:
            if not model.name or not model.base_path:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "every model needs a name and a base_path")
        self.manager.set_config(config)
        self.source.set_config(config)
        log.info("model config reloaded: %s", ", ".join(m.name for m in config.model_config_list.config))
        return await self._reconcile()

    def _poll_and_manage(self) -> list[str]:
        """The source pushes what is on disk, then the manager acts; a base path that could not be listed is
        raised after the manager ran (the other models were served)."""
        from services.model_server.source import SourceError

        failure = None
        try:
            self.source.poll()
        except SourceError as exc:
            failure = exc
        errors = self.manager.manage_state()
        if failure is not None:
            raise failure
        return errors

    async def _reconcile(self) -> list[str]:
        try:
            errors = await asyncio.get_running_loop().run_in_executor(None, self._poll_and_manage)
        finally:
            if self.core.batcher is not None:
                live = {id(r.servable) for name in self.manager.model_names()
                        for r in self.manager.status_records(name) if r.servable is not None}
                self.core.batcher.forget(live)
        for error in errors:
            log.error("%s", error)
        return errors

    async def _poll_config_file_once(self, last: list[str]) -> None:
        """Reload the config file if its content changed; a config that is refused raises (and is tried again)."""
        config = read_model_config(self.args.model_config_file)
        text = str(config)
        if text != last[0]:
            await self.reload_config(config)
            last[0] = text

    def _pollers(self) -> list[asyncio.Task]:
        from services.model_server.supervision import supervised_loop

        tasks = []
        if self.args.file_system_poll_wait_seconds > 0:
            tasks.append(asyncio.create_task(supervised_loop(
                "file_system_poll", self._reconcile, self.args.file_system_poll_wait_seconds, self._stopping)))
        if self.args.model_config_file and self.args.model_config_file_poll_wait_seconds > 0:
            last = [""]
            tasks.append(asyncio.create_task(supervised_loop(
                "config_file_poll", lambda: self._poll_config_file_once(last),
                self.args.model_config_file_poll_wait_seconds, self._stopping)))
        return tasks

    async def serve(self) -> None:
        from services.model_server.grpc_api import build_server
        from services.model_server.rest_api import RestApi

        if self.args.file_system_poll_wait_seconds >= 0:
            try:
                await self._reconcile()
            except OSError as exc:  # logged by the source; the poll loop tries again
                log.error("first file-system poll failed: %s", exc)
        grpc_server = build_server(self.core, self.reload_config, self.args.port, self.args.host)
        await grpc_server.start()
        runner = None
        if self.args.rest_api_port:
            path = self.monitoring.path if self.monitoring.enable else None
            runner = web.AppRunner(RestApi(self.core, path).app(), access_log=None,
                                   shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
            await runner.setup()
            await web.TCPSite(runner, self.args.host, self.args.rest_api_port).start()
        log.info("serving gRPC on %s:%d, REST on %s (metrics %s)", self.args.host, self.args.port,
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
        await self._drain(grpc_server, runner)

    async def _drain(self, grpc_server, runner) -> None:
        """Stop listening, give admitted requests SHUTDOWN_GRACE_SECONDS to finish (queued batches included), then
        fail what is left with UNAVAILABLE; a model call still running after that is abandoned, not waited for."""
        closing = [grpc_server.stop(grace=SHUTDOWN_GRACE_SECONDS)]
        if runner:
            closing.append(runner.cleanup())
        if self.core.batcher is not None:
            closing.append(self.core.batcher.close(SHUTDOWN_GRACE_SECONDS))
        await asyncio.gather(*closing)
        executor_stopped = threading.Thread(target=self.core.executor.shutdown, kwargs={"cancel_futures": True},
                                            daemon=True)
        executor_stopped.start()
        await asyncio.get_running_loop().run_in_executor(None, executor_stopped.join, 1.0)
        if executor_stopped.is_alive():
            log.warning("stopped with model calls still running past the grace period: abandoning them")
            logging.shutdown()
            os._exit(0)  # a normal interpreter exit would join the executor's threads and wait for those calls
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
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
