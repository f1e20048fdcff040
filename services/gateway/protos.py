"""Generate (when missing or stale) and import the Python stubs of protos/mushroom/v1/classifier.proto."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
PROTO = PROTO_ROOT / "mushroom" / "v1" / "classifier.proto"
OUT = Path(__file__).resolve().parent / "proto_gen"


def generate() -> None:
    # In a child process: grpc_tools' protoc crashes when TensorFlow is already loaded in this one.
    OUT.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={OUT}",
                             f"--grpc_python_out={OUT}", str(PROTO)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed on {PROTO}: {result.stderr.strip()}")


def load():
    """Returns (classifier_pb2, classifier_pb2_grpc)."""
    generated = OUT / "mushroom" / "v1" / "classifier_pb2.py"
    if not generated.exists() or generated.stat().st_mtime < PROTO.stat().st_mtime:
        generate()
    if str(OUT) not in sys.path:
        sys.path.insert(0, str(OUT))
    return (importlib.import_module("mushroom.v1.classifier_pb2"),
            importlib.import_module("mushroom.v1.classifier_pb2_grpc"))


if __name__ == "__main__":
    generate()
    print(f"generated the mushroom.v1 stubs into {OUT}")
