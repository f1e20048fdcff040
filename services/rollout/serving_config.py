"""New versions reach the model server (opt-in, ``--serve-new-versions CONFIG``).

Operators keep routed versions loaded with a ``specific`` version policy (README, "Keeping routed versions loaded"):
under ``latest`` a newer folder, even a broken one, unloads the oldest version. A ``specific`` list also means a
freshly published version is not served until it is listed, so the controller, which exists to roll new versions
out, lists it: each newer version folder in the registry (training_job.registry's rule) is appended to the model's
``specific`` versions in the model server's config file (atomic rename; the model server re-reads the file every
``--model_config_file_poll_wait_seconds``). A model under another policy is left alone (``latest`` and ``all`` serve
new folders by themselves).

Left at that, every published version (rejected ones included) would stay loaded in every replica forever. So the
controller, while no rollout is in progress, also retires versions (``retire_versions``) by the rule the local stack
uses (``served_versions``): a listed version stays while it is among the newest ``NEWEST_SERVED`` on disk, is the
stable version, is named by the gateway's routing table (weight or shadow) or has a version label; the rest leave the
list. Without the routing table nothing leaves, and the list is never emptied.

In Kubernetes and compose that file lives on a volume shared by every TF Serving replica and the controller, seeded
once from the shipped config: ``python -m services.rollout.serving_config --seed SEED CONFIG`` (an initContainer of
both Deployments, compose's one-shot ``tfserving-config`` service) copies SEED to CONFIG unless CONFIG exists, so a
restart never loses the versions the controller listed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from training_job.registry import versions

NEWEST_SERVED = 2  # the newest versions on disk are always served, so a second version is ready for an A/B split


def served_versions(on_disk: Iterable[int], pinned: Iterable[int] = (), labels: Mapping[str, int] | None = None,
                    newest: int = NEWEST_SERVED) -> list[int]:
    """The versions a ``specific`` policy lists: the ``newest`` on disk, every pinned version (routed, or kept by an
    operator) and every version a label points at."""
    return sorted(set(sorted(on_disk)[-newest:] if newest > 0 else []) | set(pinned) | set((labels or {}).values()))


def routed_versions(routing: dict) -> set[int]:
    """The versions a gateway's routing table (GET /v1/admin/routing) names: every weighted entry (weight 0
    included: the gateway refuses a table naming a version that is not AVAILABLE), the shadow, and every version the
    effective split sends traffic to now. A label resolves through the table's ``resolved`` map."""
    resolved = routing.get("resolved") or {}
    named = [*(routing.get("weights") or {}), *([routing["shadow"]] if routing.get("shadow") is not None else [])]
    routed = {int(v) for v, weight in (routing.get("effective") or {}).items() if weight > 0}
    for entry in named:
        version = resolved.get(str(entry), entry)
        if isinstance(version, int) or str(version).isdigit():
            routed.add(int(version))
    return routed


def retirable(listed: Iterable[int], on_disk: Iterable[int], labels: Mapping[str, int], stable: int | None,
              routing: dict | None, rolling: bool, newest: int = NEWEST_SERVED) -> list[int]:
    """The listed versions the model server may unload: not among ``served_versions`` (the ``newest`` on disk, the
    ``stable`` version, every version the ``routing`` table names, every labelled version). None while a rollout is
    ``rolling``, without the routing table (None: unreadable), without a stable version, with no version on disk (the
    registry not mounted), or when nothing listed would stay."""
    listed, on_disk = set(listed), list(on_disk)
    if rolling or routing is None or stable is None or not on_disk:
        return []
    keep = served_versions(on_disk, {stable} | routed_versions(routing), labels, newest)
    removable = sorted(listed - set(keep))
    return removable if listed - set(removable) else []


def _read_specific(path: Path, model_name: str):
    """(the parsed config, ``model_name``'s entry), the entry None unless it has a ``specific`` policy."""
    config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    model = next((m for m in config.model_config_list.config if m.name == model_name), None)
    if model is None or model.model_version_policy.WhichOneof("policy_choice") != "specific":
        return config, None
    return config, model


def _replace(path: Path, config) -> None:
    """Write ``config`` over ``path`` by atomic rename: the model server never reads half a file."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    staging.write_text(text_format.MessageToString(config))
    os.replace(staging, path)


def serve_new_versions(config_path: str | Path, model_name: str) -> list[int]:
    """Append to ``model_name``'s ``specific`` list every version on disk newer than the newest listed; returns the
    versions added (none when the model's policy is not ``specific`` or nothing is new)."""
    path = Path(config_path)
    config, model = _read_specific(path, model_name)
    if model is None:
        return []
    listed = list(model.model_version_policy.specific.versions)
    newest_listed = max(listed, default=0)
    added = [v for v in versions(Path(model.base_path)) if v > newest_listed]
    if not added:
        return []
    model.model_version_policy.specific.versions.extend(added)
    _replace(path, config)
    return added


def retire_versions(config_path: str | Path, model_name: str, stable: int | None, routing: dict | None,
                    rolling: bool = False, newest: int = NEWEST_SERVED) -> list[int]:
    """Remove from ``model_name``'s ``specific`` list the ``retirable`` versions (the model server unloads them at
    its next config poll); returns them. Labels and every other field are kept; a model under another policy is
    left alone."""
    path = Path(config_path)
    config, model = _read_specific(path, model_name)
    if model is None:
        return []
    specific = model.model_version_policy.specific
    removed = retirable(specific.versions, versions(Path(model.base_path)), dict(model.version_labels), stable,
                        routing, rolling, newest)
    if not removed:
        return []
    kept = [v for v in specific.versions if v not in removed]
    del specific.versions[:]
    specific.versions.extend(kept)
    _replace(path, config)
    return removed


def seed_config(seed: str | Path, config_path: str | Path) -> bool:
    """Copy ``seed`` to ``config_path`` unless a file is there already; True when this call created it. The copy is
    complete before it appears (a hard link of a finished staging file, which fails if the name exists), so pods
    seeding at once never see half a file and never overwrite each other or a config the controller wrote."""
    path = Path(config_path)
    if path.exists():
        return False
    staging = path.with_name(f".{path.name}.seed.{uuid.uuid4().hex}")
    shutil.copyfile(seed, staging)
    try:
        os.link(staging, path)
    except FileExistsError:
        return False
    finally:
        staging.unlink()
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.rollout.serving_config",
                                description="Seed the model server's writable --model_config_file.")
    p.add_argument("--seed", required=True, metavar="SEED", help="the shipped config (e.g. a mounted ConfigMap)")
    p.add_argument("config", help="the model server's --model_config_file, on a volume the controller writes")
    args = p.parse_args(argv)
    created = seed_config(args.seed, args.config)
    print(f"{args.config}: {'seeded from ' + args.seed if created else 'kept (already there)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
