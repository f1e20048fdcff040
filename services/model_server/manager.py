"""The manager: holds the loaders the source aspires, and loads and unloads servables as the version policy says.

The source pushes each model's aspired versions (``set_aspired_versions``); ``manage_state`` then applies
``version_policy.next_action`` until it has nothing left to do, loading one version at a time. A version that
fails to load is retried as TF Serving's LoaderHarness retries it: up to ``max_load_retries`` times, each at the
first pass at least ``load_retry_interval`` seconds after the last attempt, LOADING meanwhile; then it is left in END
with its error, which GetModelStatus reports, and counts as aspired for as long as the source aspires it. Unlike TF
Serving, such a version is tried again (from scratch) once the source sees other contents in its folder: a folder
copied in place is seen before its last file lands. Requests hold the Servable they resolved: unloading a version
only stops new requests from reaching it.

Version labels change only with the config (``set_config``), checked as TF Serving's ServerCore::ReloadConfig checks
them (UpdateModelVersionLabelMap), before any of the config's models change. The states of a model taken out of the
config are kept, in END, as TF Serving's servable state monitor keeps them.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from tensorflow_serving.config import model_server_config_pb2

from services.model_server import metrics
from services.model_server.errors import ServingError
from services.model_server.loader import Loader
from services.model_server.version_policy import Action, Kind, State, next_action

if TYPE_CHECKING:  # the manager never builds a servable itself: its loaders do
    from services.model_server.servable import Servable

log = logging.getLogger("model_server.manager")
LABEL_RE = re.compile(r"^[a-zA-Z0-9_]+$")

__all__ = ["Manager", "State", "VersionRecord"]


@dataclass
class VersionRecord:
    version: int
    path: Path
    state: State = State.START
    servable: Servable | None = None
    error: str = ""  # why it was given up on (END)
    failures: int = 0  # failed load attempts
    retry_at: float | None = None  # LOADING after a failed attempt: when (the clock's time) to try again
    aspired: bool = True
    loader: Loader | None = field(default=None, repr=False)


class Manager:
    def __init__(self, max_load_retries: int = 5, allow_labels_for_unavailable: bool = False,
                 load_retry_interval: float = 60.0, clock=time.monotonic):
        """``max_load_retries`` and ``load_retry_interval`` (seconds) are --max_num_load_retries and
        --load_retry_interval_micros; ``clock`` tells the time retries are due by."""
        self.max_load_retries = max_load_retries
        self.load_retry_interval = max(0.0, load_retry_interval)
        self.clock = clock
        self.allow_labels_for_unavailable = allow_labels_for_unavailable
        self._lock = threading.RLock()
        self._manage_lock = threading.Lock()
        self._configs: dict[str, model_server_config_pb2.ModelConfig] = {}
        self._versions: dict[str, dict[int, VersionRecord]] = {}
        self._labels: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ configuration
    def set_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Make ``config`` the one in force, with its version labels. Refuses it (ServingError, changing nothing) for
        an invalid label (INVALID_ARGUMENT) or, as TF Serving's UpdateModelVersionLabelMap, a label on a version that
        is not AVAILABLE now (FAILED_PRECONDITION). ``allow_labels_for_unavailable``
        (--allow_version_labels_for_unavailable_models) lets a new label, or one that keeps its version, point at a
        version not loaded yet; an existing label still moves only to an AVAILABLE version."""
        models = {m.name: m for m in config.model_config_list.config}
        labels: dict[str, dict[str, int]] = {}
        with self._lock:
            for name, model in models.items():
                for label, version in model.version_labels.items():
                    if not LABEL_RE.match(label):
                        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                           f"Invalid version label: '{label}' (must match [a-zA-Z0-9_]+)")
                    current = self._labels.get(name, {}).get(label)
                    allowed = self.allow_labels_for_unavailable and current in (None, version)
                    record = self._versions.get(name, {}).get(version)
                    if not allowed and (record is None or record.state != State.AVAILABLE):
                        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"Request to assign label to version {version} of model {name}, which "
                                           "is not currently available for inference")
                    labels.setdefault(name, {})[label] = version
            self._configs = models
            self._labels = labels
            for name in models:
                self._versions.setdefault(name, {})

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._configs)

    def has_model(self, name: str) -> bool:
        """Whether ``name`` is a configured model (per request: no lock, no copy; set_config swaps the dict whole)."""
        return name in self._configs

    # ------------------------------------------------------------------ the source's callback
    def set_aspired_versions(self, name: str, loaders: dict[int, Loader]) -> None:
        """The full list of aspired versions of ``name``; supersedes the previous call. Cheap: nothing loads here."""
        with self._lock:
            records = self._versions.setdefault(name, {})
            for version, loader in loaders.items():
                record = records.get(version)
                if record is None or (record.state == State.END and not record.aspired):
                    records[version] = VersionRecord(version, loader.path, loader=loader)  # new, or aspired anew
                elif (record.state == State.END and record.error and record.loader is not None
                      and loader.contents != record.loader.contents):
                    log.info("%s version %d: its folder changed since it failed to load; loading it again", name,
                             version)
                    records[version] = VersionRecord(version, loader.path, loader=loader)
            for version, record in list(records.items()):
                record.aspired = version in loaders
                if not record.aspired and (record.state == State.START or record.retry_at is not None):
                    del records[version]  # never loaded (or waiting for a retry) and no longer wanted
                elif not record.aspired and record.state == State.END and record.error:
                    del records[version]  # a failed version the source dropped is forgotten (TF Serving flushes it)

    # ------------------------------------------------------------------ acting on the policy
    def manage_state(self) -> None:
        """Apply the version policy to every model until it has nothing left to do."""
        with self._manage_lock:
            with self._lock:
                configs = dict(self._configs)
                removed = [name for name in self._versions if name not in configs]
            for name in removed:
                self._unload_model(name)
            for name in configs:
                self._manage_model(name)
            metrics.LOADED_VERSIONS.clear()
            with self._lock:
                for name in configs:
                    available = sum(r.state == State.AVAILABLE for r in self._versions.get(name, {}).values())
                    metrics.LOADED_VERSIONS.labels(model_name=name).set(available)

    def _manage_model(self, name: str) -> None:
        tried: set[int] = set()  # one load attempt per version per pass
        while True:
            with self._lock:
                records = self._versions.get(name, {})
                states = {v: r.state for v, r in records.items()}
                aspired = {v for v, r in records.items() if r.aspired}
                action = next_action(states, aspired)
                now = self.clock()
                # loads in progress, as the policy sees them (LOADING), whose retry is due
                due = [r for v, r in records.items()
                       if r.aspired and r.retry_at is not None and r.retry_at <= now and v not in tried]
                if due and (action is None or action.kind is Kind.LOAD):  # unloads still come first
                    action = Action(Kind.LOAD, max(r.version for r in due))
                record = records.get(action.version) if action else None
            if action is None or record is None:
                return
            if action.kind is Kind.UNLOAD:
                self._unload(name, record, "no longer aspired")
            else:
                tried.add(action.version)
                self._load(name, record)

    def _load(self, name: str, record: VersionRecord) -> None:
        """One load attempt; a failed one is retried later (LOADING, ``retry_at``) or, past the retries, ends in END
        with its error."""
        with self._lock:
            record.state, record.retry_at = State.LOADING, None
        try:
            servable = (record.loader or Loader(name, record.version, record.path)).load()
        except Exception as exc:  # noqa: BLE001 - any failure to load is reported the same way
            message = str(exc).strip()
            error = f"{type(exc).__name__}: {message.splitlines()[0][:300] if message else ''}"
            with self._lock:
                record.failures += 1
                if record.failures > self.max_load_retries:
                    record.state, record.error = State.END, error
                else:
                    record.retry_at = self.clock() + self.load_retry_interval
            if record.state == State.END:
                log.error("giving up on %s version %d after %d attempts: %s", name, record.version,
                          record.failures, error)
            else:
                log.warning("failed to load %s version %d (attempt %d, retry in %.0f s): %s", name, record.version,
                            record.failures, self.load_retry_interval, error)
            metrics.LOAD_FAILURES.labels(model_name=name).inc()
            return
        with self._lock:
            record.servable, record.error, record.state = servable, "", State.AVAILABLE

    def seconds_to_next_retry(self) -> float | None:
        """How long until the next failed load is due to be retried (0 if one is due now); None if none waits."""
        with self._lock:
            due = [r.retry_at for records in self._versions.values() for r in records.values()
                   if r.retry_at is not None and r.aspired]
        return max(0.0, min(due) - self.clock()) if due else None

    def _unload(self, name: str, record: VersionRecord, why: str) -> None:
        with self._lock:
            record.state = State.UNLOADING
            record.servable = None  # requests that resolved it keep their reference until they finish
            record.state = State.END
            record.error = ""
        log.info("unloaded %s version %d (%s)", name, record.version, why)

    def _unload_model(self, name: str) -> None:
        """A model taken out of the config: its versions unload and stay, in END, for GetModelStatus."""
        with self._lock:
            loaded = [r for r in self._versions.get(name, {}).values() if r.state != State.END]
            for record in loaded:
                record.servable, record.state, record.aspired, record.retry_at = None, State.END, False, None
        for record in loaded:
            log.info("unloaded %s version %d (model removed from config)", name, record.version)

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

    def status(self, name: str, version: int | None = None) -> list[VersionRecord]:
        """GetModelStatus as TF Serving answers it (get_model_status_impl.cc): one version, or every version newest
        first (a version label is not read); a model once configured keeps its last states."""
        with self._lock:
            records = self._versions.get(name, {})
            if version is not None:
                if version not in records:
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"Could not find version {version} of model {name}")
                return [records[version]]
            if not records:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
            return [records[v] for v in sorted(records, reverse=True)]

    def status_records(self, name: str) -> list[VersionRecord]:
        with self._lock:
            return list(self._versions.get(name, {}).values())

    def labels(self, name: str) -> dict[str, int]:
        with self._lock:
            return dict(self._labels.get(name, {}))
