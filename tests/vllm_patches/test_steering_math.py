"""`steering_math`: the logit-space edit against the paper's log-softmax edit, and its rounding.

The routers are vLLM's own CPU routing functions (`fused_moe/router/cpu_router.py`:
`_softmax_topk`, `_grouped_topk`). They are pure torch, but importing `vllm.model_executor`
takes over ten seconds, so the two function definitions are read from vLLM's installed source
file and compiled here, with only `torch` in their namespace (no other vLLM code runs). Where
this vLLM has no CPU router (GPU builds before 0.32), only the tests that route with it skip.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from vllm_patches.steering_math import (
    ACTIVATE,
    DEACTIVATE,
    effective_eps,
    steer_log_probs,
    steer_router_logits,
    steer_router_logits_,
    steer_selection_scores,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _load_vllm_cpu_router() -> tuple[dict | None, str]:
    """vLLM's CPU routing functions, or None and why not (only the tests that route with
    them skip then: GPU builds of vLLM before 0.32 have no CPU router)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None, "vLLM is not installed"
    path = Path(spec.submodule_search_locations[0]).joinpath(
        "model_executor", "layers", "fused_moe", "router", "cpu_router.py"
    )
    if not path.is_file():
        return None, f"this vLLM has no CPU router ({path.name} arrived in vLLM 0.32)"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    wanted = {"_softmax_topk", "_grouped_topk"}
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    if {n.name for n in nodes} != wanted:
        return None, "vLLM's cpu_router has no _softmax_topk/_grouped_topk"
    namespace: dict = {"torch": torch}
    module = ast.Module(body=nodes, type_ignores=[])
    exec(compile(module, str(path), "exec"), namespace)  # noqa: S102
    return namespace, ""


_ROUTER, _NO_ROUTER = _load_vllm_cpu_router()
needs_cpu_router = pytest.mark.skipif(
    _ROUTER is None, reason=f"needs vLLM's CPU routing functions: {_NO_ROUTER}"
)
softmax_topk = _ROUTER["_softmax_topk"] if _ROUTER else None
grouped_topk = _ROUTER["_grouped_topk"] if _ROUTER else None


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def random_case(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    num_profiles: int,
    seed: int,
    *,
    scale: float = 3.0,
    extra_cols: int = 0,
):
    """Logits, per-token profiles (0 = none), masks [P + 1, E], eps [P + 1], and the sets."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts + extra_cols, generator=g) * scale
    profiles = torch.randint(0, num_profiles + 1, (num_tokens,), generator=g, dtype=torch.int32)
    masks = torch.zeros(num_profiles + 1, num_experts, dtype=torch.int8)
    eps = torch.zeros(num_profiles + 1, dtype=torch.float32)
    sets: dict[int, tuple[list[int], list[int]]] = {0: ([], [])}
    for p in range(1, num_profiles + 1):
        perm = torch.randperm(num_experts, generator=g).tolist()
        n_act = int(torch.randint(0, top_k + 1, (1,), generator=g))
        n_deact = int(torch.randint(0, num_experts - top_k + 1, (1,), generator=g))
        act, deact = sorted(perm[:n_act]), sorted(perm[n_act : n_act + n_deact])
        masks[p, act] = ACTIVATE
        masks[p, deact] = DEACTIVATE
        eps[p] = [0.001, 0.01, 0.1, 1.0][p % 4]
        sets[p] = (act, deact)
    return logits, profiles, masks, eps, sets


def paper_reference(logits, profiles, eps, sets) -> torch.Tensor:
    """Row by row, the paper's edit on log-softmax (profile 0: plain log-softmax)."""
    out = torch.empty(logits.shape, dtype=torch.float32)
    for p, (act, deact) in sets.items():
        rows = (profiles == p).nonzero().squeeze(1)
        if rows.numel():
            out[rows] = steer_log_probs(logits[rows], act, deact, float(eps[p]))
    return out


# ---- routers -----------------------------------------------------------------------------------


def route_softmax_topk(x, top_k, renormalize):
    """vLLM's CPU softmax router (topk over logits; softmax over the k or over the row)."""
    weights, ids = softmax_topk(x, top_k, renormalize)
    return ids, weights


