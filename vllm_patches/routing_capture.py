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
Records are kept in the engine until taken, discarded (`discard_routing`), or dropped: oldest
first beyond `STEERMOE_CAPTURE_KEEP` records (default 4096) or `STEERMOE_CAPTURE_MAX_BYTES` in
all (default 256 MiB; a record alone over it is dropped, never truncated), and once not
written for `STEERMOE_CAPTURE_TTL_S` seconds (default 600). A request whose record was dropped
records nothing more, so no partial record is ever returned; a new request with the same
capture id starts a fresh record (`RoutingRecorder.forget`).

Recording costs a copy of the top-k ids per layer, and only on steps where a request asks.

Each worker records the MoE layers it holds and answers with them (`take_answer`); the fetch
asks every worker of every engine and merges the answers by layer into one record per request
(`_merge`): pipeline stages hold different layers, tensor-parallel ranks the same ones,
data-parallel engines different requests.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from expert_profiles.echo import clip

logger = logging.getLogger("steermoe")

KEEP_ENV = "STEERMOE_CAPTURE_KEEP"
DEFAULT_KEEP = 4096
MAX_BYTES_ENV = "STEERMOE_CAPTURE_MAX_BYTES"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
TTL_ENV = "STEERMOE_CAPTURE_TTL_S"
DEFAULT_TTL_S = 600.0
TAKE_METHOD = "steermoe_take_routing"
DISCARD_METHOD = "steermoe_discard_routing"
# Counted per segment on top of its array bytes (numpy header, list and tuple slots).
SEGMENT_OVERHEAD = 256


