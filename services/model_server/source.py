"""The file-system source: which versions of each model *should* be loaded, from its base path and version policy.

Like TF Serving's FileSystemStoragePathSource it *pushes*: each ``poll()`` calls ``set_aspired_versions(model,
loaders)`` with the full list of aspired versions of every model it could list, and each call supersedes the
previous one. A base path that cannot be listed changes nothing for its model (a transient error never unloads a
version): a missing one is logged, any other OSError is logged and raised (after the other models were polled), so
the supervised poll loop counts it and backs off.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from tensorflow_serving.config import model_server_config_pb2

from services.model_server.loader import LoadOptions, Loader
from training_job.registry import version_dirs

log = logging.getLogger("model_server.source")

AspiredVersionsCallback = Callable[[str, dict[int, Loader]], None]


class SourceError(OSError):
    """Some base paths could not be listed; their models keep their previous aspired versions."""


def versions_on_disk(base_path: str | Path) -> dict[int, Path]:
    """The version folders under ``base_path`` by the registry's rule (training_job/registry.py). Raises
    FileNotFoundError if the base path is missing, OSError if it cannot be listed."""
    return version_dirs(base_path)


def folder_contents(folder: Path) -> tuple:
    """Every file below ``folder`` with its size and modification time, sorted: what changes while a copy lands in
    it. Files that vanish while it is read are left out."""
    entries = []
    for root, _, files in os.walk(folder):
        for file in files:
            path = os.path.join(root, file)
            try:
                stat = os.stat(path)
            except OSError:
                continue
            entries.append((os.path.relpath(path, folder), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def specific_versions(model: model_server_config_pb2.ModelConfig) -> frozenset[int]:
    policy = model.model_version_policy
    return frozenset(policy.specific.versions) if policy.WhichOneof("policy_choice") == "specific" else frozenset()


def select_versions(model: model_server_config_pb2.ModelConfig, on_disk: dict[int, Path]) -> dict[int, Path]:
    """Apply the model's version policy (default: latest 1) to what is on disk."""
    policy = model.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return dict(on_disk)
    if kind == "specific":
        wanted = specific_versions(model)
        return {v: p for v, p in on_disk.items() if v in wanted}
    num = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
    return {v: on_disk[v] for v in sorted(on_disk)[-num:]}


def aspired_versions(model: model_server_config_pb2.ModelConfig) -> dict[int, Path]:
    """The versions the policy aspires now ({} when the base path is missing)."""
    try:
        return select_versions(model, versions_on_disk(model.base_path))
    except FileNotFoundError:
        return {}


class FileSystemSource:
    def __init__(self, set_aspired_versions: AspiredVersionsCallback, loader_options: LoadOptions = LoadOptions()):
        self._set_aspired_versions = set_aspired_versions
        self.loader_options = loader_options  # how every version this source aspires is loaded (the flags)
        self._models: dict[str, model_server_config_pb2.ModelConfig] = {}
        self._missing: set[str] = set()  # models whose base path was missing at the last poll (logged once)
        self._missing_specific: dict[str, frozenset[int]] = {}  # specific versions not on disk (logged on change)

    def set_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """The models to watch; a model no longer configured gets an empty aspired list (all its versions go)."""
        models = {m.name: m for m in config.model_config_list.config}
        for name in set(self._models) - set(models):
            self._set_aspired_versions(name, {})
        self._models = models

    def poll(self) -> None:
        failures = []
        for name, model in list(self._models.items()):
            try:
                on_disk = versions_on_disk(model.base_path)
            except FileNotFoundError:
                if name not in self._missing:
                    log.warning("model %s: base path %s does not exist (yet); nothing changes until it does",
                                name, model.base_path)
                    self._missing.add(name)
                continue
            except OSError as exc:
                log.error("model %s: cannot list base path %s: %s (its versions stay as they are)",
                          name, model.base_path, exc)
                failures.append(f"{name}: {exc}")
                continue
            self._missing.discard(name)
            missing = specific_versions(model) - set(on_disk)
            if missing and self._missing_specific.get(name) != missing:
                log.warning("model %s: specific versions %s are not on disk", name, sorted(missing))
            self._missing_specific[name] = missing
            chosen = select_versions(model, on_disk)
            self._set_aspired_versions(name, {v: Loader(name, v, p, self.loader_options, folder_contents(p))
                                              for v, p in chosen.items()})
        if failures:
            raise SourceError("; ".join(failures))
