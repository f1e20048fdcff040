"""The project's ``.proto`` files (``protos/``) as Python modules.

``python -m services.protos`` (run by scripts/setup.sh and the gateway image) compiles every file under ``protos/``
into ``services/proto_gen/`` (gitignored); ``load`` imports from there and never compiles: a missing or stale stub
is an error that names the command to run.

- ``mushroom/v1/classifier.proto``: the gateway's own gRPC API.
- ``tfs_config/*.proto``: TF Serving's batching and monitoring config messages, which the tensorflow-serving-api
  wheel does not ship, so the model server parses those files with protobuf itself.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[1] / "protos"
OUT = Path(__file__).resolve().parent / "proto_gen"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _stub_of(proto: Path) -> Path:
    relative = proto.relative_to(PROTO_ROOT)
    return OUT / relative.with_name(f"{relative.stem}_pb2.py")


def generate() -> None:
    # In a child process: grpc_tools' protoc crashes when TensorFlow is already loaded in this one.
    OUT.mkdir(exist_ok=True)
    protos = [str(p) for p in proto_files()]
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={OUT}",
                             f"--grpc_python_out={OUT}", *protos], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed on {protos}: {result.stderr.strip()}")


def stale() -> list[Path]:
    """The .proto files whose stubs are missing or older than the .proto."""
    return [p for p in proto_files()
            if not _stub_of(p).exists() or _stub_of(p).stat().st_mtime < p.stat().st_mtime]


def load(module: str):
    """Imports a generated module by name, e.g. ``load("mushroom.v1.classifier_pb2")``."""
    missing = stale()
    if missing:
        names = ", ".join(str(p.relative_to(PROTO_ROOT)) for p in missing)
        raise RuntimeError(f"the Python stubs of {names} are missing or older than the .proto: run "
                           f"`python -m services.protos` (scripts/setup.sh does)")
    if str(OUT) not in sys.path:
        sys.path.insert(0, str(OUT))
    return importlib.import_module(module)


if __name__ == "__main__":
    generate()
    print(f"generated the stubs of {len(proto_files())} .proto files into {OUT}")
