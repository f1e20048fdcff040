"""Version labels ("stable", "canary") -> version numbers, asked of the model server through the TF Serving API only.

A GetModelMetadata call with ``model_spec.version_label`` set is answered with the labelled version in
``model_spec.version`` by TF Serving and by our model server alike. The answers are cached and refreshed about once a
second, so moving a label in the model server's config is followed within a second or two.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Iterable

import grpc

from services.gateway.routing import UnknownLabel
from services.gateway.upstream import ModelServerClient, UpstreamRejected

log = logging.getLogger("gateway.labels")
# What TF Serving answers for a label it does not know (INVALID_ARGUMENT) or one pointing at no loaded version.
UNKNOWN_LABEL_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


class LabelResolver:
    def __init__(self, upstream: ModelServerClient):
        self.upstream = upstream
        self.versions: dict[str, int] = {}  # the last answer per label still in use
        self.asked: set[str] = set()  # labels asked about at least once (answered or not)

    async def lookup(self, label: str) -> int:
        """The version the label points at now. Raises UnknownLabel, or UpstreamUnavailable when the server is down."""
        # The client's channel, retries and error mapping: one connection to the model server per gateway.
        try:
            return await self.upstream.version_for_label(label)
        except UpstreamRejected as exc:
            if exc.code in UNKNOWN_LABEL_CODES:
                raise UnknownLabel(label, f"{exc.code.name}: {exc}") from None
            raise

    async def resolve_all(self, labels: Iterable[str]) -> dict[str, int]:
        """Asks now, for a routing change: raises UnknownLabel for the first unknown label (or UpstreamUnavailable);
        remembers the answers."""
        labels = sorted(set(labels))
        self.asked.update(labels)
        versions = await asyncio.gather(*(self.lookup(label) for label in labels))
        answers = dict(zip(labels, versions))
        self.remember(answers)
        return answers

    def remember(self, answers: dict[str, int]) -> None:
        """Keeps ``answers`` (label: version) as the last answers, asked."""
        self.asked.update(answers)
        self.versions.update(answers)

    async def refresh(self, labels: Iterable[str]) -> None:
        """Re-asks every label. One the server no longer knows is dropped (so it routes nowhere); any other failure
        (server down) keeps the last answer."""
        labels = sorted(set(labels))
        self.asked.update(labels)
        results = await asyncio.gather(*(self.lookup(label) for label in labels), return_exceptions=True)
        for label, result in zip(labels, results):
            if isinstance(result, UnknownLabel):
                if self.versions.pop(label, None) is not None:
                    log.warning("%s: its routing share goes to the other entries", result)
            elif isinstance(result, BaseException):
                log.debug("label %s not refreshed: %s", label, result)
            else:
                old = self.versions.get(label)
                if old is not None and old != result:
                    log.info("version label %s moved: version %d -> %d", label, old, result)
                self.versions[label] = result

    def retain(self, labels: Iterable[str]) -> None:
        """Forgets the labels no longer in use, so a label put back later is asked afresh."""
        keep = set(labels)
        self.versions = {label: v for label, v in self.versions.items() if label in keep}
        self.asked &= keep
