"""Routing capture: the experts each token of a request was sent to, per MoE layer.

A request asks for it with `SamplingParams(extra_args={"capture_routing": True})`. The engine
records the top-k expert ids the router chose (after steering) for every token it computes,
and the caller takes them with `fetch_routing(llm, request_ids)`:

    outputs = llm.generate(prompts, SamplingParams(extra_args={"capture_routing": True}))
    records = fetch_routing(llm, [o.request_id for o in outputs])
    records[outputs[0].request_id].expert_ids   # int array [tokens, moe_layers, top_k]

Row t is the token at position t of the sequence (prompt, then generated tokens; the last
generated token is never run through the model, so there are prompt + generated - 1 rows).
Rows of prompt tokens whose KV came from the prefix cache were not computed: they hold -1.
Records are kept in the engine until taken (at most `STEERMOE_CAPTURE_KEEP`, default 4096,
oldest dropped first).

Recording costs a copy of the top-k ids per layer, and only on steps where a request asks.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

KEEP_ENV = "STEERMOE_CAPTURE_KEEP"
DEFAULT_KEEP = 4096


def capture_keep() -> int:
    """How many routing records an engine keeps until they are fetched."""
    return int(os.environ.get(KEEP_ENV, DEFAULT_KEEP))
TAKE_METHOD = "steermoe_take_routing"


@dataclass
class RoutingRecord:
    """Routing of one request: `expert_ids[t, j, :]` = experts of position t in MoE layer j."""

    expert_ids: np.ndarray
    moe_layers: list[int]

    def to_wire(self) -> dict[str, Any]:
        """Plain types only, so any RPC serializer carries it."""
        ids = np.ascontiguousarray(self.expert_ids, dtype=np.int32)
        return {"shape": list(ids.shape), "ids": ids.tobytes(), "moe_layers": self.moe_layers}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> RoutingRecord:
        ids = np.frombuffer(data["ids"], dtype=np.int32).reshape(data["shape"]).copy()
        return cls(expert_ids=ids, moe_layers=list(data["moe_layers"]))


@dataclass
class _PendingRecord:
    segments: list[tuple[int, np.ndarray]] = field(default_factory=list)


class RoutingRecorder:
    """Worker-side buffer [moe_layers, max_tokens, top_k] and the per-request records."""

    def __init__(self, moe_layers: Sequence[int], top_k: int, max_tokens: int,
                 device: torch.device):
        self.moe_layers = list(moe_layers)
        self.top_k = top_k
        self.buffer = torch.full(
            (len(self.moe_layers), max_tokens, top_k), -1, dtype=torch.int32, device=device
        )
        self.recording = False
        self._step: list[tuple[str, int, int, int]] = []
        self._records: OrderedDict[str, _PendingRecord] = OrderedDict()
        self._keep = capture_keep()

    def plan_step(self, entries: list[tuple[str, int, int, int]]) -> None:
        """entries: (capture id, first token index in the step, token count, first position)."""
        self._step = entries
        self.recording = bool(entries)

    def collect_step(self) -> None:
        """After the forward pass: move this step's ids of capturing requests to their records."""
        if not self.recording:
            return
        total = max(start + count for _, start, count, _ in self._step)
        ids = self.buffer[:, :total].cpu().numpy().transpose(1, 0, 2)  # [tokens, layers, k]
        for capture_id, start, count, first_position in self._step:
            record = self._records.get(capture_id)
            if record is None:
                record = self._records[capture_id] = _PendingRecord()
                while len(self._records) > self._keep:
                    self._records.popitem(last=False)
            record.segments.append((first_position, ids[start : start + count].copy()))
        self._step = []
        self.recording = False

    def take(self, capture_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Remove and return the records of `capture_ids` (missing ids are left out)."""
        out: dict[str, dict[str, Any]] = {}
        for capture_id in capture_ids:
            record = self._records.pop(capture_id, None)
            if record is None or not record.segments:
                continue
            length = max(first + len(rows) for first, rows in record.segments)
            ids = np.full((length, len(self.moe_layers), self.top_k), -1, dtype=np.int32)
            for first, rows in record.segments:
                ids[first : first + len(rows)] = rows
            out[capture_id] = RoutingRecord(ids, self.moe_layers).to_wire()
        return out


def fetch_routing(engine: Any, request_ids: Sequence[str]) -> dict[str, RoutingRecord]:
    """Take the routing records of finished requests from an `LLM` (or `LLMEngine`).

    `request_ids` are the ids of the returned `RequestOutput`s. Each record is returned once.
    """
    results = engine.collective_rpc(TAKE_METHOD, args=(list(request_ids),))
    return _merge(results)


async def fetch_routing_async(engine_client: Any, request_ids: Sequence[str]) -> dict[
    str, RoutingRecord
]:
    """`fetch_routing` for an `AsyncLLM` engine client (the OpenAI server's engine)."""
    results = await engine_client.collective_rpc(TAKE_METHOD, args=(list(request_ids),))
    return _merge(results)


def _merge(results: Sequence[dict[str, dict[str, Any]]]) -> dict[str, RoutingRecord]:
    """One record per request from every worker's answer (tensor-parallel ranks hold the same
    record; data-parallel engines each hold their own requests')."""
    merged: dict[str, RoutingRecord] = {}
    for answer in results:
        for key, value in (answer or {}).items():
            merged.setdefault(key, RoutingRecord.from_wire(value))
    return merged
