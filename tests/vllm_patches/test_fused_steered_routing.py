"""`fused_steered_routing`: the fused steered top-k installed into vLLM's router classes.

vLLM's own `FusedTopKRouter` and `GroupedTopKRouter` objects, with the steering table, hooks
and flags the engine uses. Steered rows must route exactly as vLLM's routing of the edited
logits, unsteered rows as vLLM's routing, the capture buffer must hold what was routed, and idle
steps must run vLLM's own routing. Without a GPU the kernel runs in Triton's interpreter and
`FusedTopKRouter`'s CUDA top-k is replaced by the same routing in torch; on a GPU both are real.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from expert_profiles.request_steering import ResolvedSteering  # noqa: E402
from vllm_patches import fused_steered_routing as fsr  # noqa: E402
from vllm_patches.engine_steering import EngineSteering, MoELayerInfo  # noqa: E402
from vllm_patches.fused_routing import route_softmax_topk, triton_available  # noqa: E402
from vllm_patches.steering_math import steer_router_logits  # noqa: E402
from vllm_patches.vllm_compat.layer_lookup import forward_context_of  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LAYER, E, K = 2, 32, 4

needs_vllm_routers = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"
)
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(
        not triton_available(), reason="no CUDA device and TRITON_INTERPRET != 1")),
    "torch",
]


# The MoE layers the ops find by name (the forward context of each test).
LAYERS: dict = {}


@pytest.fixture(autouse=True)
def _clean_flags(monkeypatch):
    monkeypatch.delenv(fsr.FUSED_ROUTING_ENV, raising=False)
    with forward_context_of(layers=LAYERS):
        yield
    LAYERS.clear()


@pytest.fixture(scope="module")
def router_classes():
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import (
        GroupedTopKRouter,
    )

    return FusedTopKRouter, GroupedTopKRouter


def _torch_route(renormalize):
    """vLLM's fused_topk in torch, for machines without its CUDA op."""

    def route(hidden_states, router_logits, indices_type, *, input_ids=None):
        weights, ids = route_softmax_topk(router_logits.float(), K, renormalize)
        return weights, ids.to(indices_type or torch.int32)

    return route


def _engine(num_experts=E, top_k=K):
    engine = EngineSteering(
        [MoELayerInfo(layer=LAYER, num_experts=num_experts, top_k=top_k,
                      router="FusedTopKRouter")],
        max_tokens=64, max_slots=4, device=torch.device(DEVICE),
    )
    hook = engine.layer_hook(LAYER)
    LAYERS[hook.layer_name] = SimpleNamespace(_steermoe=hook)
    return engine, hook


def _module(router, *, monolithic=False, **extra):
    fields = dict(is_monolithic=monolithic, do_naive_dispatch_combine=False,
                  moe_config=SimpleNamespace(pcp_size=1))
    return SimpleNamespace(router=router, **{**fields, **extra})


def _fused_topk_layer(router_classes, renormalize=True, **module_extra):
    router = router_classes[0](top_k=K, global_num_experts=E, scoring_func="softmax",
                               renormalize=renormalize)
    if not CUDA:
        router._compute_routing = _torch_route(renormalize)
    engine, hook = _engine()
    module = _module(router, **module_extra)
    module._steermoe = hook
    LAYERS[hook.layer_name] = module
    router.set_capture_fn(hook.capture)
    return engine, hook, module, router


def _steer(engine, per_request, tokens):
    req_ids = [f"r{i}" for i in range(len(per_request))]
    lookup = dict(zip(req_ids, per_request, strict=True))
    engine.prepare_step(
        req_ids, np.full(len(req_ids), tokens), np.zeros(len(req_ids), dtype=np.int64),
        lambda r: {"steermoe": lookup[r].to_extra_args()} if lookup[r] else None,
    )


A = ResolvedSteering("a", "da", {LAYER: [3, 30]}, {LAYER: [0, 1, 2, 5]}, 0.01)
B = ResolvedSteering("b", "db", {LAYER: [7]}, {LAYER: list(range(8, 20))}, 0.05)


