"""Feedback on an answer, the same for HTTP (POST /v1/feedback) and gRPC (Classifier.Feedback): verify the answer's
signed token, check that the ground truth is a class of the version that answered, record it once per answer
(stats.py), and with the opt-in photo store log a correction of a kept photo (photo_store.py).

A ground truth outside the version's classes (a typo, another species) is refused with 400 ``unknown_class`` and the
classes that are accepted: recorded, it would count as a wrong answer in the version's feedback accuracy, which the
rollout controller judges versions by. Feedback on a version the model server no longer has is recorded unchecked
when this process does not know its classes (from its answers or the registry): nothing is left to ask; so is
feedback on an answer of a model whose version number another model holds now (a registry removed and trained anew),
unless this process still knows the old model's classes.

The same feedback sent again (a client retrying a 503 whose write reached Redis after all, or a lost reply) is
answered 200 as recorded, and counted once; other feedback on an answer that already got some is 409."""
from __future__ import annotations

from typing import Awaitable, Callable

from services.gateway.errors import GatewayError
from services.gateway.feedback import BadFeedbackToken
from services.gateway.photo_store import PhotoStore
from services.gateway.stats import Stats


async def take_feedback(stats: Stats, photo_store: PhotoStore | None,
                        classes_of: Callable[[int, str | None], Awaitable[list[str] | None]], token: str,
                        true_label: str, request_id: str | None = None) -> dict:
    """What was recorded ({request_id, version, predicted, true_label, correct}, plus ``photo_kept`` with a photo
    store: True/False for a correction, None otherwise); GatewayError 400/403/409/410 otherwise. ``classes_of``
    gives the class labels of a version, the model of an identity (None: unknown), as Classifier.classes_of."""
    if not true_label:
        raise GatewayError(400, "bad_feedback", "true_label is required")
    try:
        claim = stats.tokens.verify(token)
    except BadFeedbackToken as exc:
        status = {"expired": 410, "forged": 403}.get(exc.reason, 400)
        raise GatewayError(status, f"feedback_token_{exc.reason}", str(exc)) from None
    if request_id not in (None, "", claim.request_id):
        raise GatewayError(400, "bad_feedback", "request_id is not the one of the feedback_token")
    classes = await classes_of(claim.version, claim.identity)
    if classes is not None and true_label not in classes:
        raise GatewayError(400, "unknown_class", f"true_label {true_label[:80]!r} is not a class of version "
                           f"{claim.version}, which answered: give one of {', '.join(classes)}")
    recorded = await stats.record_feedback(claim, true_label)
    if recorded is None:
        raise GatewayError(409, "feedback_already_recorded",
                           f"answer {claim.request_id} already got feedback with another true_label")
    if photo_store is not None:
        recorded["photo_kept"] = await photo_store.record(claim, true_label)
    return recorded
