"""The version policy: a pure function from the states of one model's versions to the next action.

It is TF Serving's AvailabilityPreservingPolicy (core/availability_preserving_policy.cc), kept to the letter so our
server and the real one make the same choices:

- An unaspired version that is AVAILABLE is unloaded (the lowest first) when the model has no aspired version at
  all, or when some aspired version is AVAILABLE, or when more than one unaspired version is AVAILABLE. So under
  ``latest { num_versions: 2 }`` with versions 1 and 2 AVAILABLE, a new folder 3 -- even an empty or corrupt one
  that will never load -- unloads version 1 at once, because aspired version 2 is AVAILABLE. Under
  ``latest { num_versions: 1 }`` a corrupt newest folder costs nothing: version 1 stays until an aspired version
  is AVAILABLE. A version that failed to load counts as aspired (not as AVAILABLE) for as long as it is aspired.
- Nothing else protects a version: under ``specific { versions: [1, 2] }`` a folder 1 that vanishes makes version 1
  unaspired (TF Serving's file-system source aspires only the listed versions it finds), so it is unloaded once
  version 2 is AVAILABLE. Requests already admitted for it finish first (services/model_server/batching.py).
- Otherwise the highest aspired version that has not been tried (START) is loaded.

Unloads are preferred over loads. Nothing here touches the file system or runs a model; the states are TF Serving's
own enum (importing it imports TensorFlow's protos).
"""
from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import Enum, IntEnum

from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

# A version's state: TF Serving's own enum (tensorflow.serving.ModelVersionStatus.State), the one table of states.
# START: aspired, not tried yet (LoaderHarness kNew); AVAILABLE: serving (kReady); END: unloaded, or given up on after
# failed loads (kDisabled / kError). UNKNOWN is never a state of a version the manager knows.
State = IntEnum("State", {name: value for name, value in ModelVersionStatus.State.items() if name != "UNKNOWN"})


class Kind(Enum):
    LOAD = "load"
    UNLOAD = "unload"


@dataclass(frozen=True)
class Action:
    kind: Kind
    version: int


def next_action(states: Mapping[int, State], aspired: Set[int]) -> Action | None:
    """The next action for one model. ``states``: every version the manager knows; ``aspired``: the versions the
    source wants now."""
    has_aspired = any(v in aspired for v in states)
    has_aspired_serving = any(v in aspired and s == State.AVAILABLE for v, s in states.items())
    unaspired_serving = sorted(v for v, s in states.items() if v not in aspired and s == State.AVAILABLE)
    if unaspired_serving and (not has_aspired or has_aspired_serving or len(unaspired_serving) > 1):
        return Action(Kind.UNLOAD, unaspired_serving[0])
    untried = [v for v, s in states.items() if v in aspired and s == State.START]
    if untried:
        return Action(Kind.LOAD, max(untried))
    return None
