"""services/event_loop.py: the services run on uvloop where it is installed (requirements.txt pins it), on asyncio's
own loop when MUSHROOM_EVENT_LOOP=asyncio says so, and log which."""
from __future__ import annotations

import asyncio
import logging

from services import event_loop


async def running_loop() -> str:
    await asyncio.to_thread(lambda: None)  # the default executor works, and run shuts it down
    return type(asyncio.get_running_loop()).__module__


def test_the_services_run_on_uvloop(monkeypatch, caplog):
    monkeypatch.delenv(event_loop.ENVIRONMENT, raising=False)
    with caplog.at_level(logging.INFO, logger="event_loop"):
        assert event_loop.run(running_loop()).startswith("uvloop")
    assert "event loop: uvloop" in caplog.text


def test_the_environment_can_choose_asyncios_own_loop(monkeypatch, caplog):
    monkeypatch.setenv(event_loop.ENVIRONMENT, "asyncio")
    with caplog.at_level(logging.INFO, logger="event_loop"):
        assert event_loop.run(running_loop()).startswith("asyncio")
    assert "event loop: asyncio" in caplog.text
