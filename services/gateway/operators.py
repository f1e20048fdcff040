"""Named operator tokens: who may read and change the routing, and whose name the audit records.

Sources (both optional, merged):
- a tokens file (``--operator-tokens`` / GATEWAY_OPERATOR_TOKENS): one ``name:token`` per line, ``#`` comments and
  blank lines ignored; or a folder with one file per operator (file name = operator, content = token), which is
  what a Kubernetes Secret mounted as a volume looks like (its ``..data`` entries are skipped). Read again when it
  changes (watched_file.py), so a rotated Secret takes effect without a restart;
- the single ``--admin-token`` / GATEWAY_ADMIN_TOKEN, as the operator named ``admin``.

A bearer token is compared with every known token in constant time. No token at all = routing changes refused.
"""
from __future__ import annotations

import hmac
import logging
import re
from pathlib import Path

from services.watched_file import WatchedFile

log = logging.getLogger("gateway.operators")
NAME_RE = re.compile(r"[A-Za-z0-9_.@-]+")
ADMIN_NAME = "admin"


class OperatorTokensError(ValueError):
    pass


def parse_tokens_file(text: str, where: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not NAME_RE.fullmatch(name) or not token:
            raise OperatorTokensError(f"{where}:{number}: expected 'name:token' (names: letters, digits, '_.@-')")
        if name in tokens:
            raise OperatorTokensError(f"{where}:{number}: operator {name!r} is listed twice")
        tokens[name] = token
    return tokens


def read_tokens(path: Path) -> dict[str, str]:
    if path.is_dir():
        tokens = {}
        for entry in sorted(path.iterdir()):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            if not NAME_RE.fullmatch(entry.name):
                raise OperatorTokensError(f"{entry}: an operator name is letters, digits and '_.@-'")
            token = entry.read_text().strip()
            if not token:
                raise OperatorTokensError(f"{entry}: empty token")
            tokens[entry.name] = token
        return tokens
    return parse_tokens_file(path.read_text(), str(path))


class OperatorTokens:
    def __init__(self, tokens_path: str | Path | None = None, admin_token: str | None = None):
        self.path = Path(tokens_path) if tokens_path else None
        self.admin_token = admin_token or None
        self._file = WatchedFile(self.path, self._read, "operator tokens") if self.path is not None else None
        self._static = self._read(None) if self._file is None else {}

    @property
    def _tokens(self) -> dict[str, str]:
        return self._file.current() if self._file is not None else self._static

    def _read(self, path: Path | None) -> dict[str, str]:
        tokens = read_tokens(path) if path is not None else {}
        if self.admin_token:
            if ADMIN_NAME in tokens and tokens[ADMIN_NAME] != self.admin_token:
                raise OperatorTokensError(f"operator {ADMIN_NAME!r} is in {path} and also given as the admin "
                                          "token, with another token")
            tokens[ADMIN_NAME] = self.admin_token
        owners: dict[str, str] = {}
        for name, token in tokens.items():
            if token in owners:
                raise OperatorTokensError(f"operators {owners[token]!r} and {name!r} share a token: the audit could "
                                          "not tell them apart")
            owners[token] = name
        log.info("operator tokens: %s", ", ".join(sorted(tokens)) or "none (routing changes refused)")
        return tokens

    @property
    def configured(self) -> bool:
        return bool(self._tokens)

    def names(self) -> list[str]:
        return sorted(self._tokens)

    def owner(self, bearer: str) -> str | None:
        """The operator whose token ``bearer`` is, or None. Compares with every token (no early exit). A header's
        bytes that are not UTF-8 arrive as lone surrogates (aiohttp decodes with surrogateescape): they are encoded
        as such, so they match no token rather than fail."""
        found, given = None, bearer.encode("utf-8", "surrogatepass")
        for name, token in self._tokens.items():
            if hmac.compare_digest(given, token.encode()):
                found = name
        return found
