"""Steering routers that select on sigmoid score + correction bias (DeepSeek-V3 family).

Uses vLLM's own CPU router (grouped top-k, sigmoid, correction bias) as the model's routing,
with the steering table, ops and hooks the engine uses. The meaning under test
(vllm_patches/ROUTERS.md): activated experts are always selected, deactivated never; the
weights are the router's own (sigmoid of the edited logits, renormalised, scaled); rows
without steering are untouched.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_patches import steering_ops
from vllm_patches.engine_steering import EngineSteering, MoELayerInfo
from vllm_patches.request_steering import ResolvedSteering

E, K, GROUPS, KEEP_GROUPS, SCALE, LAYER = 16, 4, 4, 2, 2.5, 3


@pytest.fixture
def router():
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    generator = torch.Generator().manual_seed(0)
    bias = torch.randn(E, generator=generator) * 0.5
    bias[5] = -3.0  # an expert the bias keeps out of reach of the logit edit
    bias[9] = 3.0  # an expert the bias always selects
    return CPURouter(
        top_k=K, global_num_experts=E, use_grouped_topk=True, num_expert_group=GROUPS,
        topk_group=KEEP_GROUPS, renormalize=True, scoring_func="sigmoid",
        routed_scaling_factor=SCALE, e_score_correction_bias=bias,
    )


@pytest.fixture
def steered_layer(router):
    from vllm_patches.vllm_compat import _reroute_biased

    engine = EngineSteering(
        [MoELayerInfo(layer=LAYER, num_experts=E, top_k=K, router="CPURouter")],
        max_tokens=64, max_slots=4, device=torch.device("cpu"),
    )
    hook = engine.layer_hook(LAYER)
    module = SimpleNamespace(router=router)
    _reroute_biased(module, hook)
    yield engine, hook, router
    steering_ops.FLAGS.steering_active = False
    steering_ops.BIASED_REROUTES.pop(LAYER, None)


def _steer(engine, per_request: list[ResolvedSteering | None], tokens: int) -> None:
    req_ids = [f"r{i}" for i in range(len(per_request))]
    lookup = dict(zip(req_ids, per_request, strict=True))
    engine.prepare_step(
        req_ids, np.full(len(req_ids), tokens), np.zeros(len(req_ids), dtype=np.int64),
        lambda r: {"steermoe": lookup[r].to_extra_args()} if lookup[r] else None,
    )


def _route(hook, router, logits):
    edited = hook.steer(logits.clone())
    hidden = torch.zeros(len(logits), 8)
    return router._compute_routing(hidden, edited, None)


def _reference(logits, steering: ResolvedSteering, bias):
    """The meaning, written directly: selection on score + bias with forced experts."""
    act, deact = steering.activate.get(LAYER, []), steering.deactivate.get(LAYER, [])
    z = logits.float().clone()
    z[:, act] = z.amax(1, keepdim=True) + steering.eps
    z[:, deact] = z.amin(1, keepdim=True) - steering.eps
    scores = z.sigmoid()
    choice = scores + bias
    choice[:, act] = float("inf")
    choice[:, deact] = float("-inf")
    grouped = choice.view(len(z), GROUPS, -1)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)
    keep = group_score.topk(KEEP_GROUPS, dim=-1).indices
    allowed = torch.zeros(len(z), GROUPS, dtype=torch.bool).scatter_(1, keep, True)
    choice = choice.masked_fill(~allowed.repeat_interleave(E // GROUPS, 1), float("-inf"))
    ids = choice.topk(K, dim=-1).indices
    weights = scores.gather(1, ids)
    weights = weights / weights.sum(-1, keepdim=True) * SCALE
    return weights, ids


def _sorted(weights, ids):
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


def test_forced_selection_beats_the_bias(steered_layer):
    engine, hook, router = steered_layer
    steering = ResolvedSteering("p", "d1", {LAYER: [5]}, {LAYER: [9]}, 0.01)
    tokens = 32
    logits = torch.randn(2 * tokens, E, generator=torch.Generator().manual_seed(1))
    _steer(engine, [steering, None], tokens)

    weights, ids = _route(hook, router, logits)
    steered, plain = slice(0, tokens), slice(tokens, 2 * tokens)
    assert (ids[steered] == 5).any(dim=1).all()
    assert not (ids[steered] == 9).any()

    want_w, want_ids = _reference(logits[steered], steering, router.e_score_correction_bias)
    got_w, got_ids = _sorted(weights[steered], ids[steered].long())
    want_w, want_ids = _sorted(want_w, want_ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)

    steering_ops.FLAGS.steering_active = False
    base_w, base_ids = router._compute_routing(None, logits[plain], None)
    assert torch.equal(ids[plain], base_ids) and torch.equal(weights[plain], base_w)


def test_the_logit_edit_alone_would_not_be_enough(steered_layer):
    # Why the re-route exists: with the bias, max-logit + eps does not reach expert 5.
    _, _, router = steered_layer
    logits = torch.randn(32, E, generator=torch.Generator().manual_seed(1))
    logits[:, 5] = logits.amax(1) + 0.01
    _, ids = router._compute_routing(None, logits, None)
    assert not (ids == 5).any(dim=1).all()


def test_two_profiles_in_one_step_each_get_their_own_forcing(steered_layer):
    engine, hook, router = steered_layer
    a = ResolvedSteering("a", "da", {LAYER: [5, 6]}, {}, 0.01)
    b = ResolvedSteering("b", "db", {}, {LAYER: [9, 0, 1]}, 0.01)
    logits = torch.randn(24, E, generator=torch.Generator().manual_seed(2))
    _steer(engine, [a, b, None], 8)
    _, ids = _route(hook, router, logits)
    assert ((ids[:8] == 5).any(1) & (ids[:8] == 6).any(1)).all()
    assert not torch.isin(ids[8:16], torch.tensor([9, 0, 1])).any()
