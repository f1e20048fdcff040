"""What the gateway knows of each model version, asked of the model server through TF Serving's API when the version
is first seen AVAILABLE, kept while it stays AVAILABLE and forgotten when it leaves:

- its input size S, from its ``serving_default`` signature (input ``images`` uint8 [batch, S, S, 3]; 224 for
  MobileNet and EfficientNet-Lite0, 240 for Lite1, 260 for Lite2), by GetModelMetadata;
- its class labels in column order, and its *identity*: a digest of its answers to ``probes`` (fixed images at S),
  by one Predict call.

A version number names a model only while that model is loaded. A registry removed and trained anew publishes
from version 1 again (its ``.last_version`` went with it), and a model server that saw the folder go, or was
restarted, serves the new model under the old number, while Redis still holds the old one's answers. The cache keys
hold the identity (cache.py), so those answers are never found for the new model. These facts, and the display
names read from the registry (ModelInfo.keep), are forgotten when the version leaves AVAILABLE (the facts kept aside
only to check feedback on the answers it gave, ``last_known``). A version can also change unseen, while the model
server is out of reach (restarted on a new registry): then every version is learnt again at the first status poll
it answers (``doubt``), its facts as they were kept until then, so that cached answers are still found while it is
down; requests between the model server's return and that poll (the poll's interval at most, its back-off's while
polls fail) still read the old identity.

The identity rounds every probability and mushroom score to 1/``IDENTITY_STEPS``: the same model read by two engines
(its SavedModel and its model.tflite) or in two batches differs by far less, so it keeps its identity but for a
value that falls on a rounding boundary, which costs cache misses, and begins the version's feedback tally and
figures anew (stats.py; the earlier tally stays in Redis under the identity it had): nothing is served or counted
for the wrong model. Two different trainings give the same rounded answers to every probe hardly ever, as a probe
(a grey, a gradient, a noise image) is nothing a model was trained to be sure of.

The gateway preprocesses a photo at the size of the version that will answer it, and the cache key holds that size.
The version watcher learns the facts of each newly AVAILABLE version before routing to it (``refresh``). A version
whose facts cannot be learnt because of the version itself (the model server refuses the contract's probe request,
or answers it without the outputs the gateway reads: another tool's export, say) is ``unusable``: routed around as
if it were not AVAILABLE (routing.Router.set_available), and asked again at every refresh.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import grpc
import numpy as np

from services.gateway.upstream import ContractBroken, ModelServerClient, UpstreamRejected

log = logging.getLogger("gateway.version_facts")

OPEN_SIZE = 224  # the size for a signature that leaves S open ([-1, -1, -1, 3]): the contract's default
IDENTITY_STEPS = 100  # probabilities and mushroom scores rounded to 0.01 in the identity
IDENTITY_HEX_DIGITS = 12


@dataclass(frozen=True)
class Facts:
    version: int
    size: int  # the input size S its photos are preprocessed at
    identity: str  # the digest of its answers to the probes
    classes: tuple[str, ...]  # its class labels in column order


@lru_cache(maxsize=8)
def probes(size: int) -> np.ndarray:
    """The probe images at ``size`` (uint8 [3, size, size, 3]): mid grey, a colour gradient, and noise from integer
    hashing (the same pixels on every machine and NumPy, unlike a random generator's stream)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.uint32)
    side = max(size - 1, 1)
    grey = np.full((size, size, 3), 128, np.uint32)
    gradient = np.stack([x * 255 // side, y * 255 // side, (x + y) * 255 // (2 * side)], axis=-1)
    noise = np.stack([((x * 73856093) ^ (y * 19349663) ^ (c * 83492791)) * np.uint32(2654435761) >> np.uint32(24)
                      for c in range(3)], axis=-1)
    images = np.stack([grey, gradient, noise]).astype(np.uint8)
    images.setflags(write=False)  # one array for every call (cached)
    return images


def identity(predictions) -> str:
    """The digest of a version's answers to the probes (upstream.Prediction each): classes, rounded probabilities
    and mushroom scores."""
    rounded = [[list(p.classes), [round(float(v) * IDENTITY_STEPS) for v in p.probabilities],
                round(float(p.mushroom_score) * IDENTITY_STEPS)] for p in predictions]
    return hashlib.sha256(json.dumps(rounded).encode()).hexdigest()[:IDENTITY_HEX_DIGITS]


class VersionFacts:
    def __init__(self, upstream: ModelServerClient):
        self.upstream = upstream
        self._facts: dict[int, Facts] = {}  # version -> its facts, while AVAILABLE
        self._former: dict[int, Facts] = {}  # version -> its facts when it left AVAILABLE
        self._asking: dict[int, asyncio.Future] = {}  # version -> the facts being learnt, shared by every asker
        self._forgotten = 0  # refreshes that forgot a version: facts learnt across one are not kept
        self._doubted = False  # the model server was out of reach: learn every version again at the next refresh
        self._unusable: dict[int, str] = {}  # version -> why the gateway cannot use it (``refresh``)

    @property
    def unusable(self) -> dict[int, str]:
        """The AVAILABLE versions the gateway cannot use, and why: the model server refused the probes of the
        registry contract (its ``serving_default`` has no ``images`` input, or no such signature) or answered them
        without the outputs the gateway reads (upstream.ContractBroken). Each is asked again at every refresh, until
        it is learnt or leaves."""
        return dict(self._unusable)

    def known(self, version: int) -> Facts | None:
        return self._facts.get(version)

    def last_known(self, version: int) -> Facts | None:
        """The facts of ``version`` while it is AVAILABLE, else the ones it had when it left (its answers may still
        get feedback), else None."""
        return self._facts.get(version) or self._former.get(version)

    async def of(self, version: int, timeout: float | None = None) -> Facts:
        """The facts of ``version``: learnt once, then kept. Raises UpstreamRejected / UpstreamUnavailable as the
        upstream client does."""
        facts = self._facts.get(version)
        if facts is not None:
            return facts
        learning = self._asking.get(version)
        if learning is None:
            learning = self._asking[version] = asyncio.ensure_future(self._learn(version, timeout))
            learning.add_done_callback(lambda _: self._asking.pop(version, None))
        return await asyncio.shield(learning)  # a caller that leaves does not cancel the others' answer

    async def resolve(self, label: str | None) -> Facts:
        """The facts of the version ``label`` points at now (or of the latest when None): which version is asked
        every time, since a label moves. ContractBroken when that version is ``unusable``."""
        version, _ = await self.upstream.input_size(None, label)
        if version in self._unusable:
            raise ContractBroken(f"version {version} cannot be used: {self._unusable[version]}")
        return await self.of(version)

    async def _learn(self, version: int, timeout: float | None) -> Facts:
        forgotten = self._forgotten
        _, declared = await self.upstream.input_size(version, timeout=timeout)
        size = declared or OPEN_SIZE
        answers = await self.upstream.predict(probes(size), version, timeout=timeout)
        if not all(answer.finite for answer in answers):
            raise ContractBroken(f"version {version}'s serving_default answers the probe images with probabilities "
                                 "or mushroom scores that are not finite (NaN or infinite)")
        facts = Facts(version, size, identity(answers), tuple(answers[0].classes))
        if self._forgotten == forgotten:  # else the version may have gone and come back as another model
            self._facts[version] = facts
            self._former.pop(version, None)
        return facts

    def doubt(self) -> None:
        """The model server could not be asked: what it serves when it answers again may have changed (a restart
        on another registry), so the next refresh learns every version again."""
        self._doubted = True

    async def refresh(self, versions: Iterable[int], timeout: float | None = None) -> set[int]:
        """Keeps the facts of ``versions`` only (a version that went is learnt afresh if it comes back, perhaps
        another model under the same number) and learns the ones not known yet (after ``doubt``: all of them, the
        known facts kept until then), so requests find them known; returns the versions found to be other models
        than before. A version that does not answer within ``timeout`` is asked again at the next refresh, or by the
        first request routed to it."""
        keep = set(versions)
        doubted, self._doubted = self._doubted, False
        if doubted or set(self._facts) - keep or set(self._asking) - keep:
            self._forgotten += 1  # facts being learnt now may be of a model gone since
            self._former.update({v: f for v, f in self._facts.items() if v not in keep})
            self._facts = {v: f for v, f in self._facts.items() if v in keep}
        known = dict(self._facts)
        learn = sorted(keep if doubted else keep - set(known))
        answers = await asyncio.gather(*(self._learn(v, timeout) if v in known else self.of(v, timeout)
                                         for v in learn), return_exceptions=True)
        changed = set()
        self._unusable = {v: why for v, why in self._unusable.items() if v in keep}
        for version, answer in zip(learn, answers):
            if _breaks_contract(answer):
                if self._unusable.get(version) != str(answer):
                    log.warning("version %d cannot be used, and is routed around: %s", version, answer)
                self._unusable[version] = str(answer)
            elif isinstance(answer, BaseException):
                log.debug("version %d not learnt yet: %s", version, answer)
            else:
                self._unusable.pop(version, None)
            if isinstance(answer, BaseException):
                self._doubted = self._doubted or version in known  # still in doubt: learnt again next time
            elif version in known and known[version].identity != answer.identity:
                log.warning("version %d is another model than before (identity %s, was %s)", version,
                            answer.identity, known[version].identity)
                changed.add(version)
        return changed


def _breaks_contract(answer) -> bool:
    """Whether learning a version failed because of the version itself, not of the moment: it answered outside the
    contract, or the model server refused the contract's request (a version gone meanwhile is NOT_FOUND)."""
    return isinstance(answer, ContractBroken) or (
        isinstance(answer, UpstreamRejected) and answer.code != grpc.StatusCode.NOT_FOUND)
