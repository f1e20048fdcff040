"""How long an error's message may be when a client is told it: a message may quote what a request held (an input's
name, a version label), and gRPC carries it in a trailer, percent-encoded (up to three bytes a character), which
clients refuse beyond their metadata limit (8 KB by default) with RESOURCE_EXHAUSTED in place of the status sent."""
from __future__ import annotations

MAX_STATUS_DETAILS = 2000


def status_details(message: str) -> str:
    """``message`` cut to MAX_STATUS_DETAILS characters, saying how many more it had."""
    if len(message) <= MAX_STATUS_DETAILS:
        return message
    cut = message[:MAX_STATUS_DETAILS - 40]
    return f"{cut}... ({len(message) - len(cut)} more characters)"
