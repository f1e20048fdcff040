"""Helpers the tests share: the shared photos, and the launcher's free ports, waits and real Redis instances
(devstack/servers.py, the one launcher the stack and the benchmarks use too)."""
from __future__ import annotations

from devstack.servers import RedisServer, free_port, stop_process, wait_for_port
from training_job.paths import shared_data_dir

__all__ = ["SHARED_DATA", "MUSHROOMS", "NOT_MUSHROOMS", "IMAGENET_FUNGI", "RedisServer", "free_port", "stop_process",
           "wait_for_port"]

SHARED_DATA = shared_data_dir()
MUSHROOMS = SHARED_DATA / "mushrooms"
NOT_MUSHROOMS = SHARED_DATA / "not-mushrooms"
IMAGENET_FUNGI = SHARED_DATA / "imagenet-fungi"
