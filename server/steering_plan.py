"""One request's steering, from its parsed body to the body vLLM gets: the same for every API.

`plan_request` is the single path every steerable request takes (chat and text completions,
Responses, Anthropic Messages, chat batches, SageMaker invocations, and each line of
`steermoe run-batch`): split off the steering fields (`take_steering`), apply the operator's
policy (locked endpoints, client profiles, flags), check what steering cannot run with, resolve
the steering once against the served model, and write the body vLLM gets: the locked name
replaced by the base model's, the resolved expert sets marked with the server's key.
It raises `SteeringHTTPError` (never reaching vLLM) and fills the trace as it goes, so the
caller can count and audit refused requests too.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from expert_profiles.echo import clip
from expert_profiles.request_steering import (
    CAPTURE_KEY,
    GUARD_KEY,
    PROFILE_KEY,
    RequestedSteering,
    ResolvedSteering,
    server_key,
)
from server import vllm_server_compat as compat
from server.config import ServerConfig
from server.context import SteeringContext
from server.errors import SteeringHTTPError
from server.policy import SteeringDecision
from server.request_body import (
    capture_problem,
    contains_steering,
    guard_problem,
    take_steering,
    with_steering,
)
from server.request_record import CompletionTrace
from server.responses_state import StoredSteering, continued

# A client's request id is kept (as a prefix) only in this form.
REQUEST_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")
# Kinds whose engine request id comes from the body's `request_id` (not `X-Request-Id`).
BODY_REQUEST_ID_KINDS = ("responses", "batch_line")


@dataclass
class SteeringPlan:
    """What to send vLLM for one request, and how to find its captured routing."""

    body: dict[str, Any]
    # Engine request ids the captured sequence may run under (empty: no capture).
    capture_ids: tuple[str, ...] = ()
    # Engine request ids a guarded request may run under (its guard decision's key).
    guard_ids: tuple[str, ...] = ()
    # The X-Request-Id header to send (captured requests of header-id kinds).
    request_id_header: str | None = None
    # The response id, where the body fixes it (`responses`, run-batch lines).
    response_id: str | None = None


def unique_request_id(given: Any) -> str:
    """A request id no other request has: the client's (sanitised, short) plus a random
    part. A captured request's routing is looked up by it."""
    prefix = REQUEST_ID_CHARS.sub("", given if isinstance(given, str) else "")[:48]
    random_part = uuid.uuid4().hex
    return f"{prefix}-{random_part}" if prefix else random_part


def steering_header(decision: SteeringDecision | None, resolved: ResolvedSteering | None,
                    served_names: tuple[str, ...] = ()) -> str:
    """`profile=NAME; endpoint=E; digest=D`, `inline; endpoint=E; digest=D`, or `none`;
    `strength=S` follows the profile when the request scaled it.

    The endpoint appears only if it is a served name (never the client's text as sent)."""
    if decision is None or not decision.steered:
        return "none"
    parts = [f"guard={decision.guard}" if decision.guard is not None else
             f"profile={decision.profile}" if decision.profile is not None else "inline"]
    if decision.strength is not None:
        parts.append(f"strength={decision.strength:g}")
    if decision.endpoint and decision.endpoint in served_names:
        parts.append(f"endpoint={clip(decision.endpoint)}")
    if resolved is not None:
        parts.append(f"digest={resolved.digest}")
    return "; ".join(parts)


def steering_field(decision: SteeringDecision | None,
                   resolved: ResolvedSteering | None) -> dict[str, Any] | None:
    if decision is None or not decision.steered:
        return None
    return {
        "profile": decision.profile,
        "inline": decision.inline is not None,
        "endpoint": decision.endpoint,
        "locked": decision.locked,
        "guard": decision.guard,
        "strength": decision.strength if decision.strength is not None else 1.0,
        "digest": resolved.digest if resolved is not None else None,
    }


def check_steerable(body: dict[str, Any]) -> None:
    for name in compat.UNSTEERABLE_FIELDS:
        if body.get(name):
            raise SteeringHTTPError(400, f"steering cannot be applied with {name!r}", param=name)


