"""The guard decision of a guarded request (`steering_guard`), taken from the engine."""

from __future__ import annotations

import logging
from typing import Any

from vllm_patches.guard_decisions import fetch_guard_decisions_async

logger = logging.getLogger("steermoe.server")


async def guard_decision(engine_client: Any, request_ids: tuple[str, ...]) -> dict[str, Any] | None:
    """{"guard", "fired", "score", "prompt_tokens"} (and "error" when the guard could not decide:
    `fired` is then null and the profile applied) of a finished guarded request, under any of
    the engine request ids it may have run as; None if the engine kept none (it never
    finished its prompt, or the engine is gone). Taking it removes it from the engine."""
    if engine_client is None or not request_ids:
        return None
    try:
        decisions = await fetch_guard_decisions_async(engine_client, list(request_ids))
    except Exception:
        logger.exception("steermoe: fetching the guard decision of %s failed", request_ids[0])
        return None
    for request_id in request_ids:
        decision = decisions.get(request_id)
        if isinstance(decision, dict):
            fields = ("guard", "fired", "score", "prompt_tokens", "error")
            return {key: decision[key] for key in fields if key in decision}
    return None
