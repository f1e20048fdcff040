"""Generates the gateway's Python stubs from protos/ into the gitignored proto_gen/ folder, when missing or stale.

Run at import by ``services.gateway.api_pb`` and by scripts/setup.sh (``python -m services.gateway.proto_build``).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
PROTO_FILES = ["mushroom/v1/classifier.proto"]
OUT_DIR = Path(__file__).resolve().parent / "proto_gen"
STAMP = OUT_DIR / ".source-sha256"


def _source_hash() -> str:
    h = hashlib.sha256()
    for name in PROTO_FILES:
        h.update((PROTO_ROOT / name).read_bytes())
    return h.hexdigest()


def ensure_generated() -> Path:
    """Generate the stubs unless proto_gen/ already holds those of the current .proto sources; returns OUT_DIR."""
    digest = _source_hash()
    if STAMP.exists() and STAMP.read_text() == digest:
        return OUT_DIR
    import grpc_tools

    OUT_DIR.mkdir(exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # A child process: protoc inside a process that already loaded protobuf/TensorFlow has crashed (segfault).
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={OUT_DIR}", f"--grpc_python_out={OUT_DIR}", *[str(PROTO_ROOT / name) for name in PROTO_FILES]]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILES}: {done.stderr.strip()}")
    STAMP.write_text(digest)
    return OUT_DIR


if __name__ == "__main__":
    print(f"generated stubs in {ensure_generated()}", file=sys.stderr)
