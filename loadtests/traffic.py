"""What the load test sends: many distinct shared photos, a small hot set repeated (cache hits), a few bad inputs."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from training_job.paths import shared_data_dir, var_dir

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
HOT_SET_SIZE = 20
# (name, body): each must be answered with a 4xx over HTTP / INVALID_ARGUMENT over gRPC, never a 5xx.
BAD_INPUTS = [("empty", b""), ("text", b"this is not a photo"), ("truncated-jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")]


def photo_paths() -> list[Path]:
    folder = Path(os.environ.get("LOADTEST_PHOTOS") or shared_data_dir() / "mushrooms")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise SystemExit(f"no photos under {folder}: set LOADTEST_PHOTOS to a folder of photos")
    return paths


class Traffic:
    """Per user: 60 % distinct photos (mostly cache misses), 35 % the hot set (cache hits), 5 % bad inputs."""

    def __init__(self, paths: list[Path], seed: int | None = None):
        self.rng = random.Random(seed)
        self.paths = paths
        self.hot = paths[:: max(1, len(paths) // HOT_SET_SIZE)][:HOT_SET_SIZE]
        self._bytes: dict[Path, bytes] = {}

    def _read(self, path: Path) -> bytes:
        if path not in self._bytes:
            self._bytes[path] = path.read_bytes()
        return self._bytes[path]

    def next(self) -> tuple[str, bytes, bool]:
        """(request name, body, expected to be rejected)."""
        roll = self.rng.random()
        if roll < 0.05:
            name, body = self.rng.choice(BAD_INPUTS)
            return f"bad:{name}", body, True
        if roll < 0.40:
            return "photo:hot", self._read(self.rng.choice(self.hot)), False
        return "photo:distinct", self._read(self.rng.choice(self.paths)), False


def stack_state() -> dict:
    """The latest local stack's stack.json (ports, URLs), or {} when none."""
    state_file = var_dir() / "run" / "latest" / "stack.json"
    return json.loads(state_file.read_text()) if state_file.exists() else {}


def admin_token() -> str:
    token = os.environ.get("LOADTEST_ADMIN_TOKEN") or os.environ.get("GATEWAY_ADMIN_TOKEN")
    if token:
        return token
    token_file = var_dir() / "run" / "latest" / "admin_token"
    return token_file.read_text().strip() if token_file.exists() else ""


def grpc_target() -> str:
    return os.environ.get("LOADTEST_GRPC_TARGET") or stack_state().get("urls", {}).get("gateway gRPC", "")
