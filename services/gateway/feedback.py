"""Feedback tokens: each answer carries a signed token saying what it predicted, so an answer costs no Redis key.

A token is ``v1.<payload>.<signature>``: the payload is base64url JSON {"r": request id, "m": model, "v": version,
"p": predicted label, "t": issue time (unix seconds), "i": the identity of the model behind that version number when
the gateway knew it (version_facts.py; tokens issued before answers named their model have none), and "h": the
photo's sha256 when the photo store keeps it (photo_store.py)}, the signature base64url HMAC-SHA256 of
``v1.<payload>`` under the gateway's feedback secret. ``/v1/feedback`` verifies it; a token is good for ``lifetime``
seconds after issue.
Every replica must share the secret (FEEDBACK_SECRET or --feedback-secret-file; a Kubernetes Secret / compose
secret in deploy/), or a replica refuses the tokens of the others. Single use is enforced when feedback arrives
(stats.Stats.record_feedback), not here.

Rotation: the secret file holds one secret per line. The first signs new tokens; every one verifies, so tokens
signed with an older secret keep their feedback for as long as it is listed. The file is read again when it
changes (watched_file.py), so a rotated Secret takes effect without a restart (README "Gateway" says in which
order to change it on every replica).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.watched_file import WatchedFile

log = logging.getLogger("gateway.feedback")
VERSION_PREFIX = "v1"
DEFAULT_LIFETIME_SECONDS = 7 * 24 * 3600
MIN_SECRET_BYTES = 16


class BadFeedbackToken(ValueError):
    """``reason`` is "malformed", "forged" (signature or model mismatch) or "expired"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FeedbackClaim:
    request_id: str
    version: int
    predicted: str
    issued_at: int
    expires_at: int
    photo_sha256: str | None = None  # set when the gateway kept the photo (--photo-store)
    identity: str | None = None  # the model that answered under ``version`` (version_facts.identity), when known


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def checked_secrets(given: Sequence[bytes], where: str) -> tuple[bytes, ...]:
    """``given`` as a tuple, the first signing: at least one, each of at least MIN_SECRET_BYTES; ValueError naming
    ``where`` otherwise."""
    if not given:
        raise ValueError(f"{where} holds no feedback secret")
    for number, secret in enumerate(given, 1):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"{where}: feedback secret {number} is shorter than {MIN_SECRET_BYTES} bytes")
    return tuple(given)


def read_secrets(path: Path) -> tuple[bytes, ...]:
    """The secrets in a secret file: one per line, the first signing; blank lines and ``#`` comments skipped,
    surrounding whitespace dropped."""
    lines = (line.strip() for line in path.read_bytes().splitlines())
    found = checked_secrets([line for line in lines if line and not line.startswith(b"#")], str(path))
    log.info("feedback secrets: %d in %s, the first signing", len(found), path)
    return found


class FeedbackTokens:
    def __init__(self, secret: bytes | Sequence[bytes] | WatchedFile[tuple[bytes, ...]], model_name: str,
                 lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS, clock=time.time):
        """``secret``: one secret, several (the first signs, every one verifies), or a secret file being watched
        (read_secrets)."""
        if isinstance(secret, WatchedFile):
            self._secrets = secret.current
        else:
            fixed = checked_secrets([secret] if isinstance(secret, bytes) else list(secret), "the secret given")
            self._secrets = lambda: fixed
        self.model_name = model_name
        self.lifetime = lifetime_seconds
        self.clock = clock

    @classmethod
    def with_random_secret(cls, model_name: str, **kwargs) -> "FeedbackTokens":
        """For a single gateway: its tokens are refused by any other replica and after a restart."""
        return cls(secrets.token_bytes(32), model_name, **kwargs)

    @staticmethod
    def _sign(signed_part: str, secret: bytes) -> str:
        return _b64(hmac.new(secret, signed_part.encode(), hashlib.sha256).digest())

    def _signed(self, payload: dict) -> str:
        signed_part = f"{VERSION_PREFIX}.{_b64(json.dumps(payload, separators=(',', ':')).encode())}"
        return f"{signed_part}.{self._sign(signed_part, self._secrets()[0])}"

    def issue(self, request_id: str, version: int, predicted: str, photo_sha256: str | None = None,
              identity: str | None = None) -> str:
        payload = {"r": request_id, "m": self.model_name, "v": version, "p": predicted, "t": int(self.clock())}
        if identity is not None:
            payload["i"] = identity
        if photo_sha256 is not None:
            payload["h"] = photo_sha256
        return self._signed(payload)

    def naming_photo(self, token: str, photo_sha256: str) -> str:
        """``token``, one this gateway issued (its signature is checked, not its expiry), naming a kept photo too:
        the same answer and issue time, with "h", signed with the signing secret."""
        return self._signed({**self._payload(token), "h": photo_sha256})

    def _payload(self, token: str) -> dict:
        """The payload of a token signed with one of the secrets; BadFeedbackToken "malformed" or "forged"
        otherwise."""
        parts = token.split(".") if isinstance(token, str) and token.isascii() else []  # issued tokens are ASCII
        if len(parts) != 3 or parts[0] != VERSION_PREFIX:
            raise BadFeedbackToken("malformed", "feedback_token is not a token this gateway issues")
        signed_part = f"{parts[0]}.{parts[1]}"
        signed = False
        for secret in self._secrets():  # every one: the time taken does not tell which secret signed
            signed |= hmac.compare_digest(self._sign(signed_part, secret), parts[2])
        if not signed:
            raise BadFeedbackToken("forged", "feedback_token has a bad signature (or was issued with another "
                                   "feedback secret)")
        try:
            payload = json.loads(_unb64(parts[1]))
        except (binascii.Error, ValueError):
            raise BadFeedbackToken("malformed", "feedback_token carries an unreadable payload") from None
        if not isinstance(payload, dict):
            raise BadFeedbackToken("malformed", "feedback_token carries an unreadable payload")
        return payload

    def verify(self, token: str) -> FeedbackClaim:
        payload = self._payload(token)
        try:
            claim = FeedbackClaim(str(payload["r"]), int(payload["v"]), str(payload["p"]), int(payload["t"]),
                                  int(payload["t"]) + self.lifetime, str(payload["h"]) if "h" in payload else None,
                                  str(payload["i"]) if "i" in payload else None)
        except (ValueError, KeyError, TypeError):
            raise BadFeedbackToken("malformed", "feedback_token carries an unreadable payload") from None
        if payload.get("m") != self.model_name:
            raise BadFeedbackToken("forged", f"feedback_token is for model {payload.get('m')!r}, not "
                                   f"{self.model_name!r}")
        if self.clock() >= claim.expires_at:
            raise BadFeedbackToken("expired", f"feedback_token expired ({self.lifetime} s after the answer)")
        return claim


def tokens_from_config(secret_file: str | None, env_secret: str | None, model_name: str,
                       lifetime_seconds: int) -> FeedbackTokens:
    """Tokens signed with the secrets of ``secret_file`` (watched), or else with ``env_secret`` (one secret), or else
    with a random one."""
    if secret_file:
        return FeedbackTokens(WatchedFile(secret_file, read_secrets, "feedback secrets"), model_name,
                              lifetime_seconds)
    if env_secret:
        return FeedbackTokens(checked_secrets([env_secret.encode()], "FEEDBACK_SECRET"), model_name, lifetime_seconds)
    log.warning("no feedback secret (FEEDBACK_SECRET or --feedback-secret-file): using a random one; other "
                "replicas and this gateway after a restart will refuse its feedback tokens")
    return FeedbackTokens.with_random_secret(model_name, lifetime_seconds=lifetime_seconds)
