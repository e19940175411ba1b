"""`EngineSteering` per-request lifecycle and robustness; `steering_table.applicable_problem`.

Per-request state lives until `forget` (vLLM's finished and newly scheduled ids), and nothing
a request carries makes `prepare_step` / `finish_step` raise: a request whose steering or
capture cannot be used runs without it and the other requests of the step keep theirs.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from expert_profiles.request_steering import RESOLVED_KEY, ResolvedSteering
from tests.vllm_patches.test_steering_table import (
    MOE_LAYERS,
    NUM_EXPERTS,
    TOP_K,
    Requests,
    X,
    Y,
    Z,
    fill_buffer,
    make_engine,
    slot_of,
    steer,
    step,
)
from vllm_patches.routing_capture import RoutingRecord
from vllm_patches.steering_table import applicable_problem


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ---- lifecycle: forget -------------------------------------------------------------------------


def test_reused_request_id_gets_the_new_steering():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X)
    step(engine, reqs, [("a", 2)])
    engine.finish_step()
    assert engine.table.token_profiles[:2].tolist() == [slot_of(engine, X)] * 2
    engine.forget({"a"})  # finished
    reqs.add("a", Y)  # the same id, chosen again by a client
    engine.forget(["a"])  # newly scheduled
    step(engine, reqs, [("a", 2)])
    assert engine.table.token_profiles[:2].tolist() == [slot_of(engine, Y)] * 2
    reqs.add("a")  # and again, unsteered
    engine.forget(["a"])
    step(engine, reqs, [("a", 2)])
    assert engine.table.token_profiles.eq(0).all()
    assert not engine.table.steering_active


def test_without_forget_a_request_keeps_its_first_lookup():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X)
    step(engine, reqs, [("a", 1)])
    reqs.add("a", Y)
    step(engine, reqs, [("a", 1)])
    assert engine.table.token_profiles[0].item() == slot_of(engine, X)
    assert reqs.lookups == ["a", "a"]  # steering and capture, once each


def test_finished_ids_are_dropped_and_their_records_stay_until_taken():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X, capture=True)
    reqs.add("b", Y, capture=True, capture_id="cap-b")
    reqs.add("c")
    step(engine, reqs, [("a", 2), ("b", 1), ("c", 1)])
    fill_buffer(engine.recorder, 4, base=0)
    engine.finish_step()
    engine.forget(iter(["a", "b", "c", "never-seen"]))
    assert engine.table._steering_of_request == {}
    assert engine._capture_ids == {}
    assert engine._capture_owner == {}
    assert sorted(engine.recorder.take(["a", "cap-b"])) == ["a", "cap-b"]
    assert engine.recorder._records == {}


def test_reused_capture_id_starts_a_fresh_record():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", capture=True)
    step(engine, reqs, [("a", 5)], first_positions=[0])
    fill_buffer(engine.recorder, 5, base=10_000)
    engine.finish_step()
    engine.forget(["a"])  # finished; its record is never taken
    reqs.add("a", capture=True)
    engine.forget(["a"])  # a new request under the same id
    step(engine, reqs, [("a", 2)], first_positions=[0])
    new = fill_buffer(engine.recorder, 2, base=20_000)
    engine.finish_step()
    record = RoutingRecord.from_wire(engine.recorder.take(["a"])["a"])
    assert record.expert_ids.shape == (2, len(MOE_LAYERS), TOP_K)
    assert np.array_equal(record.expert_ids, new)


def test_a_new_request_never_extends_a_record_even_without_forget():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", capture=True, capture_id="shared")
    step(engine, reqs, [("a", 3)])
    engine.finish_step()
    engine.forget(["a"])
    reqs.add("b", capture=True, capture_id="shared")  # a different request, same capture id
    step(engine, reqs, [("b", 1)], first_positions=[0])
    engine.finish_step()
    assert RoutingRecord.from_wire(engine.recorder.take(["shared"])["shared"]).expert_ids.shape[
        0
    ] == 1


def test_two_running_requests_never_share_a_record(caplog):
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", capture=True, capture_id="shared")
    reqs.add("b", capture=True, capture_id="shared")
    step(engine, reqs, [("a", 2), ("b", 3)])
    assert engine.recorder._step == [("shared", 0, 2, 0)]
    assert "running request 'a' already records under capture id 'shared'" in caplog.text
    engine.finish_step()
    engine.forget(["a"])
    step(engine, reqs, [("b", 1)], first_positions=[3])
    assert engine.recorder._step == []  # decided on b's first step


def test_slot_of_a_scheduled_request_is_never_rewritten():
    engine = make_engine(max_slots=3)  # two usable slots
    reqs = Requests()
    reqs.add("a", X)
    reqs.add("b", Y)
    step(engine, reqs, [("a", 1), ("b", 1)])
    sx, sy = slot_of(engine, X), slot_of(engine, Y)
    engine.forget(["a", "b"])
    # Both new; "c" comes first and needs a slot: "d" (listed later) uses X's, so Z takes Y's.
    reqs.add("c", Z)
    reqs.add("d", X)
    masks_x = engine.table.masks[:, sx].clone()
    step(engine, reqs, [("c", 1), ("d", 1)])
    assert slot_of(engine, X) == sx and slot_of(engine, Z) == sy
    assert torch.equal(engine.table.masks[:, sx], masks_x)
    assert engine.table.token_profiles[:2].tolist() == [sy, sx]


def test_slots_of_finished_requests_are_reused():
    engine = make_engine(max_slots=3)
    reqs = Requests()
    reqs.add("a", X)
    reqs.add("b", Y)
    step(engine, reqs, [("a", 1), ("b", 1)])
    engine.forget(["a", "b"])
    reqs.add("c", Z)
    reqs.add("e", Y)
    step(engine, reqs, [("c", 1), ("e", 1)])
    assert set(engine.table._digest_of_slot.values()) == {Y.digest, Z.digest}
    assert engine.table.token_profiles[:2].tolist() == [slot_of(engine, Z), slot_of(engine, Y)]


# ---- nothing a request carries raises ---------------------------------------------------------


def resolved(**change) -> dict:
    data = steer("m" * 16, activate={1: [3]}, deactivate={4: [0]}).to_extra_args()
    data.update(change)
    return data


MALFORMED = {
    "not a dict": "garbage",
    "missing key": {"label": "x", "digest": "d" * 16, "eps": 0.1, "activate": {}},
    "layer not a number": resolved(activate={"one": [1]}),
    "experts not a list": resolved(activate={"1": 5}),
    "experts a string": resolved(activate={"1": "ab"}),
    "experts floats": resolved(activate={"1": [1.0]}),
    "experts bools": resolved(activate={"1": [True]}),
    "dense layer": resolved(deactivate={"3": [1]}),
    "negative layer": resolved(activate={"-1": [1]}),
    "expert out of range": resolved(activate={"1": [NUM_EXPERTS]}),
    "negative expert": resolved(deactivate={"4": [-1]}),
    "too many activated": resolved(activate={"1": [0, 1, 2]}),
    "too many deactivated": resolved(deactivate={"4": list(range(NUM_EXPERTS - TOP_K + 1))}),
    "both": resolved(activate={"1": [3]}, deactivate={"1": [3]}),
    "eps nan": resolved(eps=math.nan),
    "eps inf": resolved(eps=math.inf),
    "eps zero": resolved(eps=0),
    "eps negative": resolved(eps=-0.1),
    "eps too large": resolved(eps=100.5),
    "eps text": resolved(eps="big"),
    "empty digest": resolved(digest=""),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_resolved_steering_runs_unsteered(data, caplog):
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X)
    reqs.extra["bad"] = {RESOLVED_KEY: data, "capture_routing": True}
    reqs.add("c", Y)
    step(engine, reqs, [("a", 2), ("bad", 3), ("c", 1)])
    sx, sy = slot_of(engine, X), slot_of(engine, Y)
    assert engine.table.token_profiles[:6].tolist() == [sx, sx, 0, 0, 0, sy]
    assert set(engine.table._digest_of_slot.values()) == {X.digest, Y.digest}
    assert engine.recorder._step == [("bad", 2, 3, 0)]  # its capture is unaffected
    engine.finish_step()
    logged = errors(caplog)
    assert len(logged) == 1 and "'bad' runs unsteered" in logged[0]
    step(engine, reqs, [("bad", 1), ("a", 1)], first_positions=[3, 2])
    assert engine.table.token_profiles[:2].tolist() == [0, sx]
    assert len(errors(caplog)) == 1  # once per request id


def test_lookups_that_raise_leave_the_other_requests_steered(caplog):
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X, capture=True)
    reqs.add("c", Y)
    extra = {"gone": KeyError("gone"), "odd": None}

    def extra_args_of(req_id: str):
        if req_id == "gone":
            raise extra["gone"]
        if req_id == "odd":
            return ["not", "a", "dict"]
        return reqs(req_id)

    engine.prepare_step(["a", "gone", "odd", "c"], np.array([1, 1, 1, 1]), np.zeros(4, int),
                        extra_args_of)
    sx, sy = slot_of(engine, X), slot_of(engine, Y)
    assert engine.table.token_profiles[:4].tolist() == [sx, 0, 0, sy]
    assert engine.recorder._step == [("a", 0, 1, 0)]
    assert any("'gone' runs unsteered" in m for m in errors(caplog))
    assert any("'gone' records no routing" in m for m in errors(caplog))
    engine.finish_step()


def test_a_failing_record_does_not_fail_the_step(monkeypatch, caplog):
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", capture=True)
    reqs.add("b", capture=True)
    step(engine, reqs, [("a", 1), ("b", 1)])
    original = engine.recorder._write

    def write(capture_id, *args):
        if capture_id == "a":
            raise MemoryError("no room")
        return original(capture_id, *args)

    monkeypatch.setattr(engine.recorder, "_write", write)
    engine.finish_step()
    assert engine.flags.recording is False
    assert sorted(engine.recorder.take(["a", "b"])) == ["b"]
    assert "recording the routing of 'a' failed" in caplog.text


# ---- applicable_problem ------------------------------------------------------------------------


def problem(steering) -> str | None:
    return applicable_problem(steering, MOE_LAYERS, NUM_EXPERTS, TOP_K)


def test_applicable_problem_accepts_valid_steering():
    for s in (X, Y, Z, steer("e" * 16)):
        assert problem(s) is None
    edge = steer("g" * 16, activate={1: [0, 7]}, deactivate={2: list(range(NUM_EXPERTS - TOP_K))},
                 eps=100)
    assert problem(edge) is None
    assert applicable_problem(X, (4, 1), NUM_EXPERTS, TOP_K) is None  # any order, any sequence


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"activate": {3: [1]}}, "activate: layer 3 is not a MoE layer of this engine"),
        ({"deactivate": {"1": [1]}}, "deactivate: layer '1' is not a MoE layer of this engine"),
        ({"activate": {1: [8]}}, "activate: layer 1: experts [8] are not in [0, 8)"),
        ({"deactivate": {2: [-1]}}, "deactivate: layer 2: experts [-1] are not in [0, 8)"),
        ({"activate": {1: [1.5]}}, "activate: layer 1: experts must be a list of integers"),
        ({"activate": {1: [[1]]}}, "activate: layer 1: experts must be a list of integers"),
        ({"activate": {1: 3}}, "activate: layer 1: experts must be a list of integers"),
        ({"activate": [1]}, "activate is not a mapping of layer to experts"),
        ({"activate": {2: [0, 1, 2]}},
         "activate: layer 2 activates 3 experts, more than top-k (2)"),
        ({"deactivate": {4: [0, 1, 2, 3, 4, 5, 6]}},
         "deactivate: layer 4 leaves 1 of 8 experts, fewer than top-k (2)"),
        ({"activate": {1: [2]}, "deactivate": {1: [2, 3]}},
         "layer 1: experts [2] are both activated and deactivated"),
        ({"eps": 0.0}, "eps must be a finite number in (0, 100], got 0.0"),
        ({"eps": math.nan}, "eps must be a finite number in (0, 100], got nan"),
        ({"eps": True}, "eps must be a finite number in (0, 100], got True"),
        ({"eps": None}, "eps must be a finite number in (0, 100], got None"),
    ],
)
def test_applicable_problem_names_the_problem(kwargs, expected):
    fields = {"label": "x", "digest": "d" * 16, "activate": {}, "deactivate": {}, "eps": 0.01}
    fields.update(kwargs)
    assert problem(ResolvedSteering(**fields)) == expected


def test_applicable_problem_never_raises_on_odd_objects():
    assert problem(None) == "not resolved steering: NoneType"
    assert problem({"activate": {}}) == "not resolved steering: dict"
    odd = ResolvedSteering("x", "d", {1: [{}]}, {}, 0.1)  # unhashable expert
    assert problem(odd) == "activate: layer 1: experts must be a list of integers"
    assert problem(ResolvedSteering("x", 7, {}, {}, 0.1)) == "digest must be a non-empty string"
    assert problem(ResolvedSteering("x", "d", {np.int64(1): [np.int32(3)]}, {}, 0.1)) is None
    huge = 10**5000  # too large for repr or float()
    assert problem(ResolvedSteering("x", "d", {}, {}, huge)) == (
        "eps must be a finite number in (0, 100], got <int>"
    )
    assert problem(ResolvedSteering("x", "d", {huge: [1]}, {}, 0.1)) == (
        "activate: layer <int> is not a MoE layer of this engine"
    )
    assert problem(ResolvedSteering("x", "d", {}, {1: [huge]}, 0.1)) == (
        "deactivate: layer 1: experts <list> are not in [0, 8)"
    )
    assert problem(ResolvedSteering("x", "d", {1: [2**70]}, {}, 0.1)) == (
        f"activate: layer 1: experts [{2**70}] are not in [0, 8)"
    )