def _by_id(weights, ids):
    order = ids.long().argsort(dim=1)
    return weights.float().gather(1, order).cpu(), ids.long().gather(1, order).cpu()


def _assert_same(got, want):
    got_w, got_i = _by_id(*got)
    want_w, want_i = _by_id(*want)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-6)


def test_setting_defaults_to_off(monkeypatch):
    assert not fsr.fused_routing_enabled()
    for value, expected in [("1", True), ("on", True), ("0", False), ("", False),
                            ("maybe", False)]:
        monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, value)
        assert fsr.fused_routing_enabled() is expected


@needs_vllm_routers
def test_off_by_default_leaves_the_layer_alone(router_classes):
    _, hook, module, router = _fused_topk_layer(router_classes)
    original = router._compute_routing
    assert not fsr.install_fused_routing(module, hook, require_cuda=False)
    assert module._steermoe is hook and router._compute_routing is original


@needs_vllm_routers
def test_unsupported_layers_keep_the_edit(router_classes, monkeypatch):
    monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, "1")
    fused, grouped = router_classes
    _, hook = _engine()

    def reason(router, **module):
        return fsr.unsupported_reason(_module(router, **module), hook, require_cuda=False)

    plain = fused(top_k=K, global_num_experts=E, scoring_func="softmax")
    assert reason(plain) is None
    assert "sigmoid" in reason(fused(top_k=K, global_num_experts=E, scoring_func="sigmoid"))
    biased = grouped(top_k=K, global_num_experts=E, num_expert_group=4, topk_group=2,
                     scoring_func="sigmoid", e_score_correction_bias=torch.zeros(E))
    assert "sigmoid" in reason(biased) or "bias" in reason(biased)
    assert "gathered" in reason(plain, do_naive_dispatch_combine=True)
    assert "is not one of" in reason(SimpleNamespace(top_k=K))
    no_flag = SimpleNamespace(router=plain, moe_config=SimpleNamespace(pcp_size=1))
    assert "monolithic" in fsr.unsupported_reason(no_flag, hook, require_cuda=False)
    if not CUDA:
        assert fsr.unsupported_reason(_module(plain), hook) == "not a CUDA engine"


@needs_vllm_routers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no-renorm"])
def test_steered_and_unsteered_rows(router_classes, monkeypatch, backend, dtype, renormalize):
    monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, "1")
    engine, hook, module, router = _fused_topk_layer(router_classes, renormalize)
    original = router._compute_routing
    assert fsr.install_fused_routing(module, hook, require_cuda=False, backend=backend)
    routing = module._steermoe
    assert isinstance(routing, fsr.FusedLayerRouting)
    assert router.capture_fn == routing.capture

    tokens = 8
    _steer(engine, [A, None, B], tokens)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3 * tokens, E, generator=g) * 3).to(dtype).to(DEVICE)
    hidden = torch.zeros(3 * tokens, 16, device=DEVICE)
    assert routing.steer(logits) is logits  # no edit: the routing kernel applies it
    weights, ids = router.select_experts(hidden, logits)
    assert weights.dtype == torch.float32
    edited = steer_router_logits(logits, hook.token_profiles, hook.masks, hook.eps)
    _assert_same((weights, ids), original(hidden, edited, None))
    plain = slice(tokens, 2 * tokens)
    _assert_same((weights[plain], ids[plain]), original(hidden[plain], logits[plain], None))
    for rows, steering in ((slice(0, tokens), A), (slice(2 * tokens, 3 * tokens), B)):
        chosen = ids[rows].cpu()
        for expert in steering.activate[LAYER]:
            assert (chosen == expert).any(dim=1).all()
        assert not torch.isin(chosen, torch.tensor(steering.deactivate[LAYER])).any()


