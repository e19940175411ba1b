"""What one steerable request leaves behind: its metrics and, if steering was involved, an
audit line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from expert_profiles.echo import MAX_ECHO, clip
from expert_profiles.request_steering import RequestedSteering, ResolvedSteering
from server import vllm_server_compat as compat
from server.audit import AuditRecord, write_audit
from server.context import SteeringContext
from server.policy import SteeringDecision

MAX_LOGGED_ERROR = 300
MAX_LOGGED_ID = 160
# The `path` label of the request metrics: a steerable API's path or one of these.
RUN_BATCH_PATH = "run-batch:/v1/chat/completions"
PATH_LABELS = frozenset({*compat.STEERABLE_PATHS, RUN_BATCH_PATH})


class ResponseFacts(Protocol):
    """What is known about the answer (`ResponseEditor`, or a run-batch output line)."""

    response_id: str | None

    def token_counts(self) -> tuple[int | None, int | None]: ...


def path_label(path: str) -> str:
    return path if path in PATH_LABELS else "other"


@dataclass
class CompletionTrace:
    """What is known about one completion request."""

    path: str
    started: float
    endpoint: str | None = None
    locked: bool = False
    stream: bool = False
    requested: RequestedSteering = field(default_factory=RequestedSteering)
    decision: SteeringDecision | None = None
    resolved: ResolvedSteering | None = None
    error: str | None = None
    # A Responses continuation that runs with the steering of the response it continues.
    inherited: bool = False
    # A `steering_profile` that cannot be read (not a profile name, a bad composition).
    malformed_steering: bool = False
    # What a guarded request's guard decided (`guard_field`), once taken from the engine.
    guard_decision: dict[str, Any] | None = None

    @property
    def involves_steering(self) -> bool:
        """Asked for, refused, or imposed by a locked endpoint."""
        steered = self.decision is not None and self.decision.steered
        return (self.requested.mentions_steering or self.malformed_steering or self.locked
                or steered)

    def profile_label(self) -> str:
        """The `profile` label of the metrics: a profile name, `inline`, `none` or `rejected`."""
        if self.decision is not None and self.error is None:
            return self.decision.label
        return "rejected" if self.involves_steering else "none"


def _short(value: str | None, limit: int = MAX_ECHO) -> str | None:
    return None if value is None else clip(value, limit)


def record_completion(context: SteeringContext, trace: CompletionTrace, status: int,
                      editor: ResponseFacts | None) -> None:
    """Count the request in the metrics; write its audit line if steering was involved."""
    latency = time.monotonic() - trace.started
    prompt_tokens, completion_tokens = editor.token_counts() if editor else (None, None)
    endpoint = trace.endpoint if trace.endpoint in context.config.served_names else "other"
    context.metrics.observe_request(path_label(trace.path), endpoint, trace.profile_label(),
                                    status, latency, prompt_tokens, completion_tokens)
    if not trace.involves_steering:
        return
    decision, requested, resolved = trace.decision, trace.requested, trace.resolved
    if decision is not None and decision.guard is not None and trace.error is None \
            and status < 400:
        context.metrics.observe_guard(decision.guard, (trace.guard_decision or {}).get("fired"))
    write_audit(context.audit, AuditRecord(
        request_id=_short(editor.response_id, MAX_LOGGED_ID) if editor else None,
        path=trace.path,
        endpoint=_short(trace.endpoint),
        profile=decision.profile if decision is not None else _short(requested.profile),
        inline=(decision.inline if decision is not None else requested.inline) is not None,
        strength=decision.strength if decision is not None else requested.strength,
        guard=decision.guard if decision is not None else _short(requested.guard),
        guard_fired=(trace.guard_decision or {}).get("fired"),
        guard_score=(trace.guard_decision or {}).get("score"),
        digest=resolved.digest if resolved is not None else None,
        locked=trace.locked,
        inherited=trace.inherited,
        stream=trace.stream,
        status=status,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_s=round(latency, 4),
        error=_short(trace.error, MAX_LOGGED_ERROR),
    ))
