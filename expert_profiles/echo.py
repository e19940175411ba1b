"""Echoing client input safely: bounded and printable, in errors, headers and log lines."""

from __future__ import annotations

MAX_ECHO = 80


def clip(value: object, limit: int = MAX_ECHO) -> str:
    """Client input made safe to echo: printable ASCII only (others as escapes), at most
    `limit` characters of it, `...` marking a cut. Use for every client string in an error
    message, a header or a log line."""
    text = value if isinstance(value, str) else repr(value)
    head = text[: limit + 1]
    safe = head.encode("ascii", "backslashreplace").decode("ascii")
    safe = "".join(ch if " " <= ch <= "~" else f"\\x{ord(ch):02x}" for ch in safe)
    if len(text) > limit or len(safe) > limit:
        return safe[:limit] + "..."
    return safe