def _positive_env(name: str, default: float, kind: type[int] | type[float]) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    what = "integer" if kind is int else "number"
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive {what}, got {raw!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive {what}, got {raw!r}")
    return value


def capture_keep() -> int:
    """How many routing records an engine keeps until they are fetched."""
    return _positive_env(KEEP_ENV, DEFAULT_KEEP, int)


def capture_max_bytes() -> int:
    """How many bytes all routing records of an engine may hold together."""
    return _positive_env(MAX_BYTES_ENV, DEFAULT_MAX_BYTES, int)


def capture_ttl_s() -> float:
    """Seconds after its last write that an untaken routing record is dropped."""
    return float(_positive_env(TTL_ENV, DEFAULT_TTL_S, float))


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
class _Segment:
    """Consecutive positions from `first`; `rows[:length]` are written, the rest is spare."""

    first: int
    rows: np.ndarray
    length: int


class _PendingRecord:
    """The segments recorded so far for one capture id, and what they cost."""

    def __init__(self) -> None:
        self.segments: list[_Segment] = []
        self.nbytes = 0
        self.written_at = 0.0

    def write(self, first: int, rows: np.ndarray) -> None:
        last = self.segments[-1] if self.segments else None
        if last is None or last.first + last.length != first:
            self.segments.append(_Segment(first, rows.copy(), len(rows)))
            self.nbytes += rows.nbytes + SEGMENT_OVERHEAD
            return
        end = last.length + len(rows)  # decode steps extend the last segment in place
        if end > len(last.rows):
            grown = np.empty((max(end, len(last.rows) * 3 // 2, 16), *rows.shape[1:]), np.int32)
            grown[: last.length] = last.rows[: last.length]
            self.nbytes += grown.nbytes - last.rows.nbytes
            last.rows = grown
        last.rows[last.length : end] = rows
        last.length = end

    def build(self, layers: int, top_k: int) -> np.ndarray:
        length = max(s.first + s.length for s in self.segments)
        ids = np.full((length, layers, top_k), -1, dtype=np.int32)
        for s in self.segments:  # in order: a recomputed position keeps its latest routing
            ids[s.first : s.first + s.length] = s.rows[: s.length]
        return ids


class RoutingRecorder:
    """Worker-side buffer [moe_layers, max_tokens, top_k] and the per-request records.

    Records are ordered by last write. Ids whose record was dropped, taken or discarded are
    kept as closed (bounded like the records) so a still-running request adds no partial record
    under them; `forget` reopens ids that a new request owns.
    """

    def __init__(self, moe_layers: Sequence[int], top_k: int, max_tokens: int,
                 device: torch.device, clock: Callable[[], float] = time.monotonic):
        self.moe_layers = list(moe_layers)
        self.top_k = top_k
        self.buffer = torch.full(
            (len(self.moe_layers), max_tokens, top_k), -1, dtype=torch.int32, device=device
        )
        self.recording = False
        self._step: list[tuple[str, int, int, int]] = []
        self._records: OrderedDict[str, _PendingRecord] = OrderedDict()
        self._closed: OrderedDict[str, float] = OrderedDict()
        self._keep = capture_keep()
        self._max_bytes = capture_max_bytes()
        self._ttl = capture_ttl_s()
        self._clock = clock
        self.nbytes = 0

    # ---- bookkeeping -------------------------------------------------------------------

    def _close(self, capture_id: str, now: float) -> None:
        record = self._records.pop(capture_id, None)
        if record is not None:
            self.nbytes -= record.nbytes
        self._closed[capture_id] = now
        self._closed.move_to_end(capture_id)
        while len(self._closed) > self._keep:
            self._closed.popitem(last=False)

    def _expire(self, now: float) -> None:
        """Drop records and closed ids not written for the TTL (the oldest come first)."""
        deadline = now - self._ttl
        while self._records:
            capture_id, record = next(iter(self._records.items()))
            if record.written_at > deadline:
                break
            self._close(capture_id, now)
        while self._closed and next(iter(self._closed.values())) <= deadline:
            self._closed.popitem(last=False)

    def _shrink(self, now: float) -> None:
        """Drop the least recently written records until count and bytes fit."""
        while self._records and (len(self._records) > self._keep or self.nbytes > self._max_bytes):
            self._close(next(iter(self._records)), now)

    def _write(self, capture_id: str, first: int, rows: np.ndarray, now: float) -> None:
        if capture_id in self._closed:  # still running: keep it closed while it writes
            self._closed[capture_id] = now
            self._closed.move_to_end(capture_id)
            return
        record = self._records.get(capture_id)
        if record is None:
            record = self._records[capture_id] = _PendingRecord()
        before = record.nbytes
        try:
            record.write(first, rows)
        finally:
            self.nbytes += record.nbytes - before
        record.written_at = now
        self._records.move_to_end(capture_id)
        if record.nbytes > self._max_bytes:
            logger.warning("steermoe: the routing record of '%s' outgrew %s=%d bytes; dropped",
                           clip(capture_id), MAX_BYTES_ENV, self._max_bytes)
            self._close(capture_id, now)
        self._shrink(now)

    # ---- steps -------------------------------------------------------------------------

    def plan_step(self, entries: list[tuple[str, int, int, int]]) -> None:
        """entries: (capture id, first token index in the step, token count, first position)."""
        self._step = entries
        self.recording = bool(entries)

    def collect_step(self) -> None:
        """After the forward pass: move this step's ids of capturing requests to their records;
        drop expired records."""
        if not self.recording:
            if self._records or self._closed:
                self._expire(self._clock())
            return
        now = self._clock()
        self._expire(now)
        step, self._step, self.recording = self._step, [], False
        total = max(start + count for _, start, count, _ in step)
        ids = self.buffer[:, :total].cpu().numpy().transpose(1, 0, 2)  # [tokens, layers, k]
        for capture_id, start, count, first_position in step:
            try:
                self._write(capture_id, first_position, ids[start : start + count], now)
            except Exception:  # one request's record must not fail the step
                logger.exception("steermoe: recording the routing of '%s' failed",
                                 clip(capture_id))
                self._close(capture_id, now)

    # ---- requests ----------------------------------------------------------------------

    def forget(self, capture_ids: Iterable[str]) -> None:
        """New requests own these ids: drop old records and reopen them, to start fresh."""
        for capture_id in capture_ids:
            record = self._records.pop(capture_id, None)
            if record is not None:
                self.nbytes -= record.nbytes
            self._closed.pop(capture_id, None)

    def discard(self, capture_ids: Sequence[str]) -> None:
        """Drop the records of `capture_ids` without building them (failed or abandoned)."""
        now = self._clock()
        for capture_id in capture_ids:
            self._close(capture_id, now)
        self._expire(now)

    def take(self, capture_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Remove and return the records of `capture_ids` (missing ids, and any record that
        cannot be built, are left out)."""
        now = self._clock()
        self._expire(now)
        out: dict[str, dict[str, Any]] = {}
        for capture_id in capture_ids:
            record = self._records.get(capture_id)
            self._close(capture_id, now)
            if record is None or not record.segments:
                continue
            try:
                ids = record.build(len(self.moe_layers), self.top_k)
                out[capture_id] = RoutingRecord(ids, self.moe_layers).to_wire()
            except Exception:
                logger.exception("steermoe: building the routing record of '%s' failed",
                                 clip(capture_id))
        return out


def take_answer(recorder: RoutingRecorder | None,
                capture_ids: Sequence[str]) -> dict[str, Any]:
    """One worker's answer to `fetch_routing`: the MoE layers it holds and its records.

    A worker without MoE layers (a pipeline stage of dense layers only) answers with none."""
    if recorder is None:
        return {"held_layers": [], "records": {}}
    return {"held_layers": list(recorder.moe_layers), "records": recorder.take(capture_ids)}


def fetch_routing(engine: Any, request_ids: Sequence[str]) -> dict[str, RoutingRecord]:
    """Take the routing records of finished requests from an `LLM` (or `LLMEngine`).

    `request_ids` are the ids of the returned `RequestOutput`s. Each record is returned once.
    """
    results = engine.collective_rpc(TAKE_METHOD, args=(list(request_ids),))
    return _merge(results)


async def fetch_routing_async(engine_client: Any, request_ids: Sequence[str]) -> dict[
    str, RoutingRecord
]:
    """`fetch_routing` for an `AsyncLLM` engine client (the OpenAI server's engine); asks every
    data-parallel engine, since a request may have run on any."""
    from vllm_patches.vllm_compat.engine_rpc import collective_rpc_every_engine

    results = await collective_rpc_every_engine(engine_client, TAKE_METHOD,
                                                (list(request_ids),))
    return _merge(results)


def discard_routing(engine: Any, request_ids: Sequence[str]) -> None:
    """Drop the routing records of requests whose routing will not be fetched."""
    engine.collective_rpc(DISCARD_METHOD, args=(list(request_ids),))


async def discard_routing_async(engine_client: Any, request_ids: Sequence[str]) -> None:
    """`discard_routing` for an `AsyncLLM` engine client (a failed or abandoned request)."""
    from vllm_patches.vllm_compat.engine_rpc import collective_rpc_every_engine

    await collective_rpc_every_engine(engine_client, DISCARD_METHOD, (list(request_ids),))


def _answer_parts(answer: Any) -> tuple[list[int], dict[str, Any]]:
    """(held layers, records) of one worker's answer: `take_answer`'s form, or a bare mapping
    of capture id to record (held layers then unknown: those of its records)."""
    if not answer:
        return [], {}
    if isinstance(answer.get("held_layers"), list) and isinstance(answer.get("records"), dict):
        return [int(layer) for layer in answer["held_layers"]], answer["records"]
    return [], answer


def _merge(results: Sequence[Any]) -> dict[str, RoutingRecord]:
    """One record per request from every worker's answer, merged by MoE layer.

    Pipeline stages each hold their own layers' columns of a request (the same positions);
    tensor-parallel ranks hold the same columns (the first copy is kept; a copy that differs is
    logged); data-parallel engines each hold their own requests'. A request is returned only
    with every MoE layer any worker holds: a stage that dropped its part (limits, TTL) drops
    the request, so no partial record is ever returned.
    """
    expected: set[int] = set()
    columns: dict[str, dict[int, np.ndarray]] = {}
    for answer in results:
        held, records = _answer_parts(answer)
        expected.update(held)
        for key, value in records.items():
            record = RoutingRecord.from_wire(value)
            parts = columns.setdefault(key, {})
            for j, layer in enumerate(record.moe_layers):
                layer = int(layer)
                column = record.expert_ids[:, j]
                expected.add(layer)
                if layer not in parts:
                    parts[layer] = column
                elif not np.array_equal(parts[layer], column):
                    logger.warning("steermoe: ranks disagree on the routing of '%s' in layer %d; "
                                   "the first rank's is returned", clip(key), layer)
    merged: dict[str, RoutingRecord] = {}
    for key, parts in columns.items():
        layers = sorted(parts)
        lengths = {parts[layer].shape[0] for layer in layers}
        if set(layers) != expected or len(lengths) != 1:
            logger.warning("steermoe: the routing record of '%s' is incomplete on some rank "
                           "(layers %s of %s); dropped", clip(key), layers, sorted(expected))
            continue
        ids = np.stack([parts[layer] for layer in layers], axis=1)
        merged[key] = RoutingRecord(expert_ids=np.ascontiguousarray(ids, dtype=np.int32),
                                    moe_layers=layers)
    return merged
