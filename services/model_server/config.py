"""Config files in TF Serving's text formats.

The model config parses with TF Serving's own protos. `tensorflow-serving-api` ships no proto for the batching and
monitoring files, so those small text-format files are read by ``parse_text_format`` into plain dicts.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from google.protobuf import text_encoding, text_format
from tensorflow_serving.config import model_server_config_pb2

_TOKEN = re.compile(r'\s*(?:(#[^\n]*|[,;])|([A-Za-z_][A-Za-z0-9_]*)|(\{|\}|:|<|>)|("(?:[^"\\]|\\.)*"|\'[^\']*\')|([-+0-9.eE]+))')


class ConfigError(ValueError):
    pass


def parse_text_format(text: str) -> dict:
    """A small protobuf text-format reader: ``name: value``, ``name { ... }``; repeated names become lists."""
    tokens = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ConfigError(f"cannot parse text format near: {text[pos:pos + 40]!r}")
        pos = m.end()
        comment, ident, punct, string, number = m.groups()
        if comment is None:
            tokens.append(ident or punct or string or number)
    tokens.reverse()

    def value(tok: str):
        if tok[0] in "\"'":
            return text_encoding.CUnescape(tok[1:-1]).decode("utf-8")
        if tok in ("true", "false"):
            return tok == "true"
        try:
            return int(tok)
        except ValueError:
            try:
                return float(tok)
            except ValueError:
                return tok  # enum name

    def block(closing: str | None) -> dict:
        out: dict = {}
        while tokens:
            tok = tokens.pop()
            if tok == closing:
                return out
            name = tok
            if not tokens:
                raise ConfigError(f"field {name!r} has no value")
            nxt = tokens.pop()
            if nxt == ":":
                nxt = tokens.pop()
            if nxt in ("{", "<"):
                item = block("}" if nxt == "{" else ">")
            else:
                item = value(nxt)
            if name in out:
                out[name] = out[name] if isinstance(out[name], list) else [out[name]]
                out[name].append(item)
            else:
                out[name] = item
        if closing:
            raise ConfigError("unbalanced braces")
        return out

    return block(None)


def _wrapped(d: dict, key: str, default):
    raw = d.get(key, default)
    return raw.get("value", default) if isinstance(raw, dict) else raw


@dataclass
class BatchingParameters:
    max_batch_size: int = 32
    batch_timeout_micros: int = 1000
    max_enqueued_batches: int = 100
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: list[int] = field(default_factory=list)
    pad_variable_length_inputs: bool = False

    @classmethod
    def from_text(cls, text: str) -> "BatchingParameters":
        d = parse_text_format(text)
        known = {"max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads",
                 "allowed_batch_sizes", "pad_variable_length_inputs", "thread_pool_name"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown batching parameters: {sorted(unknown)}")
        defaults = cls()
        allowed = d.get("allowed_batch_sizes", [])
        params = cls(
            max_batch_size=int(_wrapped(d, "max_batch_size", defaults.max_batch_size)),
            batch_timeout_micros=int(_wrapped(d, "batch_timeout_micros", defaults.batch_timeout_micros)),
            max_enqueued_batches=int(_wrapped(d, "max_enqueued_batches", defaults.max_enqueued_batches)),
            num_batch_threads=int(_wrapped(d, "num_batch_threads", defaults.num_batch_threads)),
            allowed_batch_sizes=sorted(int(x) for x in (allowed if isinstance(allowed, list) else [allowed])),
            pad_variable_length_inputs=bool(_wrapped(d, "pad_variable_length_inputs", False)),
        )
        if params.allowed_batch_sizes and params.allowed_batch_sizes[-1] != params.max_batch_size:
            raise ConfigError("the last allowed_batch_sizes entry must equal max_batch_size (as in TF Serving)")
        return params


@dataclass
class MonitoringConfig:
    enable: bool = False
    path: str = "/monitoring/prometheus/metrics"

    @classmethod
    def from_text(cls, text: str) -> "MonitoringConfig":
        prom = parse_text_format(text).get("prometheus_config", {})
        return cls(enable=bool(prom.get("enable", False)), path=prom.get("path") or cls.path)


@dataclass
class SslConfig:
    """TF Serving's SSLConfig (--ssl_config_file): the server's key and certificate (PEM), an optional CA to check
    clients against, and whether clients must present a certificate."""
    server_key: str = ""
    server_cert: str = ""
    custom_ca: str = ""
    client_verify: bool = False

    @classmethod
    def from_text(cls, text: str) -> "SslConfig":
        d = parse_text_format(text)
        unknown = set(d) - {"server_key", "server_cert", "custom_ca", "client_verify"}
        if unknown:
            raise ConfigError(f"unknown SSLConfig fields: {sorted(unknown)}")
        config = cls(server_key=d.get("server_key", ""), server_cert=d.get("server_cert", ""),
                     custom_ca=d.get("custom_ca", ""), client_verify=bool(d.get("client_verify", False)))
        if not config.server_key or not config.server_cert:
            raise ConfigError("SSLConfig needs server_key and server_cert")
        return config


def read_model_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from None
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        # what TF Serving prints (protobuf's text parser, then ParseProtoTextFile's status)
        raise ConfigError(f"Error parsing text-format {config.DESCRIPTOR.full_name}: {exc}\n"
                          f"Invalid protobuf file: '{path}'") from None
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{path}: only model_config_list is supported")
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ConfigError(f"{path}: every model needs a name and a base_path")
    return config


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name, model.base_path, model.model_platform = name, base_path, "tensorflow"
    return config
