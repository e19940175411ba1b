"""The `routing` field of a response: the experts each token was routed to, from the engine."""

from __future__ import annotations

import logging
from typing import Any

from vllm_patches.routing_capture import fetch_routing_async

logger = logging.getLogger("steermoe.server")


async def routing_field(engine_client: Any, capture_id: str) -> dict[str, Any] | None:
    """{"moe_layers": [...], "expert_ids": [tokens][layers][k]} of one finished request.

    Row t is sequence position t (prompt, then generated tokens but the last); rows of prompt
    tokens served from the prefix cache hold -1. None if the engine kept no record.
    """
    if engine_client is None:
        return None
    try:
        records = await fetch_routing_async(engine_client, [capture_id])
    except Exception:
        logger.exception("steermoe: fetching the routing of %s failed", capture_id)
        return None
    record = records.get(capture_id)
    if record is None:
        logger.warning("steermoe: the engine has no routing record for %s", capture_id)
        return None
    return {"moe_layers": list(record.moe_layers), "expert_ids": record.expert_ids.tolist()}
