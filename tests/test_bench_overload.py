"""bench/overload.py's premises: a request made a distinct cache miss is still the same photo to the preprocessing
contract, and the recovery it reports is when the backlog stopped holding requests up."""
from __future__ import annotations

import numpy as np
import pytest

from bench.overload import recovery_s, unique
from tests.support import MUSHROOMS
from training_job.preprocessing import preprocess_bytes


def test_a_photo_made_a_distinct_miss_has_other_bytes_and_the_same_pixels():
    photos = [path.read_bytes() for path in sorted(sorted(MUSHROOMS.iterdir())[0].iterdir())[:2]]
    distinct = [unique(photos, index) for index in range(4)]
    assert len(set(distinct)) == 4
    for index, photo in enumerate(distinct):
        np.testing.assert_array_equal(preprocess_bytes(photo), preprocess_bytes(photos[index % 2]))


def test_recovery_is_the_first_prompt_answer_after_the_spike():
    normal = 0.010
    rows = [(0.0, 1.500, 200), (1.5, 0.800, 200), (2.3, 0.030, 503), (2.4, 0.015, 200), (2.5, 0.050, 200)]
    assert recovery_s(rows, normal) == 2.4  # a later slow answer does not move it
    assert recovery_s(rows[:3], normal) is None


def test_a_spike_is_tallied_and_drawn_as_a_timeline_of_its_answers():
    """open_loop against a stand-in gateway answering in turn 200, 503 with Retry-After, and too late for the
    client: each request counted once in its outcome, in the tally and in the timeline (bench/faults.timeline)."""
    import asyncio
    import itertools
    import os

    from aiohttp import web

    from bench.faults import LOST, OK, UNAVAILABLE
    from bench.overload import open_loop

    answers = itertools.count()

    async def classify(request: web.Request) -> web.Response:
        await request.read()
        kind = next(answers) % 3
        if kind == 1:
            return web.Response(status=503, headers={"Retry-After": "1"})
        if kind == 2:
            await asyncio.sleep(1.0)  # the client gave up after 0.3 s
        return web.Response(text="{}")

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/classify", classify)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await open_loop(f"http://127.0.0.1:{port}", [b"photo"], 40.0, 1.5, 0.3, 0, os.getpid())
        finally:
            await runner.cleanup()

    spike = asyncio.run(scenario())
    line = spike["timeline"]
    counted = {outcome: sum(line[outcome]) for outcome in (OK, UNAVAILABLE, LOST)}
    assert sum(counted.values()) == spike["sent"] >= 20
    assert counted[OK] == round(spike["served_share"] * spike["sent"])
    assert counted[UNAVAILABLE] == round(spike["refused_share"] * spike["sent"])
    assert counted[LOST] == round(spike["timed_out_share"] * spike["sent"]) > 0
    assert line["back_s"] == pytest.approx(1.5) and spike["drained_s"] >= 1.5
