"""Steering routers that select on sigmoid score + correction bias (DeepSeek-V3 family).

Uses vLLM's own routers as the model's routing: the CPU router (vLLM >= 0.32) on CPU tensors,
and `GroupedTopKRouter` (grouped top-k, sigmoid, correction bias), which is the router of these
models on GPUs, on CUDA tensors where there is a GPU (its CUDA `grouped_topk` kernel) and on
CPU tensors otherwise (its torch routing). With the steering table, ops and hooks the engine
uses. The meaning under test (vllm_patches/ROUTERS.md): activated experts are always selected,
deactivated never; the weights are the router's own (sigmoid of the edited logits,
renormalised, scaled); rows without steering are untouched.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from expert_profiles.request_steering import ResolvedSteering
from vllm_patches.engine_steering import EngineSteering, MoELayerInfo

E, K, GROUPS, KEEP_GROUPS, SCALE, LAYER = 16, 4, 4, 2, 2.5, 3
CPU_ROUTER = "vllm.model_executor.layers.fused_moe.router.cpu_router"


def _router_class(kind: str):
    """(router class, extra constructor arguments, device) of one kind; skips naming why."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    if kind == "cpu_router":
        if importlib.util.find_spec(CPU_ROUTER) is None:
            pytest.skip("this vLLM has no CPU router (vLLM GPU builds before 0.32); the "
                        "grouped_topk_router cases cover its GPU router")
        from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

        return CPURouter, {"use_grouped_topk": True}, "cpu"
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import (
        GroupedTopKRouter,
    )

    return GroupedTopKRouter, {}, "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["cpu_router", "grouped_topk_router"])
def router(request):
    cls, extra, device = _router_class(request.param)
    generator = torch.Generator().manual_seed(0)
    bias = torch.randn(E, generator=generator) * 0.5
    bias[5] = -3.0  # an expert the bias keeps out of reach of the logit edit
    bias[9] = 3.0  # an expert the bias always selects
    return cls(
        top_k=K, global_num_experts=E, num_expert_group=GROUPS, topk_group=KEEP_GROUPS,
        renormalize=True, scoring_func="sigmoid", routed_scaling_factor=SCALE,
        e_score_correction_bias=bias.to(device), **extra,
    )


def _device(router) -> torch.device:
    return router.e_score_correction_bias.device


@pytest.fixture
def steered_layer(router):
    from vllm_patches.routers.sigmoid_bias_grouped import reroute_biased as _reroute_biased
    from vllm_patches.vllm_compat.layer_lookup import forward_context_of

    engine = EngineSteering(
        [MoELayerInfo(layer=LAYER, num_experts=E, top_k=K, router=type(router).__name__)],
        max_tokens=64, max_slots=4, device=_device(router),
    )
    hook = engine.layer_hook(LAYER)
    module = SimpleNamespace(router=router)
    _reroute_biased(module, hook)
    with forward_context_of(hook):
        yield engine, hook, router


def _logits(rows: int, seed: int, router) -> torch.Tensor:
    logits = torch.randn(rows, E, generator=torch.Generator().manual_seed(seed))
    return logits.to(_device(router))


def _hidden(rows: int, router) -> torch.Tensor:
    return torch.zeros(rows, 8, device=_device(router))


def _steer(engine, per_request: list[ResolvedSteering | None], tokens: int) -> None:
    req_ids = [f"r{i}" for i in range(len(per_request))]
    lookup = dict(zip(req_ids, per_request, strict=True))
    engine.prepare_step(
        req_ids, np.full(len(req_ids), tokens), np.zeros(len(req_ids), dtype=np.int64),
        lambda r: {"steermoe": lookup[r].to_extra_args()} if lookup[r] else None,
    )


def _route(hook, router, logits):
    edited = hook.steer(logits.clone())
    return router._compute_routing(_hidden(len(logits), router), edited, None)


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
    logits = _logits(2 * tokens, 1, router)
    _steer(engine, [steering, None], tokens)

    weights, ids = _route(hook, router, logits)
    steered, plain = slice(0, tokens), slice(tokens, 2 * tokens)
    assert (ids[steered] == 5).any(dim=1).all()
    assert not (ids[steered] == 9).any()

    want_w, want_ids = _reference(logits[steered].cpu(), steering,
                                  router.e_score_correction_bias.cpu())
    got_w, got_ids = _sorted(weights[steered].cpu(), ids[steered].long().cpu())
    want_w, want_ids = _sorted(want_w, want_ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)

    engine.flags.steering_active = False
    base_w, base_ids = router._compute_routing(_hidden(tokens, router), logits[plain], None)
    assert torch.equal(ids[plain], base_ids) and torch.equal(weights[plain], base_w)


def test_the_logit_edit_alone_would_not_be_enough(steered_layer):
    # Why the re-route exists: with the bias, max-logit + eps does not reach expert 5.
    _, _, router = steered_layer
    logits = _logits(32, 1, router)
    logits[:, 5] = logits.amax(1) + 0.01
    _, ids = router._compute_routing(_hidden(32, router), logits, None)
    assert not (ids == 5).any(dim=1).all()


def test_two_profiles_in_one_step_each_get_their_own_forcing(steered_layer):
    engine, hook, router = steered_layer
    a = ResolvedSteering("a", "da", {LAYER: [5, 6]}, {}, 0.01)
    b = ResolvedSteering("b", "db", {}, {LAYER: [9, 0, 1]}, 0.01)
    logits = _logits(24, 2, router)
    _steer(engine, [a, b, None], 8)
    _, ids = _route(hook, router, logits)
    ids = ids.cpu()
    assert ((ids[:8] == 5).any(1) & (ids[:8] == 6).any(1)).all()
    assert not torch.isin(ids[8:16], torch.tensor([9, 0, 1])).any()


def test_graded_rows_are_routed_by_the_model_on_the_edited_logits(steered_layer):
    """Only full-strength switches are forced: a row at strength < 1, or with a bias only, is
    the router's own routing of its edited logits (correction bias included)."""
    from dataclasses import replace

    from vllm_patches.steering_math import steer_router_logits

    engine, hook, router = steered_layer
    switched = ResolvedSteering("p", "d1", {LAYER: [5]}, {LAYER: [9]}, 0.01)
    graded = [replace(switched, digest="d2", strength=0.5),
              ResolvedSteering("b", "d3", {}, {}, 0.01, bias={LAYER: {5: 3.0}})]
    tokens = 16
    logits = _logits(2 * tokens, 3, router)
    _steer(engine, graded, tokens)
    weights, ids = _route(hook, router, logits)
    table = engine.table
    edited = steer_router_logits(logits, table.token_profiles, table.layer_masks(LAYER),
                                 table.eps, table.layer_bias(LAYER), table.strength)
    engine.flags.steering_active = False  # the router's own routing, no re-route
    want_w, want_ids = router._compute_routing(_hidden(2 * tokens, router), edited, None)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)