def plan_request(context: SteeringContext, kind: str, body: dict[str, Any],
                 trace: CompletionTrace, client_request_id: str | None = None,
                 previous: tuple[str, StoredSteering] | None = None) -> SteeringPlan:
    """The body vLLM gets for `body` (a parsed JSON object) on an API of `kind`.

    `client_request_id` is the client's `X-Request-Id` (kept as a prefix of a captured
    request's id); `previous` the (id, record) of the stored response a Responses request
    continues. Raises SteeringHTTPError; `trace` holds what was known by then."""
    config = context.config
    model = body.get("model")
    trace.endpoint = (model if isinstance(model, str) else None) or config.default_name
    try:
        trace.requested, rest = take_steering(body)
    except SteeringHTTPError as exc:
        # A profile name that cannot be one (or a bad composition) is refused steering,
        # counted and audited as such, as when the policy refuses an unknown profile.
        trace.malformed_steering = exc.param == PROFILE_KEY
        raise
    requested = trace.requested
    if previous is not None:
        endpoint, requested = continued(config, previous[0], previous[1], model, requested, rest)
        trace.endpoint = endpoint or config.default_name
        trace.inherited = requested is not trace.requested and requested.mentions_steering
    trace.locked = trace.endpoint in config.endpoints
    decision = context.policy.decide(trace.endpoint, requested)
    trace.decision = decision
    if decision.steered:
        check_steerable(rest)
    if decision.capture and (problem := capture_problem(kind, rest)):
        raise SteeringHTTPError(400, problem, param=CAPTURE_KEY)
    if decision.guard is not None and (problem := guard_problem(kind, rest)):
        raise SteeringHTTPError(400, problem, param=GUARD_KEY)
    trace.resolved = context.resolve(decision)
    trace.stream = bool(rest.get("stream"))
    if trace.locked:
        rest["model"] = config.default_name
    plan = SteeringPlan(body=rest)
    # Captured routing and guard decisions are fetched by the engine request id: fix it.
    known = decision.capture or decision.guard is not None
    ids: tuple[str, ...] = ()
    if kind in BODY_REQUEST_ID_KINDS:
        given = rest.get("request_id")
        if known and isinstance(given, str) and given:
            rest["request_id"] = unique_request_id(given)
        elif kind == "responses" and (known or given is None):
            rest["request_id"] = f"resp_{uuid.uuid4().hex}"  # vLLM's default form
        elif known:
            rest["request_id"] = uuid.uuid4().hex
        response_id = rest.get("request_id")
        if kind == "responses" and isinstance(response_id, str):
            plan.response_id = response_id
        if known:
            ids = compat.capture_ids(kind, rest["request_id"])
    elif known:
        plan.request_id_header = unique_request_id(client_request_id)
        ids = compat.capture_ids(kind, plan.request_id_header)
    plan.capture_ids = ids if decision.capture else ()
    plan.guard_ids = ids if decision.guard is not None else ()
    plan.body = with_steering(rest, decision.profile, decision.inline, decision.capture,
                              server_key(), trace.resolved, decision.strength, decision.guard)
    return plan


def check_other_body(config: ServerConfig, path: str, body: dict[str, Any]
                     ) -> dict[str, Any] | None:
    """A body for a path that does not steer: raises for locked names (403; on tokenizer paths
    they become the base model's) and steering fields (400). Returns the rewritten body, or
    None to forward the body as sent."""
    steerable = ", ".join(compat.steerable_paths())
    model = body.get("model")
    locked = isinstance(model, str) and model in config.endpoints
    if locked and path not in compat.TOKENIZATION_PATHS:
        raise SteeringHTTPError(
            403, f"endpoint '{clip(model)}' serves only the steerable APIs ({steerable})",
            param="model")
    key = contains_steering(body)
    if key is not None:
        if path in compat.UNSTEERABLE_PATHS:
            raise SteeringHTTPError(
                400, f"'{clip(key)}': {path} takes raw sampling parameters and cannot be "
                "steered; use a steerable API", param=key)
        if path in compat.STEERABLE_PATHS:
            raise SteeringHTTPError(
                400, f"'{clip(key)}': this vLLM's {path} does not pass vllm_xargs to the "
                f"engine, so it cannot be steered; use {steerable}", param=key)
        raise SteeringHTTPError(
            400, f"'{clip(key)}': steering is available on the steerable APIs only "
            f"({steerable})", param=key)
    if locked:
        return {**body, "model": config.default_name}
    return None


def stored_steering(trace: CompletionTrace, served_names: tuple[str, ...]) -> StoredSteering:
    """What a served Responses request leaves for its continuations and retrievals."""
    decision, resolved = trace.decision, trace.resolved
    inherited = RequestedSteering()
    if decision is not None:
        if decision.guard is not None:  # a locked endpoint's guard applies by itself
            inherited = (RequestedSteering() if decision.locked else
                         RequestedSteering(guard=decision.guard, strength=decision.strength))
        elif decision.profile is not None:
            inherited = RequestedSteering(profile=decision.profile, profile_given=True,
                                          strength=decision.strength)
        elif decision.inline is not None and resolved is not None:
            inherited = RequestedSteering(inline=inline_sets(resolved),
                                          strength=decision.strength)
    return StoredSteering(
        endpoint=clip(trace.endpoint or ""), locked=trace.locked, requested=inherited,
        field=steering_field(decision, resolved),
        header=steering_header(decision, resolved, served_names),
    )


def inline_sets(resolved: ResolvedSteering) -> dict[str, Any]:
    """Resolved inline steering as inline steering again (bounded by the model's shape)."""
    sets: dict[str, Any] = {"activate": {str(k): v for k, v in resolved.activate.items()},
                            "deactivate": {str(k): v for k, v in resolved.deactivate.items()},
                            "eps": resolved.eps}
    if resolved.bias:
        sets["bias"] = {str(layer): {str(e): v for e, v in row.items()}
                        for layer, row in resolved.bias.items()}
    return sets
