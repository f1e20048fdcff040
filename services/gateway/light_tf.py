"""Load TF Serving's generated protobuf modules without running tensorflow/__init__.py (gateway processes only).

``tensorflow_serving.apis`` imports ``tensorflow.core.*_pb2``; importing them normally starts all of TensorFlow
(seconds of start-up, hundreds of MB). Entry points call this before any stub import; library code and tests that
import real TensorFlow are unaffected because nothing is replaced once ``tensorflow`` is loaded.
"""
from __future__ import annotations

import importlib.util
import sys
import types


def use_light_tensorflow_protos() -> None:
    if "tensorflow" in sys.modules:
        return
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType("tensorflow")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["tensorflow"] = package
