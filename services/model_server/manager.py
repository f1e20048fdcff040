"""The manager: loads and unloads servables to match the aspired versions, never dropping availability.

A version no longer aspired is unloaded only once another aspired version of its model is AVAILABLE, unless its
folder is gone from disk. A version that fails to load is retried on later polls, then left in an error state that
GetModelStatus reports; the other versions keep serving.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import grpc
from tensorflow_serving.config import model_server_config_pb2

from services.model_server import metrics
from services.model_server.errors import ServingError
from services.model_server.servable import Servable, load_servable
from services.model_server.source import aspired_versions

log = logging.getLogger("model_server.manager")
LABEL_RE = re.compile(r"^[a-zA-Z0-9_]+$")


class State(IntEnum):  # the numbers of tensorflow.serving.ModelVersionStatus.State
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass
class VersionRecord:
    version: int
    path: Path
    state: State = State.START
    servable: Servable | None = None
    error: str = ""
    failures: int = 0


class Manager:
    def __init__(self, max_load_retries: int = 5, allow_labels_for_unavailable: bool = False,
                 load=load_servable):
        self.max_load_retries = max_load_retries
        self.load = load  # (model_name, version, path) -> (Servable, seconds): how a version is loaded
        self.allow_labels_for_unavailable = allow_labels_for_unavailable
        self._lock = threading.RLock()
        self._reconcile_lock = threading.Lock()
        self._configs: dict[str, model_server_config_pb2.ModelConfig] = {}
        self._versions: dict[str, dict[int, VersionRecord]] = {}
        self._labels: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ configuration
    def set_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        models = {m.name: m for m in config.model_config_list.config}
        for name, model in models.items():
            for label in model.version_labels:
                if not LABEL_RE.match(label):
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Invalid version label: '{label}' (must match [a-zA-Z0-9_]+)")
        with self._lock:
            self._configs = models
            for name in models:
                self._versions.setdefault(name, {})
                self._labels.setdefault(name, {})

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._configs)

    def has_model(self, name: str) -> bool:
        """Whether ``name`` is a configured model (per request: no lock, no copy; set_config swaps the dict whole)."""
        return name in self._configs

    # ------------------------------------------------------------------ reconciliation
    def reconcile(self) -> list[str]:
        """One pass: load what is aspired, unload what is not; returns the label errors of this pass."""
        with self._reconcile_lock:
            with self._lock:
                configs = dict(self._configs)
                removed = [name for name in self._versions if name not in configs]
            for name in removed:
                self._unload_model(name)
            errors: list[str] = []
            for name, model in configs.items():
                self._reconcile_model(name, model)
                errors += self._apply_labels(name, model)
            metrics.LOADED_VERSIONS.clear()
            with self._lock:
                for name, records in self._versions.items():
                    available = sum(r.state == State.AVAILABLE for r in records.values())
                    metrics.LOADED_VERSIONS.labels(model_name=name).set(available)
            return errors

    def _reconcile_model(self, name: str, model: model_server_config_pb2.ModelConfig) -> None:
        aspired = aspired_versions(model)
        with self._lock:
            records = self._versions.setdefault(name, {})
            for version, path in aspired.items():
                record = records.get(version)
                if record is None or (record.state == State.END and record.servable is None and not record.error):
                    records[version] = VersionRecord(version, path)
        for version in sorted(aspired, reverse=True):
            record = records[version]
            if record.state == State.START:
                self._load(name, record)
        with self._lock:
            any_available = any(records[v].state == State.AVAILABLE for v in aspired)
            stale = [r for v, r in records.items() if v not in aspired and r.state != State.END]
        for record in stale:
            folder_gone = not record.path.is_dir()
            if folder_gone or any_available or record.state != State.AVAILABLE:
                self._unload(name, record, "its folder was removed" if folder_gone else "no longer aspired")
        with self._lock:  # forget errors of versions that left the disk, so a re-published folder is tried anew
            for version in [v for v, r in records.items() if r.state == State.END and not r.path.is_dir()]:
                del records[version]

    def _load(self, name: str, record: VersionRecord) -> None:
        record.state = State.LOADING
        try:
            servable, seconds = self.load(name, record.version, record.path)
        except Exception as exc:  # noqa: BLE001 - any failure to load is reported the same way
            record.failures += 1
            record.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            if record.failures > self.max_load_retries:
                record.state = State.END
                log.error("giving up on %s version %d after %d attempts: %s", name, record.version,
                          record.failures, record.error)
            else:
                record.state = State.START
                log.warning("failed to load %s version %d (attempt %d, will retry): %s", name, record.version,
                            record.failures, record.error)
            metrics.LOAD_FAILURES.labels(model_name=name).inc()
            return
        metrics.LOAD_SECONDS.labels(model_name=name).observe(seconds)
        with self._lock:
            record.servable, record.error, record.state = servable, "", State.AVAILABLE

    def _unload(self, name: str, record: VersionRecord, why: str) -> None:
        with self._lock:
            record.state = State.UNLOADING
            record.servable = None
            record.state = State.END
            record.error = ""
        log.info("unloaded %s version %d (%s)", name, record.version, why)

    def _unload_model(self, name: str) -> None:
        with self._lock:
            records = self._versions.pop(name, {})
            self._labels.pop(name, None)
        for record in records.values():
            if record.servable is not None:
                log.info("unloaded %s version %d (model removed from config)", name, record.version)

    def _apply_labels(self, name: str, model: model_server_config_pb2.ModelConfig) -> list[str]:
        errors = []
        with self._lock:
            records = self._versions.get(name, {})
            current = self._labels.setdefault(name, {})
            wanted = dict(model.version_labels)
            for label in list(current):
                if label not in wanted:
                    del current[label]
            for label, version in wanted.items():
                available = version in records and records[version].state == State.AVAILABLE
                if available or (self.allow_labels_for_unavailable and label not in current):
                    current[label] = version
                elif current.get(label) != version:
                    errors.append(f"model {name}: label '{label}' cannot point at version {version}: "
                                  "it is not AVAILABLE")
        return errors

    # ------------------------------------------------------------------ lookups
    def _labelled_version(self, name: str, label: str) -> int:
        """The version a label points at (caller holds the lock)."""
        try:
            return self._labels[name][label]
        except KeyError:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Unrecognized servable version label: {label}") from None

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        with self._lock:
            if name not in self._configs:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: Latest({name})")
            records = self._versions.get(name, {})
            if label:
                version = self._labelled_version(name, label)
            if version is not None:
                record = records.get(version)
                if record is None or record.servable is None:
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"Servable not found for request: Specific({name}, {version})")
                return record.servable
            available = [r for r in records.values() if r.servable is not None]
            if not available:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
            return max(available, key=lambda r: r.version).servable

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionRecord]:
        with self._lock:
            if name not in self._configs:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
            records = self._versions.get(name, {})
            if label:
                version = self._labelled_version(name, label)
            if version is not None:
                if version not in records:
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"Could not find version {version} of model {name}")
                return [records[version]]
            if not records:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
            return [records[v] for v in sorted(records)]

    def status_records(self, name: str) -> list[VersionRecord]:
        with self._lock:
            return list(self._versions.get(name, {}).values())

    def labels(self, name: str) -> dict[str, int]:
        with self._lock:
            return dict(self._labels.get(name, {}))