def route_softmax_then_topk(x, top_k, renormalize):
    """Softmax over the row, then top-k (Mixtral/Qwen/OLMoE as written in HF)."""
    probs = torch.softmax(x.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def route_topk_then_softmax(x, top_k, renormalize):
    """GPT-OSS: top-k over the logits, then softmax over the k chosen."""
    del renormalize
    values, ids = torch.topk(x.float(), top_k, dim=-1)
    return ids, torch.softmax(values, dim=-1)


def by_expert(ids: torch.Tensor, weights: torch.Tensor):
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.float().gather(1, order)


ROUTERS = {
    "vllm_softmax_topk": route_softmax_topk,
    "softmax_then_topk": route_softmax_then_topk,
    "topk_then_softmax": route_topk_then_softmax,
}


@pytest.mark.parametrize(
    "router",
    [pytest.param(name, marks=needs_cpu_router) if name.startswith("vllm") else name
     for name in ROUTERS],
)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(
    ("num_experts", "top_k", "seed"), [(8, 2, 0), (64, 8, 1), (32, 4, 2), (128, 8, 3)]
)
def test_logit_edit_routes_like_the_paper(router, renormalize, num_experts, top_k, seed):
    logits, profiles, masks, eps, sets = random_case(64, num_experts, top_k, 6, seed)
    ours = steer_router_logits(logits, profiles, masks, eps)
    paper = paper_reference(logits, profiles, eps, sets)
    route = ROUTERS[router]
    ids_a, w_a = by_expert(*route(ours, top_k, renormalize))
    ids_b, w_b = by_expert(*route(paper, top_k, renormalize))
    assert torch.equal(ids_a.long(), ids_b.long())
    torch.testing.assert_close(w_a, w_b, rtol=0, atol=1e-6)
    # And the steering did what it says: activated in, deactivated out.
    for t in range(logits.shape[0]):
        act, deact = sets[int(profiles[t])]
        chosen = set(ids_a[t].tolist())
        assert set(act) <= chosen
        assert not set(deact) & chosen


def test_full_softmax_equals_the_papers():
    logits, profiles, masks, eps, sets = random_case(48, 16, 4, 5, seed=7)
    ours = torch.softmax(steer_router_logits(logits, profiles, masks, eps), dim=-1)
    paper = torch.softmax(paper_reference(logits, profiles, eps, sets), dim=-1)
    torch.testing.assert_close(ours, paper, rtol=0, atol=1e-6)


# ---- grouped top-k (DeepSeek-V2 style) ----------------------------------------------------------


@needs_cpu_router
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_experts", "num_group", "topk_group", "top_k"),
    [(64, 8, 3, 6), (160, 8, 3, 6), (32, 4, 2, 4)],
)
def test_grouped_topk_honours_activate_and_deactivate(
    dtype, num_experts, num_group, topk_group, top_k
):
    group_size = num_experts // num_group
    g = torch.Generator().manual_seed(num_experts + top_k)
    for trial in range(12):
        num_tokens = 16
        logits = (torch.randn(num_tokens, num_experts, generator=g) * 4).to(dtype)
        groups = torch.randperm(num_group, generator=g)[:topk_group].tolist()
        n_act_groups = 1 + trial % topk_group
        act: list[int] = []
        for i in range(min(top_k, 1 + trial % top_k)):
            group = groups[i % n_act_groups]
            expert = group * group_size + int(torch.randint(0, group_size, (1,), generator=g))
            if expert not in act:
                act.append(expert)
        others = [e for e in torch.randperm(num_experts, generator=g).tolist() if e not in act]
        # Leave enough experts in the chosen groups: at most group_size - top_k deactivated.
        deact = others[: max(0, group_size - top_k) + trial % 3]
        masks = torch.zeros(2, num_experts, dtype=torch.int8)
        masks[1, act] = ACTIVATE
        masks[1, deact] = DEACTIVATE
        profiles = torch.ones(num_tokens, dtype=torch.int32)
        eps = torch.tensor([0.0, 0.01])
        steered = steer_router_logits(logits, profiles, masks, eps)
        weights, ids = grouped_topk(
            steered,
            top_k,
            True,
            num_group,
            topk_group,
            scoring_func="softmax",
            routed_scaling_factor=1.0,
            e_score_correction_bias=None,
        )
        for row in ids.tolist():
            assert set(act) <= set(row), (trial, act, row)
            assert not set(deact) & set(row), (trial, deact, row)
        torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens))


