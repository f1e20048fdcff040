"""``scripts/stack.py pin``: which versions the stack's model server keeps loaded.

The stack's model config uses a ``specific`` policy (configs.model_config_text says why): the newest two versions on
disk, every version pinned here, every version a label points at. Pinning is additive: a rewrite keeps what the
config already lists, so a routed version disappears only when an operator unpins it (refused while a label points
at it). An existing label moves only to a version already served, as TF Serving moves it only to an AVAILABLE one.
The model server re-reads the file every second."""
from __future__ import annotations

from pathlib import Path

from devstack import configs
from devstack.health import StackError
from training_job.registry import versions

CONFIG_NAME = "models.config"


def pin(run_dir: Path, add: list[int] = (), unpin: list[int] = (), labels: dict[str, int] | None = None,
        routed: set[int] = frozenset()) -> tuple[list[int], dict[str, int]]:
    """Rewrite ``run_dir``'s model config; returns (the versions it serves, the labels). ``routed``: the versions
    the gateway sends traffic to (services.rollout.serving_config.routed_versions): unpinning one is refused, as it would drop that traffic."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise StackError(f"{path} does not exist: is this a stack run folder?")
    name, base_path, current, current_labels = configs.read_model_config(path)
    new_labels = {**current_labels, **(labels or {})}
    for label, version in (labels or {}).items():
        if label in current_labels and current_labels[label] != version and version not in current:
            # TF Serving moves a label only to an AVAILABLE version and refuses the whole config otherwise
            raise StackError(f"label {label!r} points at version {current_labels[label]}; the model server does not "
                             f"serve version {version}, and would refuse the move: pin {version} first, then move "
                             "the label once it is AVAILABLE")
    labelled = sorted(set(unpin) & set(new_labels.values()))
    if labelled:
        raise StackError(f"versions {labelled} are the target of a label ({new_labels}): move the label first")
    still_routed = sorted(set(unpin) & set(routed))
    if still_routed:
        raise StackError(f"versions {still_routed} still get traffic from the gateway's routing table: route it "
                         "away first (python -m services.gateway.operator_cli set ...), then unpin")
    pinned = (set(current) | set(add)) - set(unpin)
    newest = set(configs.served_versions(versions(base_path)))
    if set(unpin) & newest:
        raise StackError(f"versions {sorted(set(unpin) & newest)} are among the newest {configs.NEWEST_SERVED} on "
                         "disk: they stay served")
    served = configs.write_model_config(path, name, base_path, pinned, new_labels)
    return served, new_labels
