"""Asking the workers of every engine behind an `AsyncLLM` (the API server process)."""

from __future__ import annotations

from typing import Any


async def collective_rpc_every_engine(engine_client: Any, method: str,
                                     args: tuple[Any, ...]) -> list[Any]:
    """The answers of every worker of every engine core behind an `AsyncLLM`.

    `AsyncLLM.collective_rpc` returns the workers of the first engine only under data parallel
    with internal load balancing (`DPLBAsyncMPClient.call_utility_async`, 0.26 and 0.32), while
    a request may run on any engine: ask each engine (`core_engines`, `_call_utility_async`)."""
    core = getattr(engine_client, "engine_core", None)
    engines = list(getattr(core, "core_engines", None) or ())
    call = getattr(core, "_call_utility_async", None)
    if len(engines) < 2 or call is None:
        return list(await engine_client.collective_rpc(method, args=args) or [])
    import asyncio

    per_engine = await asyncio.gather(
        *(call("collective_rpc", method, None, args, None, engine=engine) for engine in engines)
    )
    return [answer for answers in per_engine for answer in (answers or [])]
