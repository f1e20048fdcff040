"""Feedback on an answer, the same for HTTP (POST /v1/feedback) and gRPC (Classifier.Feedback): verify the answer's
signed token, record the ground truth once per answer (stats.py), and with the opt-in photo store log a correction
of a kept photo (photo_store.py)."""
from __future__ import annotations

from services.gateway.errors import GatewayError
from services.gateway.feedback import BadFeedbackToken
from services.gateway.photo_store import PhotoStore
from services.gateway.stats import Stats


async def take_feedback(stats: Stats, photo_store: PhotoStore | None, token: str, true_label: str,
                        request_id: str | None = None) -> dict:
    """What was recorded ({request_id, version, predicted, true_label, correct}, plus ``photo_kept`` with a photo
    store: True/False for a correction, None otherwise); GatewayError 400/403/409/410 otherwise."""
    if not true_label:
        raise GatewayError(400, "bad_feedback", "true_label is required")
    try:
        claim = stats.tokens.verify(token)
    except BadFeedbackToken as exc:
        status = {"expired": 410, "forged": 403}.get(exc.reason, 400)
        raise GatewayError(status, f"feedback_token_{exc.reason}", str(exc)) from None
    if request_id not in (None, "", claim.request_id):
        raise GatewayError(400, "bad_feedback", "request_id is not the one of the feedback_token")
    recorded = await stats.record_feedback(claim, true_label)
    if recorded is None:
        raise GatewayError(409, "feedback_already_recorded", f"answer {claim.request_id} already got feedback")
    if photo_store is not None:
        recorded["photo_kept"] = await photo_store.record(claim, true_label)
    return recorded