# ---- bit identity of what is not steered --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra_cols", [0, 3])
def test_untouched_bits_stay_identical(dtype, extra_cols):
    num_experts = 16
    logits, profiles, masks, eps, _ = random_case(
        40, num_experts, 4, 4, seed=11, extra_cols=extra_cols
    )
    logits = logits.to(dtype)
    masks[2] = 0  # a profile that steers nothing in this layer
    profiles[:3] = 2
    profiles[3:6] = 0
    long_profiles = torch.cat([profiles, torch.full((7,), 1, dtype=torch.int32)])  # >= T
    out = steer_router_logits(logits, long_profiles, masks, eps)
    assert out.dtype == dtype and out.shape == logits.shape
    assert out.data_ptr() != logits.data_ptr()

    row_mask = masks[profiles.long()]  # [T, E]
    steered_rows = row_mask.ne(0).any(dim=1)
    assert steered_rows.any() and (~steered_rows).any()
    same = bits(out) == bits(logits)
    assert same[~steered_rows].all()  # rows with profile 0 or an all-zero mask row
    assert same[:, :num_experts][row_mask == 0].all()  # untouched entries of steered rows
    assert same[:, num_experts:].all()  # extra trailing columns
    assert not same[:, :num_experts][row_mask != 0].all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_is_not_modified(dtype):
    logits, profiles, masks, eps, _ = random_case(20, 8, 2, 3, seed=5)
    logits = logits.to(dtype)
    before = logits.clone()
    steer_router_logits(logits, profiles, masks, eps)
    assert torch.equal(bits(logits), bits(before))


def test_no_tokens_and_no_steered_tokens():
    masks = torch.zeros(2, 4, dtype=torch.int8)
    masks[1, 0] = 1
    eps = torch.tensor([0.0, 0.01])
    empty = torch.zeros(0, 4)
    assert steer_router_logits(empty, torch.ones(5, dtype=torch.int32), masks, eps).shape == (0, 4)
    logits = torch.randn(3, 4)
    out = steer_router_logits(logits, torch.zeros(8, dtype=torch.int32), masks, eps)
    assert torch.equal(out, logits)


def test_values_of_the_edit_in_fp32():
    logits = torch.tensor([[1.0, 4.0, -2.0, 0.5], [3.0, -1.0, 2.0, 0.0]])
    masks = torch.tensor([[0, 0, 0, 0], [1, 0, 0, -1], [0, -1, 1, 0]], dtype=torch.int8)
    eps = torch.tensor([0.0, 0.5, 0.25])
    out = steer_router_logits(logits, torch.tensor([1, 2], dtype=torch.int32), masks, eps)
    assert out.tolist() == [[4.5, 4.0, -2.0, -2.5], [3.0, -1.25, 3.25, 0.0]]


# ---- rounding: activated strictly above, deactivated strictly below -----------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps_value", [1e-4, 0.01])
def test_rounding_keeps_the_order_strict(dtype, eps_value):
    num_experts, num_tokens = 64, 256
    g = torch.Generator().manual_seed(3)
    magnitude = 5 + 55 * torch.rand(num_tokens, num_experts, generator=g)
    sign = torch.where(torch.rand(num_tokens, num_experts, generator=g) < 0.5, -1.0, 1.0)
    logits = (magnitude * sign).to(dtype)
    # Some rows all positive / all negative, so max and min sit on either side of 0.
    logits[:32] = logits[:32].abs()
    logits[32:64] = -logits[32:64].abs()
    num_profiles = 8
    masks = torch.zeros(num_profiles + 1, num_experts, dtype=torch.int8)
    for p in range(1, num_profiles + 1):
        perm = torch.randperm(num_experts, generator=g)
        masks[p, perm[: 1 + p % 4]] = ACTIVATE
        masks[p, perm[4 : 4 + p]] = DEACTIVATE
    profiles = torch.randint(1, num_profiles + 1, (num_tokens,), generator=g, dtype=torch.int32)
    eps = torch.full((num_profiles + 1,), eps_value)

    out = steer_router_logits(logits, profiles, masks, eps).float()
    row_mask = masks[profiles.long()]
    inf = torch.tensor(float("inf"))
    act, deact = row_mask == ACTIVATE, row_mask == DEACTIVATE
    lowest_active = torch.where(act, out, inf).amin(dim=1)
    highest_other = torch.where(act, -inf, out).amax(dim=1)
    assert (lowest_active > highest_other).all()
    highest_deactivated = torch.where(deact, out, -inf).amax(dim=1)
    lowest_other = torch.where(deact, inf, out).amin(dim=1)
    assert (highest_deactivated < lowest_other).all()
    # All activated experts of a row share one value (so none is preferred over another).
    spread = torch.where(act, out, -inf).amax(dim=1) - lowest_active
    assert spread.eq(0).all()


