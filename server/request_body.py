"""Reading the steering fields of a request body and writing the body vLLM gets.

The same for every steerable API (chat and text completions, Responses, Anthropic Messages,
chat batches, SageMaker invocations, run-batch lines).

A client asks for steering with top-level `steering_profile`, `steering` (inline expert sets)
and `capture_routing`, or with the same keys inside vLLM's `vllm_xargs`; they are read by the
parser the engine front end uses (`request_steering.parse_steering_fields`). The rewritten body
carries them only in `vllm_xargs`, in the form that field accepts (strings and numbers).
"""

from __future__ import annotations

import json
from typing import Any

from expert_profiles.request_steering import (
    AUTH_KEY,
    CAPTURE_KEY,
    GUARD_KEY,
    INLINE_KEY,
    PROFILE_KEY,
    REQUEST_KEYS,
    RESERVED_KEYS,
    RESOLVED_KEY,
    STRENGTH_KEY,
    RequestedSteering,
    ResolvedSteering,
    SteeringRequestError,
    inline_to_wire,
    parse_steering_fields,
    resolved_to_wire,
    steering_mark,
)
from server.errors import SteeringHTTPError

XARGS_KEY = "vllm_xargs"
ARGS_CONTAINERS = (XARGS_KEY, "extra_args")
# Deeper JSON than this is refused (no OpenAI request body comes near it).
MAX_JSON_DEPTH = 64
_MISSING = object()


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 otherwise (also for nesting beyond
    MAX_JSON_DEPTH and numbers Python will not parse)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SteeringHTTPError(
            400, f"the request body is not valid JSON: {exc.__class__.__name__} at byte "
            f"{getattr(exc, 'pos', getattr(exc, 'start', '?'))}") from None
    except (ValueError, RecursionError):
        raise SteeringHTTPError(
            400, "the request body is not valid JSON: too deeply nested or a number too large"
        ) from None
    if not isinstance(body, dict):
        raise SteeringHTTPError(400, "the request body must be a JSON object")
    if too_deep(body, MAX_JSON_DEPTH):
        raise SteeringHTTPError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def too_deep(value: Any, limit: int) -> bool:
    """Whether objects/arrays in `value` nest deeper than `limit` (iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _pick(key: str, top: Any, nested: Any) -> Any:
    if top is _MISSING:
        return nested
    if nested is not _MISSING and nested != top:
        raise SteeringHTTPError(
            400, f"{key!r} is given both at the top level and in {XARGS_KEY!r} with "
            "different values", param=key,
        )
    return top


def take_steering(body: dict[str, Any]) -> tuple[RequestedSteering, dict[str, Any]]:
    """Split the steering fields off a completion body; returns (request, body without them).

    A field may be at the top level or in `vllm_xargs` (the same value in both is fine);
    `parse_steering_fields` reads what was given. Raises SteeringHTTPError (400)."""
    rest = dict(body)
    xargs = rest.get(XARGS_KEY)
    nested: dict[str, Any] = {}
    if xargs is not None and not isinstance(xargs, dict):
        raise SteeringHTTPError(400, f"{XARGS_KEY!r} must be an object", param=XARGS_KEY)
    if isinstance(xargs, dict):
        reserved = [key for key in RESERVED_KEYS if key in xargs]
        if reserved:
            raise SteeringHTTPError(
                400, f"{XARGS_KEY} key {reserved[0]!r} is reserved for the server",
                param=XARGS_KEY,
            )
        nested = {key: xargs[key] for key in REQUEST_KEYS if key in xargs}
        remaining = {key: value for key, value in xargs.items() if key not in REQUEST_KEYS}
        if remaining:
            rest[XARGS_KEY] = remaining
        else:
            rest.pop(XARGS_KEY)
    fields = {}
    for key in REQUEST_KEYS:
        value = _pick(key, rest.pop(key, _MISSING), nested.get(key, _MISSING))
        if value is not _MISSING:
            fields[key] = value
    try:
        return parse_steering_fields(fields), rest
    except SteeringRequestError as exc:
        raise SteeringHTTPError(exc.status, str(exc), param=exc.param) from None


def with_steering(body: dict[str, Any], profile: str | None, inline: dict[str, Any] | None,
                  capture: bool, key: bytes | None = None,
                  resolved: ResolvedSteering | None = None,
                  strength: float | None = None, guard: str | None = None) -> dict[str, Any]:
    """`body` (without steering fields) carrying the steering to apply in `vllm_xargs`.

    With `key` (the server's secret, under `steermoe serve`) it carries the `resolved` expert
    sets themselves and a mark, so the engine front end runs exactly what was checked here;
    without it (plain `vllm serve --middleware`), the request keys, resolved there.
    """
    out = dict(body)
    xargs = dict(out.get(XARGS_KEY) or {})
    steering: dict[str, Any] = {}
    if key is not None and resolved is not None:
        steering[RESOLVED_KEY] = resolved_to_wire(resolved)
    elif profile is not None:
        steering[PROFILE_KEY] = profile
    elif inline is not None:
        steering[INLINE_KEY] = inline_to_wire(inline)
    elif guard is not None:
        steering[GUARD_KEY] = guard
    if strength is not None and RESOLVED_KEY not in steering and steering:
        steering[STRENGTH_KEY] = strength
    if capture:
        steering[CAPTURE_KEY] = 1
    if steering and key is not None:
        steering[AUTH_KEY] = steering_mark(key, steering)
    xargs.update(steering)
    if xargs:
        out[XARGS_KEY] = xargs
    return out


def capture_problem(path_kind: str, body: dict[str, Any]) -> str | None:
    """Why routing cannot be captured for this body (one sequence, non-streaming), or None.

    `path_kind` is an API kind of `vllm_server_compat` (`chat`, `completions`, `responses`,
    `messages`, `chat_batch`, `invocations`, `batch_line`)."""
    if body.get("stream"):
        return f"{CAPTURE_KEY} is available for non-streaming requests only"
    if body.get("use_beam_search"):
        return f"{CAPTURE_KEY} is not available with beam search"
    if _completion_kind(path_kind, body) == "completions" \
            and body.get("prompt_embeds") is not None:
        return f"{CAPTURE_KEY} is not available with prompt_embeds"
    return _one_sequence_problem(CAPTURE_KEY, path_kind, body)


def guard_problem(path_kind: str, body: dict[str, Any]) -> str | None:
    """Why a guard cannot decide for this body (one sequence; its decision is reported in the
    response, so not in the background), or None."""
    return _one_sequence_problem(GUARD_KEY, path_kind, body)


def _completion_kind(path_kind: str, body: dict[str, Any]) -> str:
    """`invocations` runs as a chat completion if it validates as one, else as a completion."""
    if path_kind == "invocations":
        return "chat" if "messages" in body else "completions"
    return path_kind


def _one_sequence_problem(field: str, path_kind: str, body: dict[str, Any]) -> str | None:
    """Why `field` (reported per sequence, in the response) cannot be served for this body."""
    path_kind = _completion_kind(path_kind, body)
    if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
        return f"{field} needs n=1"
    if path_kind == "responses" and body.get("background"):
        return f"{field} is not available with background"
    if path_kind == "chat_batch":
        conversations = body.get("messages")
        if not isinstance(conversations, list) or len(conversations) != 1:
            return f"{field} needs a single conversation"
    if path_kind == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
            return f"{field} needs a single prompt"
    return None


def contains_steering(body: dict[str, Any]) -> str | None:
    """A steering or reserved key at the top level or in any `vllm_xargs`/`extra_args` object,
    or such a container that is not an object (vLLM turns lists of pairs into objects).

    Used on paths other than the steerable APIs (`vllm_server_compat.STEERABLE_PATHS`).
    """
    for key in body:
        if key in REQUEST_KEYS or key in RESERVED_KEYS:
            return key
    return _nested_steering(body)


def _nested_steering(value: Any) -> str | None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if key in ARGS_CONTAINERS and child is not None:
                    if not isinstance(child, dict):
                        return key
                    for inner in child:
                        if inner in REQUEST_KEYS or inner in RESERVED_KEYS:
                            return inner
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return None
