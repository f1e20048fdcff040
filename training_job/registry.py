"""The model registry's layout: the contract between the training job, which publishes versions, and the serving
side (our model server, TF Serving, the stack, the benchmarks), which reads them.

A registry holds ``<registry>/<model_name>/<N>/``. A child of a model's folder is a **version** when it is a
directory whose name is ASCII decimal digits (``1``, ``42``); its number is ``int(name)``. Anything else is not a
version and is ignored by every reader: publishing's staging folders (``.tmp-…``), its lock file, its record of the
last number given (a number is never given twice, even after its folder was removed), stray files, and
names that Python's ``str.isdigit`` accepts but ``int`` does not (``²``) or TF Serving would not parse (``٣``).
Services may import this module; the training job never imports services.
"""
from __future__ import annotations

from pathlib import Path


def is_version_name(name: str) -> bool:
    """True when ``name`` is a version folder's name: ASCII decimal digits only."""
    return name.isascii() and name.isdigit()


def version_dirs(model_dir: str | Path) -> dict[int, Path]:
    """The versions under ``model_dir``: {number: folder}. Raises FileNotFoundError when ``model_dir`` is missing and
    OSError when it cannot be listed (a reader decides whether that means "no versions" or "keep what you had")."""
    found: dict[int, Path] = {}
    for child in Path(model_dir).iterdir():
        if is_version_name(child.name) and child.is_dir():
            found[int(child.name)] = child
    return found


def versions(model_dir: str | Path) -> list[int]:
    """The version numbers under ``model_dir``, ascending; [] when it does not exist."""
    try:
        return sorted(version_dirs(model_dir))
    except FileNotFoundError:
        return []


def latest_version_dir(model_dir: str | Path) -> Path | None:
    """The folder of the highest version under ``model_dir``; None when there is none (or no ``model_dir``)."""
    try:
        found = version_dirs(model_dir)
    except FileNotFoundError:
        return None
    return found[max(found)] if found else None
