"""The version policy (TF Serving's AvailabilityPreservingPolicy) as a pure function, and the manager acting on it
with fake loaders: no models, no files."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from tensorflow_serving.config import model_server_config_pb2

from services.model_server.manager import Manager
from services.model_server.version_policy import Action, Kind, State, next_action

VERSIONS = (1, 2, 3)
STATES = (None, State.START, State.LOADING, State.AVAILABLE, State.END)  # None: the manager does not know it


def all_situations():
    """Every assignment of a state (or absence) to versions 1-3, with every aspired subset of the known ones."""
    for assignment in itertools.product(STATES, repeat=len(VERSIONS)):
        states = {v: s for v, s in zip(VERSIONS, assignment) if s is not None}
        known = sorted(states)
        for n in range(len(known) + 1):
            for aspired in itertools.combinations(known, n):
                yield states, set(aspired)


SITUATIONS = list(all_situations())


def test_the_situations_are_many():
    assert len(SITUATIONS) > 500


def test_an_unload_never_costs_the_model_its_last_available_version_while_one_is_on_the_way():
    for states, aspired in SITUATIONS:
        action = next_action(states, aspired)
        if action is None or action.kind is not Kind.UNLOAD:
            continue
        assert states[action.version] == State.AVAILABLE and action.version not in aspired, (states, aspired)
        others_available = [v for v, s in states.items() if s == State.AVAILABLE and v != action.version]
        assert not aspired or others_available, (states, aspired, action)


def test_unloads_take_the_lowest_unaspired_available_version_and_come_before_loads():
    for states, aspired in SITUATIONS:
        unaspired_available = sorted(v for v, s in states.items() if s == State.AVAILABLE and v not in aspired)
        aspired_available = any(s == State.AVAILABLE and v in aspired for v, s in states.items())
        must_unload = unaspired_available and (not aspired or aspired_available or len(unaspired_available) > 1)
        action = next_action(states, aspired)
        if must_unload:
            assert action == Action(Kind.UNLOAD, unaspired_available[0]), (states, aspired)
        else:
            assert action is None or action.kind is Kind.LOAD, (states, aspired)


def test_loads_take_the_highest_untried_aspired_version():
    for states, aspired in SITUATIONS:
        action = next_action(states, aspired)
        untried = [v for v in aspired if states[v] == State.START]
        if action is not None and action.kind is Kind.LOAD:
            assert action.version == max(untried)
        elif action is None:
            assert not untried, (states, aspired)


@pytest.mark.parametrize("states, aspired, expected", [
    # latest 1: v1 serving, an empty/corrupt folder 2 appears and fails to load: v1 stays
    ({1: State.AVAILABLE, 2: State.START}, {2}, Action(Kind.LOAD, 2)),
    ({1: State.AVAILABLE, 2: State.END}, {2}, None),
    # latest 2: v1, v2 serving, folder 3 appears: v1 goes at once, before 3 has even been tried
    ({1: State.AVAILABLE, 2: State.AVAILABLE, 3: State.START}, {2, 3}, Action(Kind.UNLOAD, 1)),
    ({2: State.AVAILABLE, 3: State.END}, {2, 3}, None),
    # the folder of the only serving version is deleted while another aspired version is not ready: it stays
    ({1: State.START, 2: State.AVAILABLE}, {1}, Action(Kind.LOAD, 1)),
    ({1: State.AVAILABLE, 2: State.AVAILABLE}, {1}, Action(Kind.UNLOAD, 2)),
    # nothing aspired at all (every folder deleted, or the model removed): everything goes, lowest first
    ({1: State.AVAILABLE, 2: State.AVAILABLE}, set(), Action(Kind.UNLOAD, 1)),
    # two unaspired serving versions and no aspired one ready: the lower one goes
    ({1: State.AVAILABLE, 2: State.AVAILABLE, 3: State.LOADING}, {3}, Action(Kind.UNLOAD, 1)),
])
def test_tf_serving_cases(states, aspired, expected):
    assert next_action(states, aspired) == expected


# ---------------------------------------------------------------------------------------------- the manager


class FakeLoader:
    def __init__(self, version: int, fails: bool = False, contents: tuple = ()):
        self.model_name, self.version, self.path = "m", version, Path(f"/nowhere/{version}")
        self.fails = fails
        self.contents = contents  # what the source saw in the folder
        self.loads = 0

    def load(self):
        self.loads += 1
        if self.fails:
            raise ValueError(f"version {self.version} is corrupt")
        return FakeServable(self.version)


class FakeServable:
    def __init__(self, version: int):
        self.model_name, self.version = "m", version


def manager_for(policy: str = "", **options) -> Manager:
    """A manager of model "m"; ``options`` as Manager takes them (two load retries, none waited for, unless
    given)."""
    from google.protobuf import text_format

    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse('model_config_list { config { name: "m" base_path: "/nowhere" %s } }' % policy, config)
    manager = Manager(**{"max_load_retries": 2, "load_retry_interval": 0.0, **options})
    manager.set_config(config)
    return manager


def states(manager: Manager) -> dict[int, tuple[State, bool]]:
    return {r.version: (r.state, bool(r.error)) for r in manager.status_records("m")}


def test_manager_keeps_serving_while_the_newest_version_fails_and_gives_up_after_the_retries():
    manager = manager_for()
    manager.set_aspired_versions("m", {1: FakeLoader(1)})
    manager.manage_state()
    corrupt = FakeLoader(2, fails=True)
    for _ in range(5):  # latest 1: the source aspires only the corrupt newest folder, poll after poll
        manager.set_aspired_versions("m", {2: corrupt})
        manager.manage_state()
        assert manager.resolve("m").version == 1
    assert corrupt.loads == 3  # the first attempt and max_load_retries=2 retries, then given up
    assert states(manager) == {1: (State.AVAILABLE, False), 2: (State.END, True)}
    manager.set_aspired_versions("m", {1: FakeLoader(1)})  # the corrupt folder is removed: its error is forgotten
    manager.manage_state()
    assert states(manager) == {1: (State.AVAILABLE, False)}


def test_manager_replaces_a_version_only_once_the_new_one_is_available():
    manager = manager_for()
    manager.set_aspired_versions("m", {1: FakeLoader(1)})
    manager.manage_state()
    manager.set_aspired_versions("m", {2: FakeLoader(2)})
    manager.manage_state()
    assert states(manager) == {1: (State.END, False), 2: (State.AVAILABLE, False)}
    assert manager.resolve("m").version == 2


def test_manager_unloads_a_specific_version_whose_folder_is_gone_as_tf_serving_does():
    manager = manager_for("model_version_policy { specific { versions: 1 versions: 2 } }")
    manager.set_aspired_versions("m", {1: FakeLoader(1), 2: FakeLoader(2)})
    manager.manage_state()
    manager.set_aspired_versions("m", {2: FakeLoader(2)})  # folder 1 deleted: the source no longer aspires it
    manager.manage_state()
    assert states(manager)[1] == (State.END, False) and states(manager)[2][0] == State.AVAILABLE


def test_a_version_aspired_again_after_being_unloaded_loads_again():
    manager = manager_for("model_version_policy { all {} }")
    manager.set_aspired_versions("m", {1: FakeLoader(1), 2: FakeLoader(2)})
    manager.manage_state()
    manager.set_aspired_versions("m", {2: FakeLoader(2)})
    manager.manage_state()
    assert states(manager)[1] == (State.END, False)
    manager.set_aspired_versions("m", {1: FakeLoader(1), 2: FakeLoader(2)})
    manager.manage_state()
    assert states(manager)[1] == (State.AVAILABLE, False)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_load_is_retried_after_the_retry_interval_as_tf_serving_retries_it():
    """TF Serving's LoaderHarness: max_num_load_retries retries, load_retry_interval_micros apart, the version
    LOADING meanwhile; then END with the error."""
    clock = Clock()
    manager = manager_for(load_retry_interval=60.0, clock=clock)
    failing = FakeLoader(1, fails=True)
    attempts = []
    for now in (0, 1, 30, 59.9, 60, 61, 119, 120, 500):
        clock.now = now
        manager.set_aspired_versions("m", {1: failing})  # a poll: the folder is still there
        manager.manage_state()
        attempts.append((now, failing.loads, states(manager)[1]))
    assert attempts == [(0, 1, (State.LOADING, False)), (1, 1, (State.LOADING, False)),
                        (30, 1, (State.LOADING, False)), (59.9, 1, (State.LOADING, False)),
                        (60, 2, (State.LOADING, False)), (61, 2, (State.LOADING, False)),
                        (119, 2, (State.LOADING, False)), (120, 3, (State.END, True)), (500, 3, (State.END, True))]


def test_a_version_whose_folder_goes_while_it_waits_for_a_retry_is_forgotten():
    clock = Clock()
    manager = manager_for(load_retry_interval=60.0, clock=clock)
    failing = FakeLoader(1, fails=True)
    manager.set_aspired_versions("m", {1: failing})
    manager.manage_state()
    manager.set_aspired_versions("m", {})
    clock.now = 60
    manager.manage_state()
    assert failing.loads == 1 and states(manager) == {}


def test_a_version_given_up_on_is_loaded_again_once_its_folder_changes():
    """A deliberate extension over TF Serving (which never tries a given-up version again while it is aspired): a
    folder copied in place, not renamed, fails until its last file lands."""
    manager = manager_for(max_load_retries=0)
    half = FakeLoader(1, fails=True, contents=(("variables/variables.index", 10, 1),))
    for _ in range(3):
        manager.set_aspired_versions("m", {1: half})
        manager.manage_state()
    assert half.loads == 1 and states(manager) == {1: (State.END, True)}
    whole = FakeLoader(1, contents=(("saved_model.pb", 20, 2), ("variables/variables.index", 10, 1)))
    manager.set_aspired_versions("m", {1: whole})
    manager.manage_state()
    assert whole.loads == 1 and states(manager) == {1: (State.AVAILABLE, False)}


def test_num_load_threads_above_one_is_refused():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "services.model_server", "--num_load_threads=4",
                             "--model_base_path=/tmp"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--num_load_threads above 1 is not implemented" in result.stderr
