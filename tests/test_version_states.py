"""Version states have one table, TF Serving's own enum (ModelVersionStatus.State): the model server numbers its
states by it, the gateway names them by it, and nobody writes the numbers down again."""
from __future__ import annotations

import re
from pathlib import Path

from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from services.gateway import upstream
from services.model_server.version_policy import State

ROOT = Path(__file__).resolve().parent.parent


def test_the_model_servers_states_are_tf_servings():
    assert {s.name: int(s) for s in State} == {n: v for n, v in ModelVersionStatus.State.items() if n != "UNKNOWN"}


def test_the_gateway_names_states_as_tf_serving_does():
    assert upstream.AVAILABLE == ModelVersionStatus.AVAILABLE
    for name, number in ModelVersionStatus.State.items():
        assert upstream.state_name(number) == name
    assert upstream.state_name(35) == "35"


def test_no_module_writes_down_its_own_table_of_states():
    own_tables = re.compile(r"^\s*(AVAILABLE\b[^=\n]*=\s*[\d(]|STATE_NAMES\s*=)|==\s*30\b", re.M)
    offenders = [str(path.relative_to(ROOT)) for folder in ("services", "bench", "tests", "scripts", "loadtests")
                 for path in (ROOT / folder).rglob("*.py")
                 if "proto_gen" not in path.parts and own_tables.search(path.read_text())]
    assert offenders == []
