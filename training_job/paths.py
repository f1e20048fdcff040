"""Where the project keeps what it makes outside the source tree."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "mushrooms"


def cache_dir() -> Path:
    """Converted base weights, downloads and bottlenecks: $MUSHROOM_CACHE or ~/.cache/mushroom-serving."""
    return Path(os.environ.get("MUSHROOM_CACHE", Path.home() / ".cache" / "mushroom-serving"))


def var_dir() -> Path:
    """Run-time state of a checkout (registry, prepared data, logs): $MUSHROOM_VAR or <project>/var."""
    return Path(os.environ.get("MUSHROOM_VAR", PROJECT_ROOT / "var"))


def default_registry() -> Path:
    return Path(os.environ.get("MUSHROOM_REGISTRY", var_dir() / "registry"))


def shared_data_dir() -> Path:
    """The shared photo folder beside the checkout, when it exists (it does not on a user's machine)."""
    return PROJECT_ROOT.parent / "shared" / "data"


def tfserving_upstream_dir() -> Path:
    """TF Serving's own model-server test suite and test data (unchanged upstream files), beside the checkout when it
    exists: ``<project>/../shared/tfserving-upstream``."""
    return PROJECT_ROOT.parent / "shared" / "tfserving-upstream"
