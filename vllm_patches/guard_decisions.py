"""Guard decisions: what each guarded request's guard decided, kept in the workers until fetched.

A guarded request (`expert_profiles.guard_spec`) is scored in the worker after its prompt; the
decision (`{"guard", "fired", "score", "prompt_tokens"}`, or with "error" and `fired` None when
the guard could not decide and its profile applied) is kept under the caller's request id (the
id the front end saw, `request_steering.GUARD_ID_KEY`) until `fetch_guard_decisions` takes it
(or it is dropped, oldest first, beyond `STEERMOE_CAPTURE_KEEP` decisions). Tensor-parallel
ranks decide alike; the first answer wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm_patches.routing_capture import capture_keep

GUARD_METHOD = "steermoe_take_guard_decisions"


class GuardDecisions:
    """Decisions of finished prompts, kept until taken (`take`) or dropped, oldest first,
    beyond `STEERMOE_CAPTURE_KEEP` entries."""

    def __init__(self) -> None:
        self._kept: dict[str, dict[str, Any]] = {}
        self._keep = capture_keep()

    def put(self, req_id: str, decision: dict[str, Any]) -> None:
        self._kept.pop(req_id, None)
        self._kept[req_id] = decision
        while len(self._kept) > self._keep:
            del self._kept[next(iter(self._kept))]

    def take(self, req_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {req_id: self._kept.pop(req_id) for req_id in req_ids if req_id in self._kept}


def _merge(answers: Sequence[Any]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for answer in answers:
        if isinstance(answer, dict):
            for req_id, decision in answer.items():
                merged.setdefault(req_id, decision)
    return merged


def fetch_guard_decisions(engine: Any, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Take the guard decisions of requests from an `LLM` (or `LLMEngine`); each once."""
    return _merge(engine.collective_rpc(GUARD_METHOD, args=(list(request_ids),)))


async def fetch_guard_decisions_async(engine_client: Any, request_ids: Sequence[str]) -> dict[
    str, dict[str, Any]
]:
    """`fetch_guard_decisions` for an `AsyncLLM` engine client (every data-parallel engine)."""
    from vllm_patches.vllm_compat.engine_rpc import collective_rpc_every_engine

    return _merge(await collective_rpc_every_engine(engine_client, GUARD_METHOD,
                                                    (list(request_ids),)))
