"""`steering_table.SteeringTable`, `engine_steering.EngineSteering` and `routing_capture`.

Everything runs on CPU tensors with plain data, the way `vllm_compat` drives it around each
forward pass; the MoE layers' work (the routing edit, the top-k copy) is done by hand or
through the layer hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expert_profiles.request_steering import CAPTURE_ID_KEY, RESOLVED_KEY, ResolvedSteering
from vllm_patches import steering_math
from vllm_patches.engine_steering import (
    EngineSteering,
    MoELayerInfo,
    capture_id_of,
    steering_of,
)
from vllm_patches.routing_capture import KEEP_ENV, RoutingRecord, RoutingRecorder
from vllm_patches.steering_table import SteeringTable, StepPlan
from vllm_patches.vllm_compat.layer_lookup import forward_context_of

CPU = torch.device("cpu")
MOE_LAYERS = [1, 2, 4]  # decoder layers 0 and 3 are dense
NUM_EXPERTS = 8
TOP_K = 2
MAX_TOKENS = 32


def steer(digest: str, activate=None, deactivate=None, eps: float = 0.01) -> ResolvedSteering:
    return ResolvedSteering(
        label=f"inline:{digest}",
        digest=digest,
        activate=activate or {},
        deactivate=deactivate or {},
        eps=eps,
    )


X = steer("x" * 16, activate={1: [3]}, deactivate={4: [0, 7]}, eps=0.05)
Y = steer("y" * 16, activate={2: [5, 6]}, eps=0.2)
Z = steer("z" * 16, deactivate={1: [1]}, eps=0.01)


def make_engine(max_slots: int = 4, max_tokens: int = MAX_TOKENS) -> EngineSteering:
    layers = [MoELayerInfo(layer, NUM_EXPERTS, TOP_K, "softmax") for layer in MOE_LAYERS]
    return EngineSteering(layers, max_tokens=max_tokens, max_slots=max_slots, device=CPU)


class Requests:
    """The extra_args of the requests an engine knows, by request id."""

    def __init__(self):
        self.extra: dict[str, dict | None] = {}
        self.lookups: list[str] = []

    def add(
        self,
        req_id: str,
        steering: ResolvedSteering | None = None,
        capture=False,
        capture_id: str | None = None,
    ) -> str:
        extra: dict = {}
        if steering is not None:
            extra[RESOLVED_KEY] = steering.to_extra_args()
        if capture:
            extra["capture_routing"] = True
            if capture_id is not None:
                extra[CAPTURE_ID_KEY] = capture_id
        self.extra[req_id] = extra or None
        return req_id

    def __call__(self, req_id: str):
        self.lookups.append(req_id)
        return self.extra[req_id]


def step(
    engine: EngineSteering,
    requests: Requests,
    schedule: list[tuple[str, int]],
    first_positions: list[int] | None = None,
) -> None:
    req_ids = [r for r, _ in schedule]
    counts = np.array([n for _, n in schedule], dtype=np.int32)
    firsts = np.array(
        first_positions if first_positions is not None else [0] * len(schedule), dtype=np.int64
    )
    engine.prepare_step(req_ids, counts, firsts, requests)


def slot_of(engine: EngineSteering, steering: ResolvedSteering) -> int:
    return engine.table._slot_of_digest[steering.digest]


# ---- token_profiles ----------------------------------------------------------------------------


def test_token_profiles_follow_the_requests_slots():
    engine = make_engine()
    reqs = Requests()
    for req_id, s in (("a", X), ("b", None), ("c", Y), ("d", X)):
        reqs.add(req_id, s)
    step(engine, reqs, [("a", 3), ("b", 2), ("c", 4), ("d", 1)])
    sx, sy = slot_of(engine, X), slot_of(engine, Y)
    assert sx != sy and 0 not in (sx, sy)
    expected = np.zeros(MAX_TOKENS, dtype=np.int32)
    expected[:10] = np.repeat(np.array([sx, 0, sy, sx], dtype=np.int32), [3, 2, 4, 1])
    assert np.array_equal(engine.table.token_profiles.numpy(), expected)
    assert engine.table.steering_active
    assert engine.flags.steering_active is True
    assert engine.flags.recording is False


def test_requests_with_no_tokens_this_step():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X)
    reqs.add("b", Y)
    step(engine, reqs, [("a", 0), ("b", 3)])
    expected = np.zeros(MAX_TOKENS, dtype=np.int32)
    expected[:3] = slot_of(engine, Y)
    assert np.array_equal(engine.table.token_profiles.numpy(), expected)


def test_padding_is_zero_after_a_larger_step():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X)
    reqs.add("b", Y)
    reqs.add("plain")
    sx = None
    step(engine, reqs, [("a", 10), ("b", 6)])
    sx, sy = slot_of(engine, X), slot_of(engine, Y)
    profiles = engine.table.token_profiles
    assert profiles[:16].tolist() == [sx] * 10 + [sy] * 6
    assert profiles[16:].eq(0).all()

    # Smaller steered step: the old tail (tokens 4..15) must read 0 now.
    step(engine, reqs, [("b", 1), ("plain", 2), ("a", 1)])
    assert profiles[:4].tolist() == [sy, 0, 0, sx]
    assert profiles[4:].eq(0).all()

    # Larger again, then an unsteered step: everything back to 0.
    step(engine, reqs, [("a", 20)])
    assert profiles[:20].eq(sx).all() and profiles[20:].eq(0).all()
    step(engine, reqs, [("plain", 5)])
    assert profiles.eq(0).all()
    assert not engine.table.steering_active
    assert engine.flags.steering_active is False

    # Then a small steered step after the unsteered one.
    step(engine, reqs, [("plain", 3), ("b", 2)])
    assert profiles.tolist() == [0, 0, 0, sy, sy] + [0] * (MAX_TOKENS - 5)


def test_unsteered_steps_leave_everything_zero():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a")
    reqs.add("b")
    engine.flags.steering_active = True  # stale value from an earlier step
    step(engine, reqs, [("a", 7), ("b", 9)])
    table = engine.table
    assert table.token_profiles.eq(0).all()
    assert table.masks.eq(0).all()
    assert table.eps.eq(0).all()
    assert not table.steering_active
    assert engine.flags.steering_active is False
    assert engine.flags.recording is False


def test_same_digest_shares_one_slot():
    engine = make_engine(max_slots=3)
    reqs = Requests()
    other = steer(X.digest, activate=X.activate, deactivate=X.deactivate, eps=X.eps)
    reqs.add("a", X)
    reqs.add("b", other)
    reqs.add("c", X)
    step(engine, reqs, [("a", 2), ("b", 2)])
    step(engine, reqs, [("c", 1), ("a", 1)])
    sx = slot_of(engine, X)
    assert engine.table._digest_of_slot == {sx: X.digest}
    assert engine.table.token_profiles[:2].tolist() == [sx, sx]


def test_mask_rows_and_eps_per_slot():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X)
    reqs.add("b", Y)
    step(engine, reqs, [("a", 1), ("b", 1)])
    table = engine.table
    sx, sy = slot_of(engine, X), slot_of(engine, Y)

    expected = torch.zeros(len(MOE_LAYERS), 4, NUM_EXPERTS, dtype=torch.int8)
    expected[MOE_LAYERS.index(1), sx, 3] = 1
    expected[MOE_LAYERS.index(4), sx, [0, 7]] = -1
    expected[MOE_LAYERS.index(2), sy, [5, 6]] = 1
    assert torch.equal(table.masks, expected)
    assert table.masks.dtype == torch.int8
    assert torch.equal(table.layer_masks(4), expected[2])
    assert table.layer_masks(4).data_ptr() == table.masks[2].data_ptr()  # a view, not a copy
    assert table.eps[0].item() == 0
    assert table.eps[sx].item() == pytest.approx(0.05)
    assert table.eps[sy].item() == pytest.approx(0.2)
    assert table.eps.dtype == torch.float32


def test_slots_are_reused_once_no_scheduled_request_uses_them():
    engine = make_engine(max_slots=3)  # two usable slots
    table = engine.table
    reqs = Requests()
    reqs.add("a", X)
    reqs.add("b", Y)
    reqs.add("c", Z)
    step(engine, reqs, [("a", 1)])
    step(engine, reqs, [("b", 1)])
    sx, sy = slot_of(engine, X), slot_of(engine, Y)
    # "a" is scheduled again, so X's slot must survive; Y's slot (unused now) takes Z.
    step(engine, reqs, [("a", 1), ("c", 2)])
    sz = slot_of(engine, Z)
    assert sz == sy and slot_of(engine, X) == sx
    assert Y.digest not in table._slot_of_digest
    assert table.token_profiles[:3].tolist() == [sx, sz, sz]
    # Z's mask replaced Y's completely.
    assert table.masks[:, sz].tolist() == [
        [0, -1, 0, 0, 0, 0, 0, 0],
        [0] * 8,
        [0] * 8,
    ]
    assert table.eps[sz].item() == pytest.approx(0.01)
    # Y comes back while only "c" runs: X's slot is free to take.
    step(engine, reqs, [("b", 1), ("c", 1)])
    assert slot_of(engine, Y) == sx
    assert table.token_profiles[:2].tolist() == [sx, sz]


def test_more_distinct_steerings_than_slots_in_one_step():
    engine = make_engine(max_slots=3)
    reqs = Requests()
    reqs.add("a", X)
    reqs.add("b", Y)
    reqs.add("c", Z)
    with pytest.raises(RuntimeError) as info:
        step(engine, reqs, [("a", 1), ("b", 1), ("c", 1)])
    assert str(info.value) == "steermoe: all 2 steering slots are in use in one step"


def test_steering_a_layer_without_moe_block_runs_unsteered(caplog):
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", steer("dense" * 3, activate={3: [1]}))
    reqs.add("b", X)
    step(engine, reqs, [("a", 1), ("b", 2)])
    sx = slot_of(engine, X)
    assert engine.table._digest_of_slot == {sx: X.digest}
    assert engine.table.token_profiles[:3].tolist() == [0, sx, sx]
    assert "request 'a' runs unsteered" in caplog.text
    assert "activate: layer 3 is not a MoE layer of this engine" in caplog.text
    with pytest.raises(ValueError, match="layer 3 is not a MoE layer"):
        engine.table.slot_for(steer("dense" * 3, activate={3: [1]}), [])


def test_layer_hook_for_a_dense_layer_raises():
    engine = make_engine()
    with pytest.raises(KeyError):
        engine.layer_hook(3)
    with pytest.raises(KeyError):
        engine.table.layer_masks(0)


def test_steering_is_looked_up_once_per_request():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X)
    for _ in range(3):
        step(engine, reqs, [("a", 1)])
    # Once for steering, once for capture.
    assert reqs.lookups == ["a", "a"]


def test_forgotten_requests_are_dropped():
    engine = make_engine()
    reqs = Requests()
    for i in range(200):
        req_id = reqs.add(f"r{i}", X if i % 2 else None, capture=i % 3 == 0)
        engine.prepare_step([req_id], np.array([1]), np.array([0]), reqs)
        engine.finish_step()
        engine.forget({req_id})
    assert engine.table._steering_of_request == {}
    assert engine._capture_ids == {} and engine._capture_owner == {}


def test_describe():
    layers = [
        MoELayerInfo(1, 8, 2, "softmax"),
        MoELayerInfo(2, 8, 2, "grouped_topk"),
        MoELayerInfo(4, 8, 2, "softmax"),
    ]
    engine = EngineSteering(layers, 16, 4, CPU)
    assert engine.describe() == {
        "moe_layers": [1, 2, 4],
        "num_experts": 8,
        "top_k": 2,
        "routers": ["grouped_topk", "softmax"],
    }


# ---- steering_of / capture_id_of ---------------------------------------------------------------


def test_steering_of():
    assert steering_of(None) is None
    assert steering_of({}) is None
    assert steering_of({"capture_routing": True}) is None
    assert steering_of({RESOLVED_KEY: X.to_extra_args()}) == X


@pytest.mark.parametrize("key", ["steering_profile", "steering"])
def test_unresolved_steering_reaching_the_engine_is_not_steered(key, caplog):
    assert steering_of({key: "anything"}, "req-1") is None
    assert "request 'req-1' runs unsteered" in caplog.text
    assert "without being resolved" in caplog.text


def test_capture_id_of():
    assert capture_id_of("r", None) is None
    assert capture_id_of("r", {"capture_routing": False}) is None
    assert capture_id_of("r", {"capture_routing": True}) == "r"
    assert capture_id_of("r", {"capture_routing": True, CAPTURE_ID_KEY: "c"}) == "c"


# ---- the layer hooks, through the ops -----------------------------------------------------------


def test_layer_hook_steers_each_token_by_its_request():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X)
    reqs.add("b")
    reqs.add("c", Y)
    # First a wide step, so a stale tail exists, then the step under test.
    step(engine, reqs, [("a", 12)])
    step(engine, reqs, [("a", 2), ("b", 1), ("c", 2)])
    table = engine.table
    g = torch.Generator().manual_seed(0)
    for layer in MOE_LAYERS:
        hook = engine.layer_hook(layer)
        logits = torch.randn(5, NUM_EXPERTS, generator=g)
        before = logits.clone()
        with forward_context_of(hook):
            out = hook.steer(logits)
        assert out is logits  # in place
        expected = steering_math.steer_router_logits(
            before, table.token_profiles, table.layer_masks(layer), table.eps
        )
        assert torch.equal(logits, expected)
        assert torch.equal(logits[2], before[2])  # "b" is not steered
    # decoder layer 1: X activates expert 3 for tokens 0-1
    hook = engine.layer_hook(1)
    logits = torch.randn(5, NUM_EXPERTS, generator=g)
    with forward_context_of(hook):
        hook.steer(logits)
    assert (logits[:2, 3:4] > torch.cat([logits[:2, :3], logits[:2, 4:]], dim=1)).all()


def test_layer_hook_does_nothing_on_unsteered_steps():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X)
    reqs.add("b")
    step(engine, reqs, [("a", 3)])
    step(engine, reqs, [("b", 3)])
    logits = torch.randn(3, NUM_EXPERTS)
    before = logits.clone()
    engine.layer_hook(1).steer(logits)
    assert torch.equal(logits, before)


# ---- capture planning and collection ------------------------------------------------------------


def fill_buffer(recorder: RoutingRecorder, total: int, base: int) -> np.ndarray:
    """Write recognisable ids as the layers would: value = base + 100*token + 10*layer + k."""
    layers, _, k = recorder.buffer.shape
    t = np.arange(total)[:, None, None]
    j = np.arange(layers)[None, :, None]
    kk = np.arange(k)[None, None, :]
    ids = (base + 100 * t + 10 * j + kk).astype(np.int32)  # [tokens, layers, k]
    recorder.buffer[:, :total] = torch.from_numpy(ids.transpose(1, 0, 2).copy())
    return ids


def test_capture_plan_entries():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", capture=True)
    reqs.add("b", X)
    reqs.add("c", capture=True, capture_id="cap-c")
    reqs.add("d", capture=True)
    step(engine, reqs, [("a", 3), ("b", 2), ("c", 4), ("d", 0)], first_positions=[0, 0, 8, 5])
    assert engine.recorder._step == [("a", 0, 3, 0), ("cap-c", 5, 4, 8)]
    assert engine.recorder.recording
    assert engine.flags.recording is True
    assert engine.flags.steering_active is True
    engine.finish_step()
    assert engine.flags.recording is False
    assert engine.flags.steering_active is False
    assert not engine.recorder.recording


def test_no_capture_asked_means_no_recording():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", X)
    step(engine, reqs, [("a", 3)])
    assert not engine.recorder.recording
    assert engine.flags.recording is False
    engine.finish_step()
    assert engine.recorder.take(["a"]) == {}


def test_collect_and_take_across_steps():
    engine = make_engine()
    recorder = engine.recorder
    reqs = Requests()
    reqs.add("a", capture=True)
    reqs.add("b")
    reqs.add("c", capture=True, capture_id="cap-c")

    # Prefill: "a" computes positions 0-2; "c" had positions 0-5 from the prefix cache and
    # computes 6-8.
    step(engine, reqs, [("a", 3), ("b", 2), ("c", 3)], first_positions=[0, 0, 6])
    ids1 = fill_buffer(recorder, 8, base=10_000)
    engine.finish_step()
    # Decode: one token each.
    step(engine, reqs, [("c", 1), ("b", 1), ("a", 1)], first_positions=[9, 2, 3])
    ids2 = fill_buffer(recorder, 3, base=20_000)
    engine.finish_step()

    out = recorder.take(["a", "cap-c", "b", "missing"])
    assert sorted(out) == ["a", "cap-c"]
    a = RoutingRecord.from_wire(out["a"])
    c = RoutingRecord.from_wire(out["cap-c"])
    assert a.moe_layers == c.moe_layers == MOE_LAYERS
    assert a.expert_ids.shape == (4, len(MOE_LAYERS), TOP_K)
    assert np.array_equal(a.expert_ids[:3], ids1[0:3])
    assert np.array_equal(a.expert_ids[3], ids2[2])
    assert c.expert_ids.shape == (10, len(MOE_LAYERS), TOP_K)
    assert (c.expert_ids[:6] == -1).all()  # prefix-cache hits were never computed
    assert np.array_equal(c.expert_ids[6:9], ids1[5:8])
    assert np.array_equal(c.expert_ids[9], ids2[0])
    assert c.expert_ids.dtype == np.int32

    # Records are taken once.
    assert recorder.take(["a", "cap-c"]) == {}


def test_capture_through_the_layer_hooks():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a", capture=True)
    reqs.add("b")
    step(engine, reqs, [("b", 2), ("a", 3)])
    topk = {
        layer: torch.randint(0, NUM_EXPERTS, (5, TOP_K), dtype=torch.int32) for layer in MOE_LAYERS
    }
    for layer in MOE_LAYERS:
        hook = engine.layer_hook(layer)
        with forward_context_of(hook):
            hook.capture(topk[layer])
    engine.finish_step()
    record = RoutingRecord.from_wire(engine.recorder.take(["a"])["a"])
    expected = torch.stack([topk[layer][2:5] for layer in MOE_LAYERS], dim=1).numpy()
    assert np.array_equal(record.expert_ids, expected)


def test_layer_hook_capture_does_nothing_when_not_recording():
    engine = make_engine()
    reqs = Requests()
    reqs.add("a")
    step(engine, reqs, [("a", 2)])
    before = engine.recorder.buffer.clone()
    engine.layer_hook(2).capture(torch.zeros(2, TOP_K, dtype=torch.int32))
    assert torch.equal(engine.recorder.buffer, before)


def test_gap_between_segments_reads_minus_one():
    recorder = RoutingRecorder([0, 1], top_k=1, max_tokens=8, device=CPU)
    recorder.plan_step([("r", 0, 2, 0)])
    recorder.buffer[:, :2] = torch.tensor([[[1], [2]], [[3], [4]]], dtype=torch.int32)
    recorder.collect_step()
    recorder.plan_step([("r", 0, 1, 4)])  # positions 2-3 never computed
    recorder.buffer[:, :1] = torch.tensor([[[5]], [[6]]], dtype=torch.int32)
    recorder.collect_step()
    ids = RoutingRecord.from_wire(recorder.take(["r"])["r"]).expert_ids
    assert ids[:, :, 0].tolist() == [[1, 3], [2, 4], [-1, -1], [-1, -1], [5, 6]]


def test_collect_without_plan_is_a_no_op():
    recorder = RoutingRecorder([0], top_k=2, max_tokens=4, device=CPU)
    recorder.collect_step()
    recorder.plan_step([])
    assert not recorder.recording
    recorder.collect_step()
    assert recorder.take(["x"]) == {}
    assert recorder.buffer.eq(-1).all()


def test_oldest_records_are_dropped(monkeypatch):
    monkeypatch.setenv(KEEP_ENV, "2")
    recorder = RoutingRecorder([0], top_k=1, max_tokens=4, device=CPU)
    for name in ("r1", "r2", "r3"):
        recorder.plan_step([(name, 0, 1, 0)])
        recorder.collect_step()
    assert sorted(recorder.take(["r1", "r2", "r3"])) == ["r2", "r3"]


# ---- RoutingRecord wire form --------------------------------------------------------------------


def test_routing_record_wire_round_trip():
    ids = np.arange(3 * 2 * 4, dtype=np.int64).reshape(3, 2, 4) - 1
    record = RoutingRecord(ids, [3, 7])
    wire = record.to_wire()
    assert wire["shape"] == [3, 2, 4]
    assert isinstance(wire["ids"], bytes) and len(wire["ids"]) == ids.size * 4
    assert wire["moe_layers"] == [3, 7]
    again = RoutingRecord.from_wire(wire)
    assert again.expert_ids.dtype == np.int32
    assert np.array_equal(again.expert_ids, ids)
    assert again.moe_layers == [3, 7]
    again.expert_ids[0, 0, 0] = 99  # writable: not a view of the bytes


def test_routing_record_wire_non_contiguous_and_empty():
    ids = np.arange(24, dtype=np.int32).reshape(2, 3, 4).transpose(1, 0, 2)
    again = RoutingRecord.from_wire(RoutingRecord(ids, [0, 1]).to_wire())
    assert np.array_equal(again.expert_ids, ids)
    empty = RoutingRecord(np.zeros((0, 2, 4), dtype=np.int32), [0, 1])
    assert RoutingRecord.from_wire(empty.to_wire()).expert_ids.shape == (0, 2, 4)


def test_step_plan_total_tokens():
    plan = StepPlan(["a", "b"], np.array([3, 4]), np.array([0, 0]))
    assert plan.total_tokens == 7 and isinstance(plan.total_tokens, int)


def test_table_alone_with_plain_lookups():
    table = SteeringTable([0, 1], num_experts=4, max_tokens=6, max_slots=2, device=CPU, top_k=2)
    plan = StepPlan(["a", "b"], np.array([2, 1]), np.array([0, 0]))
    s = steer("t" * 16, activate={0: [1]}, deactivate={1: [2]})
    table.prepare_step(plan, {"a": s, "b": None}.get)
    assert table.token_profiles.tolist() == [1, 1, 0, 0, 0, 0]
    assert table.masks[:, 1].tolist() == [[0, 1, 0, 0], [0, 0, -1, 0]]
    assert table.slot_for(None, ["a"]) == 0


def test_two_engines_in_one_process_keep_their_own_step_state():
    """The ops find a layer's engine by the layer's name in the forward context of the step:
    an engine's steered step does not switch on the ops of another engine's layer of the
    same name, and each engine's flags are its own."""
    steered, idle = make_engine(), make_engine()
    reqs = Requests()
    reqs.add("a", X)
    step(steered, reqs, [("a", 3)])
    assert steered.flags.steering_active and not idle.flags.steering_active
    logits = torch.randn(3, NUM_EXPERTS)
    for engine, changed in ((idle, False), (steered, True)):
        hook = engine.layer_hook(1)
        edited = logits.clone()
        with forward_context_of(hook):
            torch.ops.steermoe.steer_router_logits_(edited, steered.table.token_profiles,
                                                    steered.table.layer_masks(1),
                                                    steered.table.eps,
                                                    steered.table.layer_bias(1),
                                                    steered.table.strength, hook.layer_name)
        assert torch.equal(edited, logits) is not changed
    steered.finish_step()
    assert not steered.flags.steering_active