@needs_vllm_routers
@pytest.mark.parametrize("backend", BACKENDS)
def test_recording_is_written_by_the_routing(router_classes, monkeypatch, backend):
    monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, "1")
    engine, hook, module, router = _fused_topk_layer(router_classes)
    assert fsr.install_fused_routing(module, hook, require_cuda=False, backend=backend)
    hook.record.fill_(-1)
    engine.flags.recording = True
    logits = torch.randn(10, E, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _, ids = router.select_experts(torch.zeros(10, 16, device=DEVICE), logits)
    assert torch.equal(hook.record[:10], ids.int())
    assert bool((hook.record[10:] == -1).all())


@needs_vllm_routers
def test_idle_steps_run_vllms_routing_once_warm(router_classes, monkeypatch):
    monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, "1")
    engine, hook, module, router = _fused_topk_layer(router_classes)
    calls = []
    original = router._compute_routing

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    router._compute_routing = counted
    backend = "triton" if triton_available() else "torch"
    assert fsr.install_fused_routing(module, hook, require_cuda=False, backend=backend)
    logits = torch.randn(6, E, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    hidden = torch.zeros(6, 16, device=DEVICE)
    router.select_experts(hidden, logits)
    # A kernel variant is launched once outside any capture (Triton cannot compile inside one).
    assert len(calls) == (0 if backend == "triton" else 1)
    router.select_experts(hidden, logits)
    assert len(calls) == (1 if backend == "triton" else 2)


@needs_vllm_routers
@pytest.mark.skipif(not triton_available(), reason="no CUDA device and TRITON_INTERPRET != 1")
def test_a_cold_variant_inside_a_capture_routes_in_torch(router_classes, monkeypatch):
    monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, "1")
    engine, hook, module, router = _fused_topk_layer(router_classes)
    assert fsr.install_fused_routing(module, hook, require_cuda=False, backend="triton")
    monkeypatch.setattr(fsr, "_capturing", lambda tensor: True)
    _steer(engine, [A], 5)
    logits = torch.randn(5, E, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    hidden = torch.zeros(5, 16, device=DEVICE)
    weights, ids = router.select_experts(hidden, logits)
    routing = module._steermoe
    assert routing.torch_fallbacks == 1 and not routing.warm
    assert torch.equal(hook.record[:5], ids.int())  # a capture always records
    edited = steer_router_logits(logits, hook.token_profiles, hook.masks, hook.eps)
    _assert_same((weights, ids), _torch_route(True)(hidden, edited, None))


@needs_vllm_routers
def test_monolithic_layers_keep_the_edit(router_classes, monkeypatch):
    monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, "1")
    engine, hook, module, router = _fused_topk_layer(router_classes, monolithic=True)
    assert fsr.install_fused_routing(module, hook, require_cuda=False, backend="torch")
    _steer(engine, [A], 4)
    logits = torch.randn(4, E, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    expected = steer_router_logits(logits, hook.token_profiles, hook.masks, hook.eps)
    assert torch.equal(module._steermoe.steer(logits.clone()), expected)


@needs_vllm_routers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("groups", "keep"), [(4, 2), (32, 1)], ids=["grouped", "degenerate"])
def test_grouped_router(router_classes, monkeypatch, backend, groups, keep):
    """DeepSeek-V2 routing; with as many groups as experts vLLM routes plain top-k, unscaled."""
    monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, "1")
    router = router_classes[1](top_k=K, global_num_experts=E, num_expert_group=groups,
                               topk_group=keep, renormalize=False, scoring_func="softmax",
                               routed_scaling_factor=2.5)
    engine, hook = _engine()
    module = _module(router)
    module._steermoe = hook
    original = router._compute_routing
    if CUDA or groups < E:
        reference = original
    else:  # vLLM's fallback is its CUDA fused_topk
        reference = _torch_route(False)
        router._compute_routing = reference
    assert fsr.install_fused_routing(module, hook, require_cuda=False, backend=backend)
    steering = ResolvedSteering("g", "dg", {LAYER: [9]}, {LAYER: [16, 17, 18, 19]}, 0.01)
    _steer(engine, [steering, None], 6)
    g = torch.Generator().manual_seed(5)
    logits = (torch.argsort(torch.rand(12, E, generator=g)) * 0.125).float().to(DEVICE)
    hidden = torch.zeros(12, 16, device=DEVICE)
    got = router.select_experts(hidden, logits)
    edited = steer_router_logits(logits, hook.token_profiles, hook.masks, hook.eps)
    _assert_same(got, reference(hidden, edited, None))


