"""`steering_ops`: the custom ops the MoE layers call, eagerly and under torch.compile.

The ops read their engine's `StepFlags` (found by layer name) when they run (not when they
are traced), so one compiled
graph serves steered and unsteered steps. torch.compile uses the `aot_eager` backend: it runs
Dynamo and AOT autograd's functionalization of the mutating ops (what Inductor sees too)
without building C++ code.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_patches import steering_math, steering_ops
from vllm_patches.vllm_compat.layer_lookup import forward_context_of

NUM_EXPERTS = 8


LAYER_NAME = "model.layers.1.mlp.experts"


@pytest.fixture(autouse=True)
def flags():
    """The step flags of one engine, whose MoE layer the ops find as LAYER_NAME."""
    flags = steering_ops.StepFlags()
    with forward_context_of(SimpleNamespace(layer_name=LAYER_NAME, flags=flags, rerouter=None)):
        yield flags


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def case(num_tokens: int = 6, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, NUM_EXPERTS, generator=g) * 3).to(dtype)
    profiles = torch.zeros(16, dtype=torch.int32)
    profiles[:num_tokens] = torch.tensor([1, 0, 2, 1, 2, 0][:num_tokens], dtype=torch.int32)
    masks = torch.zeros(3, NUM_EXPERTS, dtype=torch.int8)
    masks[1, 3] = 1
    masks[1, [0, 5]] = -1
    masks[2, [6, 7]] = 1
    eps = torch.tensor([0.0, 0.01, 0.5])
    return logits, profiles, masks, eps


def no_grading(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The graded tables of on/off steering: no bias, strength 1."""
    return torch.zeros(masks.shape), torch.ones(masks.shape[0])


def test_ops_are_registered(flags):
    assert hasattr(torch.ops.steermoe, "steer_router_logits_")
    assert hasattr(torch.ops.steermoe, "record_routing_")
    assert steering_ops.StepFlags(steering_active=False, recording=False) == flags


# ---- eager -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steer_op_does_nothing_when_not_active(dtype):
    logits, profiles, masks, eps = case(dtype=dtype)
    before = logits.clone()
    assert torch.ops.steermoe.steer_router_logits_(logits, profiles, masks, eps, *no_grading(masks),
                                                   LAYER_NAME) is None
    assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_steer_op_equals_steering_math_when_active(dtype, flags):
    logits, profiles, masks, eps = case(dtype=dtype)
    expected = steering_math.steer_router_logits(logits, profiles, masks, eps)
    flags.steering_active = True
    ptr = logits.data_ptr()
    torch.ops.steermoe.steer_router_logits_(logits, profiles, masks, eps, *no_grading(masks),
                                            LAYER_NAME)
    assert logits.data_ptr() == ptr
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, case(dtype=dtype)[0])


def test_steer_op_applies_graded_tables_on_graded_steps(flags):
    logits, profiles, masks, eps = case()
    bias = torch.zeros(masks.shape)
    bias[2, 1] = 9.0
    strength = torch.tensor([1.0, 1.0, 0.5])
    expected = steering_math.steer_router_logits(logits, profiles, masks, eps, bias, strength)
    on_off = steering_math.steer_router_logits(logits, profiles, masks, eps)
    flags.steering_active = True
    for graded, want in ((True, expected), (False, on_off)):
        flags.graded = graded
        edited = logits.clone()
        torch.ops.steermoe.steer_router_logits_(edited, profiles, masks, eps, bias, strength,
                                                LAYER_NAME)
        assert torch.equal(edited, want)
    assert not torch.equal(expected, on_off)


def test_steer_op_ignores_recording_flag(flags):
    logits, profiles, masks, eps = case()
    before = logits.clone()
    flags.recording = True
    torch.ops.steermoe.steer_router_logits_(logits, profiles, masks, eps, *no_grading(masks),
                                            LAYER_NAME)
    assert torch.equal(logits, before)


def test_record_op_does_nothing_when_not_recording(flags):
    record = torch.full((16, 4), -1, dtype=torch.int32)
    topk = torch.arange(12, dtype=torch.int32).reshape(6, 2)
    flags.steering_active = True  # steering alone does not record
    assert torch.ops.steermoe.record_routing_(record, topk, LAYER_NAME) is None
    assert record.eq(-1).all()


def test_record_op_copies_when_recording(flags):
    record = torch.full((16, 4), -1, dtype=torch.int32)
    topk = torch.arange(12, dtype=torch.int32).reshape(6, 2)
    flags.recording = True
    torch.ops.steermoe.record_routing_(record, topk, LAYER_NAME)
    assert torch.equal(record[:6, :2], topk)
    assert record[6:].eq(-1).all() and record[:, 2:].eq(-1).all()


def test_record_op_casts_int64_ids(flags):
    record = torch.full((4, 2), -1, dtype=torch.int32)
    flags.recording = True
    torch.ops.steermoe.record_routing_(record, torch.tensor([[5, 1]], dtype=torch.int64),
                                       LAYER_NAME)
    assert record.tolist() == [[5, 1], [-1, -1], [-1, -1], [-1, -1]]


