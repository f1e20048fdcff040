"""URLs as the services log them: a password in a URL (its userinfo, ``redis://:secret@redis:6379/0``, or redis-py's
``?password=`` query field) is replaced by ``***``, so that logs, which are shipped and kept elsewhere, hold no
credential."""
from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

HIDDEN = "***"


def without_password(url: str) -> str:
    """``url`` with its password replaced by HIDDEN (the user name kept); unchanged without one."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL that splits (a port that is not a number, ...): shown as it is
        return url
    if password is not None:
        user, _, host = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{user.split(':', 1)[0]}:{HIDDEN}@{host}")
    fields = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "password" for name, _ in fields):
        parts = parts._replace(query=urlencode([(name, HIDDEN if name == "password" else value)
                                                for name, value in fields], safe="*"))
    return urlunsplit(parts)