def test_effective_eps():
    eps = torch.tensor([0.01])
    # fp32: eps = 0.01 is never raised at ordinary magnitudes.
    for v in (0.0, 1.0, 5.0, -60.0, 1000.0):
        assert effective_eps(eps, torch.tensor([v]), torch.float32).item() == pytest.approx(0.01)
    # bf16 around 5: 2 * 2**-7 * 5 = 0.078125 (the module docstring's 0.078).
    assert effective_eps(eps, torch.tensor([5.0]), torch.bfloat16).item() == 0.078125
    assert effective_eps(eps, torch.tensor([-5.0]), torch.bfloat16).item() == 0.078125
    # |v| < 1 counts as 1.
    assert effective_eps(eps, torch.tensor([0.1]), torch.bfloat16).item() == 2 * 2**-7
    # A large eps is kept.
    assert effective_eps(torch.tensor([1.0]), torch.tensor([5.0]), torch.bfloat16).item() == 1.0


def test_bf16_eps_is_raised_but_fp32_is_not():
    logits = torch.tensor([[40.0, 1.0, -3.0, 2.0]])
    masks = torch.tensor([[0, 0, 0, 0], [0, 1, -1, 0]], dtype=torch.int8)
    profiles = torch.tensor([1], dtype=torch.int32)
    eps = torch.tensor([0.0, 0.01])
    fp32 = steer_router_logits(logits, profiles, masks, eps)
    assert fp32[0, 1].item() == pytest.approx(40.01)
    assert fp32[0, 2].item() == pytest.approx(-3.01)
    bf16 = steer_router_logits(logits.bfloat16(), profiles, masks, eps)
    assert bf16[0, 1].item() > 40.0
    assert bf16[0, 2].item() < -3.0


# ---- in place ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra_cols", [0, 2])
def test_in_place_equals_out_of_place(dtype, extra_cols):
    logits, profiles, masks, eps, _ = random_case(50, 32, 4, 5, seed=9, extra_cols=extra_cols)
    logits = logits.to(dtype)
    expected = steer_router_logits(logits, profiles, masks, eps)
    inplace = logits.clone()
    ptr = inplace.data_ptr()
    assert steer_router_logits_(inplace, profiles, masks, eps) is None
    assert inplace.data_ptr() == ptr
    assert torch.equal(bits(inplace), bits(expected))


def test_in_place_with_nothing_steered_is_untouched():
    logits = torch.randn(4, 8)
    before = logits.clone()
    steer_router_logits_(
        logits,
        torch.zeros(4, dtype=torch.int32),
        torch.zeros(2, 8, dtype=torch.int8),
        torch.zeros(2),
    )
    assert torch.equal(bits(logits), bits(before))


# ---- reference functions -------------------------------------------------------------------------


def test_steer_log_probs_without_sets_is_log_softmax():
    logits = torch.randn(5, 8)
    torch.testing.assert_close(
        steer_log_probs(logits, [], [], 0.01), torch.log_softmax(logits, dim=-1)
    )


def test_steer_log_probs_values():
    logits = torch.randn(5, 8, dtype=torch.bfloat16)
    out = steer_log_probs(logits, [1, 2], [0], 0.5)
    s = torch.log_softmax(logits.float(), dim=-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[:, 1], s.amax(-1) + 0.5)
    torch.testing.assert_close(out[:, 2], s.amax(-1) + 0.5)
    torch.testing.assert_close(out[:, 0], s.amin(-1) - 0.5)
    torch.testing.assert_close(out[:, 3:], s[:, 3:])


def test_steer_selection_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.sigmoid(torch.randn(6, 10, generator=g)).to(torch.bfloat16)
    before = scores.clone()
    out = steer_selection_scores(scores, [2, 7], [0, 9, 4], 0.05)
    assert out.dtype == torch.float32 and out.shape == scores.shape
    assert torch.equal(scores, before)  # input untouched
    f = scores.float()
    torch.testing.assert_close(out[:, 2], f.amax(-1) + 0.05, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 7], f.amax(-1) + 0.05, rtol=0, atol=0)
    for e in (0, 9, 4):
        torch.testing.assert_close(out[:, e], f.amin(-1) - 0.05, rtol=0, atol=0)
    rest = [1, 3, 5, 6, 8]
    assert torch.equal(out[:, rest], f[:, rest])
    top2 = out.topk(2, dim=-1).indices.sort(dim=-1).values
    assert top2.tolist() == [[2, 7]] * 6
    bottom3 = (-out).topk(3, dim=-1).indices.sort(dim=-1).values
    assert bottom3.tolist() == [[0, 4, 9]] * 6


def test_steer_selection_scores_without_sets():
    scores = torch.rand(3, 4)
    out = steer_selection_scores(scores, [], [], 0.1)
    assert torch.equal(out, scores) and out.data_ptr() != scores.data_ptr()