@needs_vllm_routers
def test_padded_rows_are_skipped_like_vllm_does(router_classes, monkeypatch):
    monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, "1")
    engine, hook, module, router = _fused_topk_layer(router_classes)
    padding = torch.tensor([False, False, True, True], device=DEVICE)
    monkeypatch.setattr(fsr, "_padding_mask_fn", lambda: (lambda n: padding[:n]))
    assert fsr.install_fused_routing(module, hook, require_cuda=False, backend="torch")
    _steer(engine, [A], 4)
    logits = torch.randn(4, E, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    weights, ids = router.select_experts(torch.zeros(4, 16, device=DEVICE), logits)
    assert bool((ids[2:] == -1).all()) and bool((weights[2:] == 0).all())
    assert bool((ids[:2] >= 0).all())


@needs_vllm_routers
def test_logits_the_kernel_does_not_take_get_the_edit_then_vllm(router_classes, monkeypatch):
    monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, "1")
    engine, hook, module, router = _fused_topk_layer(router_classes)
    seen = []
    original = router._compute_routing

    def spy(hidden_states, router_logits, indices_type, *, input_ids=None):
        seen.append(router_logits.clone())
        return original(hidden_states, router_logits.float(), indices_type)

    router._compute_routing = spy
    assert fsr.install_fused_routing(module, hook, require_cuda=False, backend="torch")
    _steer(engine, [A], 3)
    logits = torch.randn(3, E, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    logits = logits.to(DEVICE)
    expected = steer_router_logits(logits, hook.token_profiles, hook.masks, hook.eps)
    router.select_experts(torch.zeros(3, 16, device=DEVICE), logits.clone())
    assert torch.equal(seen[0], expected)


@pytest.mark.skipif(not triton_available(), reason="no CUDA device and TRITON_INTERPRET != 1")
def test_edit_kernel_precompiles_for_every_dtype():
    _, hook = _engine()
    fsr.precompile_edit_kernel(hook, E)  # runs (interpreted on CPU) without touching the tables
    assert not bool(hook.token_profiles.any())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@needs_vllm_routers
def test_cuda_graph_replays_the_kernel_warmed_in_an_eager_step(router_classes, monkeypatch):
    """As vLLM captures: an eager warm-up step of the same size (nothing steered), then the
    capture; the graph holds the compiled kernel (no torch fallback) and follows the profile
    buffer at replay, against vLLM's own CUDA top-k of the edited logits."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernel would be interpreted, not compiled")
    monkeypatch.setenv(fsr.FUSED_ROUTING_ENV, "1")
    engine, hook, module, router = _fused_topk_layer(router_classes)
    original = router._compute_routing
    assert fsr.install_fused_routing(module, hook)
    routing = module._steermoe
    logits = (torch.randn(8, E, generator=torch.Generator().manual_seed(8)) * 3).to(
        torch.bfloat16).cuda()
    hidden = torch.zeros(8, 16, device="cuda")
    router.select_experts(hidden, logits)  # the eager warm-up step
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = router.select_experts(hidden, logits)
    assert routing.torch_fallbacks == 0
    for per_request in ([None, None], [A, B]):
        _steer(engine, per_request, 4)
        graph.replay()
        torch.cuda.synchronize()
        edited = steer_router_logits(logits, hook.token_profiles, hook.masks, hook.eps)
        _assert_same((weights, ids), original(hidden, edited, None))
        assert torch.equal(hook.record[:8], ids.int())
