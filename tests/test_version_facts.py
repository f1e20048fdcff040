"""version_facts.VersionFacts on a stand-in model server (a unit test of that module): a version's identity is the
same for answers differing as two engines' do and another for another model's; the facts of a version that left are
forgotten and learnt afresh, also when it left while they were being learnt; askers at once share one probe."""
from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from services.gateway.upstream import Prediction, UpstreamRejected
from services.gateway.version_facts import IDENTITY_HEX_DIGITS, VersionFacts, identity, probes

CLASSES = ["amanita_muscaria", "amanita_vaginata", "boletus_edulis", "boletus_erythropus"]


def answers(bias: float, wobble: float = 0.0) -> list[Prediction]:
    """A stand-in model's answers to the probes: its mean colour through fixed weights, plus ``bias`` on the first
    class; ``wobble`` added to the probabilities, as another engine's rounding would."""
    weights = np.random.default_rng(7).normal(size=(3, 4))
    out = []
    for image in probes(32):
        logits = image.reshape(-1, 3).mean(0) / 128 @ weights + [bias, 0, 0, 0]
        p = np.exp(logits - logits.max())
        p = p / p.sum() + wobble
        out.append(Prediction(1, p.astype(np.float32), CLASSES, float(p.max()), False))
    return out


class Upstream:
    """Serves version -> bias; ``gate``, when set, holds every probe until it is opened."""

    def __init__(self, models: dict[int, float]):
        self.models, self.probes, self.gate = models, [], None

    async def input_size(self, version, label=None, timeout=None):
        if version not in self.models:
            raise UpstreamRejected(None, f"Servable not found for request: {version}")
        return version, 32

    async def predict(self, pixels, version, label=None, timeout=None):
        self.probes.append(version)
        assert pixels.shape == (3, 32, 32, 3)
        if self.gate is not None:
            await self.gate.wait()
        return answers(self.models[version])


def held(models: dict[int, float]) -> tuple[Upstream, VersionFacts]:
    """A stand-in whose probes wait until ``upstream.gate`` opens, and the facts learnt from it."""
    upstream = Upstream(models)
    upstream.gate = asyncio.Event()
    return upstream, VersionFacts(upstream)


def test_the_probes_are_the_same_pixels_everywhere():
    """Every gateway replica must compute the same identity: the probes are fixed integer arithmetic."""
    assert hashlib.sha256(probes(224).tobytes()).hexdigest() == \
        "56ee4da67054c8f6ce1d11c68e8ec051d507a8ae64a630159d4c85d97f1fb241"
    assert probes(240).shape == (3, 240, 240, 3)


def test_an_identity_is_kept_through_engine_rounding_and_differs_between_models():
    same = identity(answers(0.0))
    assert len(same) == IDENTITY_HEX_DIGITS
    assert identity(answers(0.0, wobble=1e-6)) == same
    assert identity(answers(0.5)) != same
    renamed = answers(0.0)
    renamed[0].classes = list(reversed(CLASSES))
    assert identity(renamed) != same


def test_a_version_that_leaves_is_learnt_afresh_when_it_comes_back():
    async def scenario():
        upstream = Upstream({1: 0.0, 2: 1.0})
        facts = VersionFacts(upstream)
        await facts.refresh({1, 2})
        first = facts.known(1)
        assert first.size == 32 and first.classes == tuple(CLASSES) and first.identity == identity(answers(0.0))
        await facts.refresh({1, 2})
        assert upstream.probes == [1, 2]  # kept while AVAILABLE
        await facts.refresh({2})
        assert facts.known(1) is None and facts.known(2) is not None
        assert facts.last_known(1) == first  # its answers may still get feedback
        upstream.models[1] = 3.0  # another model under the same number
        await facts.refresh({1, 2})
        assert facts.known(1).identity == identity(answers(3.0)) != first.identity
        assert facts.last_known(1) == facts.known(1)

    asyncio.run(scenario())


def test_facts_learnt_while_their_version_left_are_not_kept():
    async def scenario():
        upstream, facts = held({1: 0.0})
        learning = asyncio.create_task(facts.of(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert upstream.probes == [1]
        await facts.refresh(set())  # version 1 left while its probe was under way
        upstream.gate.set()
        assert (await learning).identity == identity(answers(0.0))  # its asker gets them...
        assert facts.known(1) is None  # ...but they are not kept: it may come back as another model

    asyncio.run(scenario())


def test_askers_at_once_share_one_probe_and_a_leaving_asker_does_not_cancel_it():
    async def scenario():
        upstream, facts = held({1: 0.0})
        leaving = asyncio.create_task(facts.of(1))
        staying = asyncio.create_task(facts.of(1))
        await asyncio.sleep(0)
        leaving.cancel()
        upstream.gate.set()
        assert (await staying).version == 1
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert upstream.probes == [1] and facts.known(1) is not None

    asyncio.run(scenario())


def test_a_version_the_model_server_does_not_have_is_not_known():
    async def scenario():
        facts = VersionFacts(Upstream({}))
        with pytest.raises(UpstreamRejected):
            await facts.of(5)
        await facts.refresh({5})  # logged, asked again later
        assert facts.known(5) is None

    asyncio.run(scenario())


def test_after_the_model_server_was_out_of_reach_every_version_is_learnt_again():
    """What it serves may have changed unseen (a restart on another registry): the known facts serve until it can be
    asked, then each version is learnt again, and the ones now another model are told."""
    async def scenario():
        upstream = Upstream({1: 0.0, 2: 1.0})
        facts = VersionFacts(upstream)
        assert await facts.refresh({1, 2}) == set()
        before = facts.known(1)
        facts.doubt()
        assert facts.known(1) == before  # cached answers still found while it is down
        upstream.models[1] = 3.0
        upstream.gate = asyncio.Event()
        refreshing = asyncio.create_task(facts.refresh({1, 2}))
        await asyncio.sleep(0)
        assert facts.known(1) == before  # until learnt again
        upstream.gate.set()
        assert await refreshing == {1}
        assert facts.known(1).identity == identity(answers(3.0)) and upstream.probes == [1, 2, 1, 2]
        assert await facts.refresh({1, 2}) == set() and len(upstream.probes) == 4  # doubt gone

    asyncio.run(scenario())


def test_a_version_not_learnt_again_stays_in_doubt():
    async def scenario():
        upstream = Upstream({1: 0.0})
        facts = VersionFacts(upstream)
        await facts.refresh({1})
        facts.doubt()
        upstream.models = {}  # it answers the status poll, not yet for version 1
        assert await facts.refresh({1}) == set()
        assert facts.known(1) is not None
        upstream.models = {1: 2.0}
        assert await facts.refresh({1}) == {1}

    asyncio.run(scenario())