# ---- torch.compile -----------------------------------------------------------------------------


def moe_router(hidden, weight, profiles, masks, eps, record):
    """A toy MoE routing step: router matmul, steering edit, top-k, capture."""
    logits = hidden @ weight
    torch.ops.steermoe.steer_router_logits_(logits, profiles, masks, eps, *no_grading(masks),
                                            LAYER_NAME)
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, 2, dim=-1)
    torch.ops.steermoe.record_routing_(record, ids.to(torch.int32), LAYER_NAME)
    return logits, weights, ids


def recording_backend(graphs: list):
    """aot_eager, keeping the Dynamo graphs it was given."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def test_compiled_fullgraph_follows_the_flags(flags):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 16, generator=g)
    weight = torch.randn(16, NUM_EXPERTS, generator=g)
    _, profiles, masks, eps = case()
    graphs: list = []
    compiled = torch.compile(moe_router, fullgraph=True, backend=recording_backend(graphs))

    plain = hidden @ weight
    steered = steering_math.steer_router_logits(plain, profiles, masks, eps)

    # Unsteered, not recording: the plain routing, the record untouched.
    record = torch.full((16, 2), -1, dtype=torch.int32)
    logits, _, ids = compiled(hidden, weight, profiles, masks, eps, record)
    torch.testing.assert_close(logits, plain)
    assert record.eq(-1).all()

    # Same graph, flags on: the edit is visible in the output and the ids are recorded.
    flags.steering_active = True
    flags.recording = True
    logits, weights, ids = compiled(hidden, weight, profiles, masks, eps, record)
    torch.testing.assert_close(logits, steered)
    eager_logits, eager_weights, eager_ids = moe_router(
        hidden, weight, profiles, masks, eps, torch.full((16, 2), -1, dtype=torch.int32)
    )
    torch.testing.assert_close(logits, eager_logits)
    torch.testing.assert_close(weights, eager_weights)
    assert torch.equal(ids, eager_ids)
    assert torch.equal(record[:6], ids.to(torch.int32))
    assert record[6:].eq(-1).all()
    # Token 0 uses profile 1 (activate 3, deactivate 0 and 5); token 2 profile 2 (6 and 7).
    assert 3 in ids[0].tolist() and not {0, 5} & set(ids[0].tolist())
    assert sorted(ids[2].tolist()) == [6, 7]
    assert torch.equal(ids[1], torch.topk(torch.softmax(plain[1], -1), 2).indices)

    # Flags off again: no edit, without a recompile changing anything.
    flags.steering_active = False
    flags.recording = False
    record2 = torch.full((16, 2), -1, dtype=torch.int32)
    logits, _, _ = compiled(hidden, weight, profiles, masks, eps, record2)
    torch.testing.assert_close(logits, plain)
    assert record2.eq(-1).all()

    # One graph, compiled once, holding both ops (the flags are read at run time).
    assert len(graphs) == 1
    code = graphs[0].code
    assert "steermoe.steer_router_logits_" in code
    assert "steermoe.record_routing_" in code


def test_compiled_sees_new_table_contents(flags):
    """The table is updated in place between steps; the compiled graph reads the new values."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 16, generator=g)
    weight = torch.randn(16, NUM_EXPERTS, generator=g)
    profiles = torch.zeros(8, dtype=torch.int32)
    masks = torch.zeros(2, NUM_EXPERTS, dtype=torch.int8)
    eps = torch.tensor([0.0, 0.01])
    record = torch.full((8, 2), -1, dtype=torch.int32)
    compiled = torch.compile(moe_router, fullgraph=True, backend="aot_eager")
    flags.steering_active = True

    compiled(hidden, weight, profiles, masks, eps, record)
    masks[1, [1, 2]] = 1
    profiles[:4] = 1
    _, _, ids = compiled(hidden, weight, profiles, masks, eps, record)
    assert sorted(ids[0].tolist()) == [1, 2] and sorted(ids[3].tolist()) == [1, 2]
    profiles[2:4] = 0
    logits, _, _ = compiled(hidden, weight, profiles, masks, eps, record)
    torch.testing.assert_close(logits[2:], hidden[2:] @ weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_compiled_in_place_on_an_input(dtype, flags):
    """The op mutates a graph input: the caller's tensor must hold the edit afterwards."""

    def edit(logits, profiles, masks, eps):
        torch.ops.steermoe.steer_router_logits_(logits, profiles, masks, eps, *no_grading(masks),
                                                LAYER_NAME)
        return logits.sum()

    logits, profiles, masks, eps = case(dtype=dtype)
    expected = steering_math.steer_router_logits(logits, profiles, masks, eps)
    compiled = torch.compile(edit, fullgraph=True, backend="aot_eager")
    flags.steering_active = True
    compiled(logits, profiles, masks, eps)
    assert torch.equal(logits, expected)
