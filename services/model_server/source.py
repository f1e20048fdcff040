"""The file-system source: which versions of a model *should* be loaded, from its base path and version policy."""
from __future__ import annotations

import logging
from pathlib import Path

from tensorflow_serving.config import model_server_config_pb2

log = logging.getLogger("model_server.source")


def versions_on_disk(base_path: str | Path) -> dict[int, Path]:
    """Children whose name parses as an integer and that are directories; anything else (`.tmp-…`) is ignored."""
    base = Path(base_path)
    found: dict[int, Path] = {}
    try:
        children = list(base.iterdir())
    except FileNotFoundError:
        return found
    for child in children:
        name = child.name
        if name.isdigit() and child.is_dir():
            found[int(name)] = child
    return found


def aspired_versions(model: model_server_config_pb2.ModelConfig) -> dict[int, Path]:
    """Apply the model's version policy (default: latest 1) to what is on disk."""
    on_disk = versions_on_disk(model.base_path)
    policy = model.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return on_disk
    if kind == "specific":
        wanted = set(policy.specific.versions)
        missing = wanted - set(on_disk)
        if missing:
            log.warning("model %s: specific versions %s are not on disk", model.name, sorted(missing))
        return {v: p for v, p in on_disk.items() if v in wanted}
    num = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
    return {v: on_disk[v] for v in sorted(on_disk)[-num:]}
