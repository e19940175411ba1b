"""A small async client for OpenAI-compatible chat completions, with retries."""

from __future__ import annotations

import asyncio
import random
from typing import Any

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RequestFailed(RuntimeError):
    """A request that failed for good (after retries, or with a status not worth retrying)."""


class ChatClient:
    """POST {base_url}/chat/completions; `extra_body` fields are merged into each request."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5, transport: Any = None):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self._http = httpx.AsyncClient(timeout=timeout, headers=headers, transport=transport)

    async def close(self) -> None:
        await self._http.aclose()

    async def chat(self, model: str, messages: list[dict[str, str]], *, max_tokens: int,
                   temperature: float = 0.0, extra_body: dict[str, Any] | None = None) -> str:
        import httpx

        body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, **(extra_body or {})}
        last = ""
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.post(f"{self.base_url}/chat/completions", json=body)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return response.json()["choices"][0]["message"]["content"] or ""
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    break
            if attempt < self.retries:
                await asyncio.sleep(self.backoff * 2 ** attempt * (1 + random.random()))
        raise RequestFailed(last)
