"""One JSON line per steered request (served or refused), for whoever audits steering.

Lines go to the `steermoe.audit` logger (stderr by default) and, with `--audit-log FILE`, are
appended to FILE.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass

AUDIT_LOGGER = "steermoe.audit"


@dataclass
class AuditRecord:
    request_id: str | None
    path: str
    endpoint: str | None
    profile: str | None
    inline: bool
    digest: str | None
    locked: bool
    stream: bool
    status: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None
    error: str | None = None
    # A Responses continuation run with the steering of the response it continues.
    inherited: bool = False
    # The request's steering_strength (None: full strength).
    strength: float | None = None
    # A guarded request: its guard, and whether it fired with which score (None: unknown).
    guard: str | None = None
    guard_fired: bool | None = None
    guard_score: float | None = None

    def to_json(self) -> str:
        data = {"time": _utc_now(), "event": "steered_request", **asdict(self)}
        return json.dumps(data, separators=(",", ":"))


def _utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def audit_logger(path: str | None) -> logging.Logger:
    """The audit logger: message-only lines to stderr, and to `path` when given."""
    logger = logging.getLogger(AUDIT_LOGGER)
    if not _OUTPUTS:
        logger.setLevel(logging.INFO)
        logger.propagate = False
        _add_output(logger, "<stderr>", logging.StreamHandler(sys.stderr))
    if path and path not in _OUTPUTS:
        _add_output(logger, path, logging.FileHandler(path, encoding="utf-8"))
    return logger


_OUTPUTS: set[str] = set()


def _add_output(logger: logging.Logger, key: str, handler: logging.Handler) -> None:
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    _OUTPUTS.add(key)


def write_audit(logger: logging.Logger, record: AuditRecord) -> None:
    logger.info(record.to_json())
