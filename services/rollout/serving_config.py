"""New versions reach the model server (opt-in, ``--serve-new-versions CONFIG``).

Operators keep routed versions loaded with a ``specific`` version policy (README, "Keeping routed versions loaded"):
under ``latest`` a newer folder, even a broken one, unloads the oldest version. A ``specific`` list also means a
freshly published version is not served until it is listed, so the controller, which exists to roll new versions
out, lists it: each newer version folder in the registry (training_job.registry's rule) is appended to the model's
``specific`` versions in the model server's config file (atomic rename; the model server re-reads the file every
``--model_config_file_poll_wait_seconds``). Versions are only ever added; nothing already listed is removed. A model
under another policy is left alone (``latest`` and ``all`` serve new folders by themselves).

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
    """The versions a gateway's routing table (GET /v1/admin/routing) sends traffic or shadow copies to now."""
    routed = {int(v) for v, weight in (routing.get("effective") or {}).items() if weight > 0}
    resolved = routing.get("resolved") or {}
    shadow = routing.get("shadow")
    if shadow is not None:
        shadow_version = resolved.get(str(shadow), shadow)
        if isinstance(shadow_version, int) or str(shadow_version).isdigit():
            routed.add(int(shadow_version))
    return routed


def serve_new_versions(config_path: str | Path, model_name: str) -> list[int]:
    """Append to ``model_name``'s ``specific`` list every version on disk newer than the newest listed; returns the
    versions added (none when the model's policy is not ``specific`` or nothing is new)."""
    path = Path(config_path)
    config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    model = next((m for m in config.model_config_list.config if m.name == model_name), None)
    if model is None or model.model_version_policy.WhichOneof("policy_choice") != "specific":
        return []
    listed = list(model.model_version_policy.specific.versions)
    newest_listed = max(listed, default=0)
    added = [v for v in versions(Path(model.base_path)) if v > newest_listed]
    if not added:
        return []
    model.model_version_policy.specific.versions.extend(added)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    staging.write_text(text_format.MessageToString(config))
    os.replace(staging, path)
    return added


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
