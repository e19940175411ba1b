"""`routing_capture.RoutingRecorder` bounds: records, bytes, expiry, discard, fresh records.

Pure CPU tensors; the clock is injected. Rows of one token in these recorders are 2 layers x
2 experts x int32 = 16 bytes.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from vllm_patches import routing_capture as rc
from vllm_patches.routing_capture import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TTL_S,
    DISCARD_METHOD,
    KEEP_ENV,
    MAX_BYTES_ENV,
    SEGMENT_OVERHEAD,
    TAKE_METHOD,
    TTL_ENV,
    RoutingRecord,
    RoutingRecorder,
)

CPU = torch.device("cpu")
ROW = 2 * 2 * 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def recorder(clock: Clock | None = None) -> RoutingRecorder:
    return RoutingRecorder([0, 1], top_k=2, max_tokens=64, device=CPU, clock=clock or Clock())


def record_step(rec: RoutingRecorder, entries: list[tuple[str, int, int]], base: int = 0) -> None:
    """One step: entries (capture id, token count, first position), packed in order."""
    plan, start = [], 0
    for capture_id, count, first in entries:
        plan.append((capture_id, start, count, first))
        start += count
    rec.plan_step(plan)
    rec.buffer[:, :start] = base + torch.arange(start * 4, dtype=torch.int32).reshape(2, start, 2)
    rec.collect_step()


def pending_bytes(rec: RoutingRecorder) -> int:
    return sum(r.nbytes for r in rec._records.values())


# ---- configuration -----------------------------------------------------------------------------


def test_defaults(monkeypatch):
    for env in (KEEP_ENV, MAX_BYTES_ENV, TTL_ENV):
        monkeypatch.delenv(env, raising=False)
    assert (rc.capture_keep(), rc.capture_max_bytes(), rc.capture_ttl_s()) == (
        4096, 256 * 1024 * 1024, 600.0
    )
    assert DEFAULT_MAX_BYTES == 256 * 1024 * 1024 and DEFAULT_TTL_S == 600
    monkeypatch.setenv(TTL_ENV, "0.5")
    monkeypatch.setenv(MAX_BYTES_ENV, " 1024 ")
    assert rc.capture_ttl_s() == 0.5 and rc.capture_max_bytes() == 1024


@pytest.mark.parametrize(
    "env, value, message",
    [
        (KEEP_ENV, "0", "STEERMOE_CAPTURE_KEEP must be a positive integer, got '0'"),
        (KEEP_ENV, "many", "STEERMOE_CAPTURE_KEEP must be a positive integer, got 'many'"),
        (MAX_BYTES_ENV, "-1", "STEERMOE_CAPTURE_MAX_BYTES must be a positive integer, got '-1'"),
        (MAX_BYTES_ENV, "1.5", "STEERMOE_CAPTURE_MAX_BYTES must be a positive integer, got '1.5'"),
        (TTL_ENV, "0", "STEERMOE_CAPTURE_TTL_S must be a positive number, got '0'"),
        (TTL_ENV, "nan", "STEERMOE_CAPTURE_TTL_S must be a positive number, got 'nan'"),
        (TTL_ENV, "inf", "STEERMOE_CAPTURE_TTL_S must be a positive number, got 'inf'"),
        (TTL_ENV, "10m", "STEERMOE_CAPTURE_TTL_S must be a positive number, got '10m'"),
    ],
)
def test_invalid_settings_are_refused(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError) as info:
        recorder()
    assert str(info.value) == message


# ---- byte budget -------------------------------------------------------------------------------


def test_byte_budget_drops_the_least_recently_written(monkeypatch):
    one = 10 * ROW + SEGMENT_OVERHEAD  # a record of 10 rows in one segment
    monkeypatch.setenv(MAX_BYTES_ENV, str(3 * one))
    rec = recorder()
    record_step(rec, [("r1", 10, 0)])
    record_step(rec, [("r2", 10, 0)])
    assert rec.nbytes == pending_bytes(rec) == 2 * one
    record_step(rec, [("r1", 1, 10)])  # r1 written last now; its segment grows to 16 rows
    assert rec.nbytes == one + 16 * ROW + SEGMENT_OVERHEAD
    record_step(rec, [("r3", 10, 0)])  # over the budget: r2, least recently written, goes
    assert list(rec._records) == ["r1", "r3"]
    assert rec.nbytes == pending_bytes(rec) <= 3 * one
    assert sorted(rec.take(["r1", "r2", "r3"])) == ["r1", "r3"]
    assert rec.nbytes == 0


def test_a_record_alone_over_the_budget_is_never_kept(monkeypatch, caplog):
    budget = 40 * ROW + SEGMENT_OVERHEAD
    monkeypatch.setenv(MAX_BYTES_ENV, str(budget))
    rec = recorder()
    record_step(rec, [("big", 16, 0)])
    for position in range(16, 60):  # decode steps; "big" outgrows the budget alone
        record_step(rec, [("big", 1, position)])
        assert rec.nbytes == pending_bytes(rec) <= budget
    assert rec._records == {} and rec.nbytes == 0
    assert "routing record of 'big' outgrew STEERMOE_CAPTURE_MAX_BYTES" in caplog.text
    record_step(rec, [("small", 40, 0)])  # one that fits exactly is kept
    assert list(rec._records) == ["small"] and rec.nbytes == budget
    record_step(rec, [("big", 1, 40)])  # still running: no partial record appears
    assert rec.take(["big"]) == {}
    rec.forget(["big"])  # a new request under that id records again
    record_step(rec, [("big", 3, 0)])
    assert RoutingRecord.from_wire(rec.take(["big"])["big"]).expert_ids.shape == (3, 2, 2)


def test_decode_steps_grow_one_segment():
    rec = recorder()
    record_step(rec, [("r", 5, 0)], base=1000)
    expected = [rec.buffer[:, :5].numpy().transpose(1, 0, 2).copy()]
    for position in range(5, 45):
        record_step(rec, [("r", 1, position)], base=position * 100)
        expected.append(rec.buffer[:, :1].numpy().transpose(1, 0, 2).copy())
    pending = rec._records["r"]
    assert len(pending.segments) == 1
    capacity = len(pending.segments[0].rows)
    assert 45 <= capacity < 2 * 45
    assert pending.nbytes == capacity * ROW + SEGMENT_OVERHEAD == rec.nbytes
    ids = RoutingRecord.from_wire(rec.take(["r"])["r"]).expert_ids
    assert np.array_equal(ids, np.concatenate(expected))


def test_recomputed_positions_keep_the_latest_routing():
    rec = recorder()
    record_step(rec, [("r", 3, 0)], base=0)
    record_step(rec, [("r", 1, 3)], base=500)
    record_step(rec, [("r", 2, 1)], base=900)  # preempted, recomputed from position 1
    late = rec.buffer[:, :2].numpy().transpose(1, 0, 2).copy()
    ids = RoutingRecord.from_wire(rec.take(["r"])["r"]).expert_ids
    assert ids.shape == (4, 2, 2)
    assert np.array_equal(ids[1:3], late)


def test_count_bound_still_holds(monkeypatch):
    monkeypatch.setenv(KEEP_ENV, "3")
    rec = recorder()
    for i in range(6):
        record_step(rec, [(f"r{i}", 1, 0)])
    assert list(rec._records) == ["r3", "r4", "r5"]
    assert len(rec._closed) <= 3


# ---- expiry ------------------------------------------------------------------------------------


def test_records_expire_after_the_last_write(monkeypatch):
    monkeypatch.setenv(TTL_ENV, "600")
    clock = Clock()
    rec = recorder(clock)
    record_step(rec, [("old", 2, 0), ("busy", 2, 0)])
    clock.now = 400
    record_step(rec, [("busy", 1, 2)])
    clock.now = 650
    rec.collect_step()  # a step that records nothing still collects
    assert list(rec._records) == ["busy"]
    assert rec.nbytes == pending_bytes(rec)
    clock.now = 999
    assert sorted(rec.take(["busy"])) == ["busy"]
    record_step(rec, [("late", 1, 0)])
    clock.now = 1600
    assert rec.take(["late"]) == {}
    assert rec.nbytes == 0


def test_an_expired_running_request_adds_no_partial_record(monkeypatch):
    monkeypatch.setenv(TTL_ENV, "10")
    clock = Clock()
    rec = recorder(clock)
    record_step(rec, [("r", 4, 0)])
    clock.now = 11
    rec.collect_step()
    assert rec._records == {}
    for position in range(4, 30):  # writes keep the closed id alive past the TTL
        clock.now += 5
        record_step(rec, [("r", 1, position)])
    assert rec.take(["r"]) == {}
    clock.now += 100
    rec.collect_step()
    assert rec._closed == {}  # closed ids expire too


# ---- discard, take, forget ---------------------------------------------------------------------


def test_discard_drops_without_building(monkeypatch):
    rec = recorder()
    record_step(rec, [("a", 3, 0), ("b", 2, 0)])
    monkeypatch.setattr(rc._PendingRecord, "build", lambda *_: pytest.fail("built"))
    rec.discard(["a", "missing"])
    assert list(rec._records) == ["b"] and rec.nbytes == pending_bytes(rec)
    record_step(rec, [("a", 1, 3)])  # the request ran one more step after its client left
    assert list(rec._records) == ["b"]


def test_take_closes_the_id_and_forget_reopens_it():
    rec = recorder()
    record_step(rec, [("a", 2, 0)])
    assert sorted(rec.take(["a"])) == ["a"]
    record_step(rec, [("a", 1, 2)])
    assert rec.take(["a"]) == {}
    rec.forget(["a"])
    record_step(rec, [("a", 1, 0)])
    assert RoutingRecord.from_wire(rec.take(["a"])["a"]).expert_ids.shape == (1, 2, 2)


def test_forget_drops_an_old_record():
    rec = recorder()
    record_step(rec, [("a", 6, 0)])
    rec.forget(["a"])
    assert rec._records == {} and rec.nbytes == 0
    record_step(rec, [("a", 2, 0)], base=7)
    ids = RoutingRecord.from_wire(rec.take(["a"])["a"]).expert_ids
    assert ids.shape == (2, 2, 2) and ids.min() >= 7


# ---- RPC helpers -------------------------------------------------------------------------------


class FakeEngine:
    def __init__(self, answers):
        self.calls: list[tuple[str, tuple]] = []
        self.answers = answers

    def collective_rpc(self, method, args=()):
        self.calls.append((method, args))
        return self.answers


class FakeAsyncClient(FakeEngine):
    async def collective_rpc(self, method, args=()):
        return FakeEngine.collective_rpc(self, method, args)


def test_rpc_helpers_name_the_worker_methods():
    wire = RoutingRecord(np.zeros((1, 2, 2), dtype=np.int32), [0, 1]).to_wire()
    engine = FakeEngine([{"a": wire}, {"a": wire}])
    assert list(rc.fetch_routing(engine, ("a",))) == ["a"]
    rc.discard_routing(engine, ("a", "b"))
    client = FakeAsyncClient([None, None])
    assert asyncio.run(rc.fetch_routing_async(client, ["x"])) == {}
    assert asyncio.run(rc.discard_routing_async(client, iter(["x"]))) is None
    assert engine.calls == [(TAKE_METHOD, (["a"],)), (DISCARD_METHOD, (["a", "b"],))]
    assert client.calls == [(TAKE_METHOD, (["x"],)), (DISCARD_METHOD, (["x"],))]
    assert DISCARD_METHOD == "steermoe_discard_routing"


def test_a_record_that_cannot_be_built_is_left_out(monkeypatch, caplog):
    rec = recorder()
    record_step(rec, [("a", 1, 0), ("b", 1, 0)])
    original = rc._PendingRecord.build

    def build(self, *args):
        if getattr(self, "bad", False):
            raise MemoryError("too long")
        return original(self, *args)

    rec._records["a"].bad = True
    monkeypatch.setattr(rc._PendingRecord, "build", build)
    assert sorted(rec.take(["a", "b"])) == ["b"]
    assert "building the routing record of 'a' failed" in caplog.text
    assert rec._records == {} and rec.nbytes == 0
