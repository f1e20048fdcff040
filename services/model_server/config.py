"""Config files in TF Serving's text formats, parsed by protobuf with TF Serving's messages.

The model config uses tensorflow-serving-api's ``ModelServerConfig``; the batching, monitoring and SSL files use
``tensorflow.serving.BatchingParameters``, ``MonitoringConfig`` and ``SSLConfig`` compiled from ``protos/tfs_config/`` (see
services.protos), so a misspelled or unknown field is refused exactly as TF Serving refuses it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from services import protos


class ConfigError(ValueError):
    pass


def parse_text_proto(text: str, message_type, what: str):
    """``text`` parsed into a new ``message_type``; a ConfigError in TF Serving's words if it does not parse
    (protobuf's text parser's message, then ParseProtoTextFile's status naming ``what``, the file)."""
    message = message_type()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"Error parsing text-format {message.DESCRIPTOR.full_name}: {exc}\n"
                          f"Invalid protobuf file: '{what}'") from None
    return message


@dataclass
class BatchingParameters:
    """TF Serving's BatchingParameters with its defaults filled in (SharedBatchScheduler's and BatchingSession's)."""
    max_batch_size: int = 32
    batch_timeout_micros: int = 1000
    max_enqueued_batches: int = 100
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    thread_pool_name: str = "batch_threads"  # the label of the batch queue's queuing_latency
    allowed_batch_sizes: list[int] = field(default_factory=list)
    pad_variable_length_inputs: bool = False

    @classmethod
    def from_text(cls, text: str, what: str = "batching parameters") -> "BatchingParameters":
        message = parse_text_proto(text, protos.load("tfs_config.batching_parameters_pb2").BatchingParameters, what)
        if message.enable_large_batch_splitting.value:
            raise ConfigError(f"{what}: enable_large_batch_splitting is not implemented by this server (a request "
                              "larger than max_batch_size is refused instead of split)")
        defaults = cls()

        def wrapped(name: str, default):
            return getattr(message, name).value if message.HasField(name) else default

        params = cls(
            max_batch_size=wrapped("max_batch_size", defaults.max_batch_size),
            batch_timeout_micros=wrapped("batch_timeout_micros", defaults.batch_timeout_micros),
            max_enqueued_batches=wrapped("max_enqueued_batches", defaults.max_enqueued_batches),
            num_batch_threads=wrapped("num_batch_threads", defaults.num_batch_threads),
            thread_pool_name=wrapped("thread_pool_name", defaults.thread_pool_name),
            allowed_batch_sizes=list(message.allowed_batch_sizes),
            pad_variable_length_inputs=message.pad_variable_length_inputs,
        )
        if params.allowed_batch_sizes != sorted(params.allowed_batch_sizes):
            raise ConfigError(f"{what}: allowed_batch_sizes must be in increasing order (as in TF Serving)")
        if params.allowed_batch_sizes and params.allowed_batch_sizes[-1] != params.max_batch_size:
            raise ConfigError("the last allowed_batch_sizes entry must equal max_batch_size (as in TF Serving)")
        return params


@dataclass
class MonitoringConfig:
    enable: bool = False
    path: str = "/monitoring/prometheus/metrics"

    @classmethod
    def from_text(cls, text: str, what: str = "monitoring config") -> "MonitoringConfig":
        message = parse_text_proto(text, protos.load("tfs_config.monitoring_config_pb2").MonitoringConfig, what)
        prometheus = message.prometheus_config
        return cls(enable=prometheus.enable, path=prometheus.path or cls.path)


@dataclass
class SslConfig:
    """TF Serving's SSLConfig (--ssl_config_file): the server's key and certificate (PEM), an optional CA to check
    clients against, and whether clients must present a certificate."""
    server_key: str = ""
    server_cert: str = ""
    custom_ca: str = ""
    client_verify: bool = False

    @classmethod
    def from_text(cls, text: str, what: str = "SSL config") -> "SslConfig":
        message = parse_text_proto(text, protos.load("tfs_config.ssl_config_pb2").SSLConfig, what)
        config = cls(server_key=message.server_key, server_cert=message.server_cert, custom_ca=message.custom_ca,
                     client_verify=message.client_verify)
        if not config.server_key or not config.server_cert:
            raise ConfigError("SSLConfig needs server_key and server_cert")
        return config


def read_model_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from None
    config = parse_text_proto(text, model_server_config_pb2.ModelServerConfig, path)
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{path}: only model_config_list is supported")
    return config


def check_model_config_list(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Refuse (ConfigError, in TF Serving's words) a model list tensorflow_model_server refuses: a model without a
    name or base path, a model listed twice or with a relative base path (server_core.cc ValidateModelConfigList),
    neither or both of model_platform and the deprecated model_type (GetPlatform), a platform other than
    "tensorflow" (CreateStoragePathRoutes)."""
    seen = set()
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ConfigError("every model needs a name and a base_path")
        if model.name in seen:
            raise ConfigError(f"Illegal to list model {model.name} multiple times in config list")
        seen.add(model.name)
    for model in config.model_config_list.config:
        if "://" not in model.base_path and not model.base_path.startswith("/"):
            raise ConfigError(f"Expected model {model.name} to have an absolute path or URI; got "
                              f"base_path()={model.base_path}")
    for model in config.model_config_list.config:
        if model.model_type and model.model_platform:
            raise ConfigError("Illegal setting both ModelServerConfig::model_type (deprecated) and "
                              f"ModelServerConfig::model_platform, model name is {model.name}")
        if model.model_type and model.model_type != model_server_config_pb2.TENSORFLOW:
            raise ConfigError(f"ModelServerConfig::model_type choice {model.model_type} not supported.")
        platform = "tensorflow" if model.model_type else model.model_platform
        if not platform:
            raise ConfigError("Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                              f"ModelServerConfig::model_platform, model name is {model.name}")
        if platform != "tensorflow":
            raise ConfigError(f"Model {model.name} requests unsupported platform {platform}")


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name, model.base_path, model.model_platform = name, base_path, "tensorflow"
    return config
