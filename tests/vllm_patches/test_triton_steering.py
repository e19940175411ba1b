"""The Triton steering kernel against `steering_math.steer_router_logits`, bit for bit.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set below
before anything can build the kernel). The interpreter runs one program per row in numpy,
so sizes are chosen to keep the module well under a minute on two cores.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must happen before the kernel is built (triton decides interpreter vs compiler then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vllm_patches.steering_math import steer_router_logits  # noqa: E402
from vllm_patches.triton_steering import (  # noqa: E402
    steer_router_logits_triton,
    triton_available,
)

pytestmark = pytest.mark.skipif(
    not triton_available(),
    reason="triton is not installed, or there is no CUDA device and TRITON_INTERPRET != 1",
)

# Interpreter mode runs on CPU tensors; compiled mode needs CUDA tensors.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOP_K = 8


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so NaN payloads and -0.0 compare too)."""
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def _inputs(
    num_tokens: int,
    num_experts: int,
    num_profiles: int,
    dtype: torch.dtype,
    *,
    extra_cols: int = 0,
    steered_fraction: float = 0.5,
    scale: float = 3.0,
    seed: int = 0,
    device: str = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits [T, E + extra], profiles [T], masks [P + 1, E] (row 0 zero), eps [P + 1]."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, num_experts + extra_cols, generator=g) * scale).to(dtype)
    profiles = torch.randint(1, num_profiles + 1, (num_tokens,), generator=g, dtype=torch.int32)
    unsteered = torch.rand(num_tokens, generator=g) >= steered_fraction
    profiles[unsteered] = 0
    masks = torch.zeros(num_profiles + 1, num_experts, dtype=torch.int8)
    for p in range(1, num_profiles + 1):
        perm = torch.randperm(num_experts, generator=g)
        n_act = int(torch.randint(0, min(TOP_K, num_experts) + 1, (1,), generator=g))
        n_deact = int(torch.randint(0, num_experts - n_act + 1, (1,), generator=g))
        masks[p, perm[:n_act]] = 1
        masks[p, perm[n_act : n_act + n_deact]] = -1
    eps = torch.rand(num_profiles + 1, generator=g) * 0.1
    eps[0] = 0.01
    return logits.to(device), profiles.to(device), masks.to(device), eps.to(device)


def _check(
    logits: torch.Tensor,
    profiles: torch.Tensor,
    masks: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """Assert the kernel matches the reference bit for bit; return the kernel's output."""
    expected = steer_router_logits(logits, profiles, masks, eps)
    got = steer_router_logits_triton(logits, profiles, masks, eps)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got, expected), (got != expected).nonzero()[:10].tolist()
    assert torch.equal(_bits(got), _bits(expected))
    # Columns past the steerable experts and rows with profile 0 are copied unchanged.
    num_experts = masks.shape[1]
    assert torch.equal(_bits(got[:, num_experts:]), _bits(logits[:, num_experts:]))
    assert torch.equal(_bits(got[profiles == 0]), _bits(logits[profiles == 0]))
    return got


def _check_topk(
    steered: torch.Tensor, profiles: torch.Tensor, masks: torch.Tensor, k: int = TOP_K
) -> int:
    """Top-k over each steered row picks every activated expert and no deactivated one.

    Checked where it is well defined: #activated <= k <= #not-deactivated. Returns the number
    of rows checked.
    """
    num_experts = masks.shape[1]
    k = min(k, num_experts)
    idx = torch.topk(steered[:, :num_experts].float(), k, dim=-1).indices.cpu()
    checked = 0
    for row, p in enumerate(profiles.cpu().tolist()):
        if p == 0:
            continue
        mask = masks[p].cpu()
        act = set((mask == 1).nonzero().flatten().tolist())
        deact = set((mask == -1).nonzero().flatten().tolist())
        if len(act) > k or num_experts - len(deact) < k:
            continue
        picked = set(idx[row].tolist())
        assert act <= picked, (row, act - picked)
        assert not (deact & picked), (row, deact & picked)
        checked += 1
    return checked


# (T, E, extra trailing columns, P): every T, E and P from the brief, crossed sparsely to keep
# the interpreter's row count modest.
SHAPES = [
    (1, 8, 0, 1),
    (1, 256, 3, 9),
    (7, 60, 4, 3),
    (7, 128, 0, 1),
    (64, 64, 0, 9),
    (64, 8, 5, 3),
    (64, 256, 0, 3),
    (300, 128, 2, 9),
    (300, 60, 0, 1),
    (7, 512, 0, 3),
    (3, 512, 1, 9),  # E' = 513: BLOCK_E = 1024
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}+{}-P{}".format(*s))
def test_matches_reference(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    num_tokens, num_experts, extra, num_profiles = shape
    args = _inputs(num_tokens, num_experts, num_profiles, dtype, extra_cols=extra, seed=num_tokens)
    got = _check(*args)
    _check_topk(got, args[1], args[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_all_profiles_zero_is_a_copy(dtype: torch.dtype) -> None:
    logits, profiles, masks, eps = _inputs(64, 64, 3, dtype, extra_cols=2, steered_fraction=0.0)
    masks[0] = 1  # even a non-zero mask row 0 must not touch rows with profile 0
    assert not bool(profiles.any())
    got = steer_router_logits_triton(logits, profiles, masks, eps)
    assert got.data_ptr() != logits.data_ptr()
    assert torch.equal(_bits(got), _bits(logits))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_all_rows_steered(dtype: torch.dtype) -> None:
    logits, profiles, masks, eps = _inputs(64, 128, 3, dtype, steered_fraction=1.0, seed=3)
    assert bool((profiles != 0).all())
    got = _check(logits, profiles, masks, eps)
    assert _check_topk(got, profiles, masks) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_ties(dtype: torch.dtype) -> None:
    """Duplicate maxima / minima, including activating one of several tied maxima."""
    num_experts = 16
    logits = torch.zeros(4, num_experts + 1)
    logits[0] = torch.tensor([2.0] * 4 + [1.0] * 4 + [-3.0] * 9)  # tied max and min
    logits[1] = torch.tensor([1.5] * (num_experts + 1))  # all equal
    logits[2, :] = -0.0
    logits[2, 5] = 0.0  # +/-0 as max
    logits[3] = torch.arange(num_experts + 1.0)
    logits[3, :3] = float(num_experts - 1)  # ties with the last expert
    masks = torch.zeros(3, num_experts, dtype=torch.int8)
    masks[1, [0, 10]] = 1
    masks[1, [1, 12, 13]] = -1
    masks[2, [4, 5]] = 1
    masks[2, 15] = -1
    profiles = torch.tensor([1, 1, 2, 2], dtype=torch.int32)
    eps = torch.tensor([0.01, 0.01, 0.0])  # eps 0: only the dtype resolution separates them
    args = (logits.to(dtype).to(DEVICE), profiles.to(DEVICE), masks.to(DEVICE), eps.to(DEVICE))
    got = _check(*args)
    assert _check_topk(got, profiles, masks, k=2) == 4


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("num_experts", [64, 256])
def test_activate_top_k_deactivate_many(dtype: torch.dtype, num_experts: int) -> None:
    """A profile that forces exactly top_k experts on and switches most of the rest off."""
    logits, profiles, masks, eps = _inputs(64, num_experts, 2, dtype, steered_fraction=0.7)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(num_experts, generator=g)
    masks[1] = 0
    masks[1, perm[:TOP_K]] = 1
    masks[1, perm[TOP_K : num_experts - TOP_K]] = -1  # all but 2 * top_k switched off
    masks[2] = 0
    masks[2, perm[: TOP_K // 2]] = 1
    masks[2, perm[TOP_K // 2 :]] = -1  # everything else off
    masks = masks.to(DEVICE)
    got = _check(logits, profiles, masks, eps)
    checked = _check_topk(got, profiles, masks)
    assert checked == int((profiles == 1).sum())  # profile 2 has too many off for top-8
    # With exactly top_k activated, top-k is exactly the activated set.
    rows = (profiles == 1).nonzero().flatten()
    picked = torch.topk(got[rows, :num_experts].float(), TOP_K, dim=-1).indices.sort().values
    assert torch.equal(picked.cpu(), perm[:TOP_K].sort().values.expand(len(rows), -1))


def test_large_bf16_logits_raise_eps() -> None:
    """|z| ~ 50 in bf16: eps 0.01 is below the spacing, the raised eps keeps the edit strict."""
    logits, profiles, masks, eps = _inputs(
        64, 128, 3, torch.bfloat16, scale=50.0, steered_fraction=0.8, seed=5
    )
    logits[:8, 0] = 50.0  # rows whose max sits exactly on a bf16 value with spacing 0.25
    eps.fill_(0.01)
    got = _check(logits, profiles, masks, eps)
    assert float(logits.float().abs().max()) > 100.0
    num_experts = masks.shape[1]
    z = logits[:, :num_experts].float()
    out = got[:, :num_experts].float()
    for row, p in enumerate(profiles.cpu().tolist()):
        mask = masks[p]
        if p == 0:
            continue
        if bool((mask == 1).any()):
            assert bool((out[row, mask == 1] > z[row].max()).all()), row
            assert bool((out[row, mask != 1] < out[row, mask == 1].min()).all()), row
        if bool((mask == -1).any()):
            assert bool((out[row, mask == -1] < z[row].min()).all()), row
    assert _check_topk(got, profiles, masks) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_strided_inputs_and_out(dtype: torch.dtype) -> None:
    """Row stride > E', a column-major view, an explicit `out`, and steering in place."""
    num_experts = 60
    base, profiles, masks, eps = _inputs(64, num_experts + 36, 3, dtype, seed=7)
    masks = masks[:, :num_experts].contiguous()
    logits = base[:, : num_experts + 4]  # E' = 64 columns, row stride 96
    assert logits.stride(0) == num_experts + 36 and not logits.is_contiguous()
    expected = steer_router_logits(logits, profiles, masks, eps)
    got = _check(logits, profiles, masks, eps)

    column_major = logits.t().contiguous().t()
    assert column_major.stride(1) != 1
    assert torch.equal(
        _bits(steer_router_logits_triton(column_major, profiles, masks, eps)), _bits(expected)
    )

    out = torch.full_like(got, 7.0)
    ret = steer_router_logits_triton(logits, profiles, masks.t().contiguous().t(), eps, out=out)
    assert ret is out and torch.equal(_bits(out), _bits(expected))

    before = base.clone()
    steer_router_logits_triton(logits, profiles, masks, eps, out=logits)  # in place, in `base`
    assert torch.equal(_bits(logits), _bits(expected))
    assert torch.equal(_bits(base[:, num_experts + 4 :]), _bits(before[:, num_experts + 4 :]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow/NaN in the interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_nan_and_inf_rows(dtype: torch.dtype) -> None:
    """Non-finite logits give the reference's values (NaN compared as NaN, see below)."""
    num_experts = 16
    logits, _, _, _ = _inputs(6, num_experts, 1, dtype, seed=11)
    logits[0, 3] = float("nan")
    logits[1, 2] = float("inf")
    logits[2, 5] = float("-inf")
    logits[3, :] = float("-inf")
    logits[4, :] = torch.finfo(dtype).max  # max + eps overflows to inf, as in torch
    logits[5, :] = torch.finfo(dtype).min
    profiles = torch.ones(6, dtype=torch.int32, device=DEVICE)
    masks = torch.zeros(2, num_experts, dtype=torch.int8, device=DEVICE)
    masks[1, 0] = 1
    masks[1, 1] = -1
    eps = torch.tensor([0.0, 0.01], device=DEVICE)
    expected = steer_router_logits(logits, profiles, masks, eps)
    got = steer_router_logits_triton(logits, profiles, masks, eps)
    # torch's own bf16 cast may rewrite NaN payloads (the reference round-trips untouched
    # entries through fp32), so NaN positions are compared, not NaN bits.
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(_bits(got[finite]), _bits(expected[finite]))
    # The kernel keeps an untouched NaN's original bits.
    assert torch.equal(_bits(got[0, 3]), _bits(logits[0, 3]))


def test_profiles_buffer_longer_than_tokens() -> None:
    """A persistent profile buffer longer than T (as under CUDA graphs): only [:T] is read."""
    logits, profiles, masks, eps = _inputs(16, 64, 3, torch.bfloat16, seed=13)
    buffer = torch.cat([profiles, torch.full((9,), 2, dtype=torch.int32, device=DEVICE)])
    strided = torch.stack([buffer, torch.zeros_like(buffer)], dim=1)[:, 0]  # stride 2
    expected = steer_router_logits(logits, profiles, masks, eps)
    for prof in (buffer, strided):
        assert torch.equal(
            _bits(steer_router_logits_triton(logits, prof, masks, eps)), _bits(expected)
        )
    assert torch.equal(steer_router_logits(logits, buffer, masks, eps), expected)


def test_rejects_bad_shapes() -> None:
    logits, profiles, masks, eps = _inputs(4, 8, 1, torch.float32)
    with pytest.raises(ValueError):
        steer_router_logits_triton(logits[:, :4], profiles, masks, eps)
    with pytest.raises(ValueError):
        steer_router_logits_triton(logits, profiles[:3], masks, eps)
    with pytest.raises(ValueError):
        steer_router_logits_triton(logits, profiles, masks, eps[:1])
    with pytest.raises(TypeError):
        steer_router_logits_triton(logits.double(), profiles, masks, eps)
    with pytest.raises(ValueError):
        steer_router_logits_triton(logits, profiles, masks, eps, out=logits.double())
    empty = logits[:0]
    assert steer_router_logits_triton(empty, profiles[:0], masks, eps).shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_reference_cuda(dtype: torch.dtype) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernel would be interpreted, not compiled")
    for num_tokens, num_experts, extra, num_profiles in [*SHAPES, (16384, 512, 0, 9)]:
        args = _inputs(
            num_tokens, num_experts, num_profiles, dtype, extra_cols=extra, device="cuda"
        )
        got = _check(*args)
        _check_topk(got[:512], args[1][:512], args[2])
    # CUDA-graph capture: no host sync inside the launcher.
    logits, profiles, masks, eps = _inputs(256, 128, 3, dtype, device="cuda")
    out = torch.empty_like(logits)
    steer_router_logits_triton(logits, profiles, masks, eps, out=out)  # compile outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steer_router_logits_triton(logits, profiles, masks, eps, out=out)
    profiles.copy_(torch.roll(profiles, 1))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, steer_router_logits(logits, profiles, masks, eps))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_op_skips_idle_eager_steps_and_is_always_in_a_graph() -> None:
    """The registered op the engine calls: nothing on an idle eager step; inside a CUDA-graph
    capture the kernel is recorded anyway and the profile buffer decides at replay. The kernel
    is compiled before the capture, as `fused_steered_routing.install_fused_routing` does at
    load time (Triton cannot load a kernel while a stream is being captured)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernel would be interpreted, not compiled")
    from types import SimpleNamespace

    from vllm_patches import steering_ops
    from vllm_patches.fused_steered_routing import precompile_edit_kernel
    from vllm_patches.vllm_compat.layer_lookup import forward_context_of

    original, profiles, masks, eps = _inputs(64, 64, 3, torch.bfloat16, device="cuda")
    bias = torch.zeros(masks.shape, device="cuda")
    strength = torch.ones(masks.shape[0], device="cuda")
    buffer = torch.zeros(256, dtype=torch.int32, device="cuda")
    name = "model.layers.1.mlp.experts"
    layer = SimpleNamespace(layer_name=name, flags=steering_ops.StepFlags(), rerouter=None)
    logits = original.clone()
    with forward_context_of(layer):
        torch.ops.steermoe.steer_router_logits_(logits, buffer, masks, eps, bias, strength, name)
    assert torch.equal(logits, original)
    precompile_edit_kernel(SimpleNamespace(token_profiles=buffer, masks=masks, eps=eps, bias=bias,
                                           strength=strength), 64)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with forward_context_of(layer), torch.cuda.graph(graph):
        torch.ops.steermoe.steer_router_logits_(logits, buffer, masks, eps, bias, strength, name)
    for source in (torch.zeros_like(profiles), profiles):
        buffer[:64].copy_(source)
        logits.copy_(original)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(logits, steer_router_logits(original, source, masks, eps))
