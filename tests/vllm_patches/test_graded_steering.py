"""Graded steering (per-expert bias, per-request strength) in every implementation of the edit.

The reference is the paper's log-softmax form (`steer_log_probs` with bias and strength),
written independently of the logit-space edit: both must give the same routing distribution.
The Triton kernels run in Triton's CPU interpreter here (TRITON_INTERPRET=1) and on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from vllm_patches.steering_math import steer_log_probs, steer_router_logits

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_patches import fused_routing  # noqa: E402
from vllm_patches.triton_steering import steer_router_logits_triton, triton_available  # noqa: E402

E = 16
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tables(strength: float, dtype_seed: int = 0):
    """Profiles 1 (on/off + bias) and 2 (bias only) at `strength`; row 0 unsteered."""
    masks = torch.zeros(3, E, dtype=torch.int8)
    masks[1, 3] = 1
    masks[1, [0, 5]] = -1
    bias = torch.zeros(3, E)
    bias[1, 7] = 1.5
    bias[1, 9] = -2.0
    bias[2, [2, 4]] = torch.tensor([0.75, 3.0])
    eps = torch.tensor([0.0, 0.01, 0.05])
    lam = torch.tensor([1.0, strength, strength])
    return masks, bias, eps, lam


def logits_for(num_tokens: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, E, generator=g) * 3).to(dtype)


PROFILES = torch.tensor([1, 0, 2, 1, 2, 0, 1, 2], dtype=torch.int32)


def reference_probs(row: torch.Tensor, profile: int, masks, bias, eps, lam) -> torch.Tensor:
    if profile == 0:
        return torch.softmax(row.float(), dim=-1)
    activate = (masks[profile] == 1).nonzero().flatten().tolist()
    deactivate = (masks[profile] == -1).nonzero().flatten().tolist()
    graded = {e: float(bias[profile, e]) for e in bias[profile].nonzero().flatten().tolist()}
    s = steer_log_probs(row[None].float(), activate, deactivate, float(eps[profile]), graded,
                        float(lam[profile]))
    return torch.softmax(s, dim=-1)[0]


@pytest.mark.parametrize("strength", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_logit_edit_is_the_log_softmax_definition(strength):
    masks, bias, eps, lam = tables(strength)
    logits = logits_for(len(PROFILES), torch.float32)
    edited = steer_router_logits(logits, PROFILES, masks, eps, bias, lam)
    for t, profile in enumerate(PROFILES.tolist()):
        expected = reference_probs(logits[t], profile, masks, bias, eps, lam)
        torch.testing.assert_close(torch.softmax(edited[t], dim=-1), expected, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_strength_without_bias_is_the_on_off_edit_bit_for_bit(dtype):
    masks, _, eps, lam = tables(1.0)
    logits = logits_for(len(PROFILES), dtype)
    on_off = steer_router_logits(logits, PROFILES, masks, eps)
    graded = steer_router_logits(logits, PROFILES, masks, eps, torch.zeros(3, E), lam)
    assert torch.equal(graded.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       on_off.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strength_zero_changes_no_value_and_untouched_entries_keep_their_bits(dtype):
    masks, bias, eps, lam = tables(0.0)
    logits = logits_for(len(PROFILES), dtype)
    logits[0, 0] = -0.0
    edited = steer_router_logits(logits, PROFILES, masks, eps, bias, lam)
    assert torch.equal(edited, logits)
    masks, bias, eps, lam = tables(0.5)
    edited = steer_router_logits(logits, PROFILES, masks, eps, bias, lam)
    touched = (masks[PROFILES.long()] != 0) | (bias[PROFILES.long()] != 0)
    assert torch.equal(edited[~touched], logits[~touched])
    assert not torch.equal(edited[touched], logits[touched])


def test_activated_probability_grows_with_strength():
    masks, _, eps, _ = tables(1.0)
    bias = torch.zeros(3, E)  # no other expert rises with it
    logits = logits_for(64, torch.float32, seed=3)
    profiles = torch.ones(64, dtype=torch.int32)
    previous = None
    for strength in torch.linspace(0, 1, 11).tolist():
        lam = torch.tensor([1.0, strength, strength])
        probs = torch.softmax(steer_router_logits(logits, profiles, masks, eps, bias, lam), -1)
        share = probs[:, 3]
        if previous is not None:
            assert bool((share >= previous - 1e-7).all())
        previous = share
    assert bool((previous == probs.amax(dim=-1)).all())


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_triton_edit_kernel_matches_steering_math(dtype, strength):
    masks, bias, eps, lam = (t.to(DEVICE) for t in tables(strength))
    logits = logits_for(len(PROFILES), dtype).to(DEVICE)
    profiles = PROFILES.to(DEVICE)
    expected = steer_router_logits(logits, profiles, masks, eps, bias, lam)
    got = steer_router_logits_triton(logits, profiles, masks, eps, layer_bias=bias, strength=lam)
    if strength in (0.0, 1.0) or DEVICE == "cpu":  # no multiply-add to fuse at the ends
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=torch.finfo(dtype).eps, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strength", [0.4, 1.0])
@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_routing_is_the_graded_edit_then_top_k(dtype, strength, renormalize):
    masks, bias, eps, lam = (t.to(DEVICE) for t in tables(strength))
    logits = logits_for(len(PROFILES), dtype, seed=1).to(DEVICE)
    profiles = PROFILES.to(DEVICE)
    edited = steer_router_logits(logits, profiles, masks, eps, bias, lam).float()
    probs = torch.softmax(edited, dim=-1)
    expected_w, expected_ids = probs.topk(2, dim=-1)
    if renormalize:
        expected_w = expected_w / expected_w.sum(dim=-1, keepdim=True)
    for backend in ("torch", "triton"):
        weights, ids = fused_routing.fused_steered_topk(
            logits, profiles, masks, eps, 2, renormalize, backend=backend, layer_bias=bias,
            strength=lam)
        assert torch.equal(ids.long(), expected_ids), backend
        torch.testing.assert_close(weights, expected_w, rtol=1e-5, atol=1e-6)


def test_bias_moves_an_expert_into_the_top_k_only_when_large_enough():
    logits = torch.zeros(1, E)
    logits[0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    masks = torch.zeros(2, E, dtype=torch.int8)
    eps = torch.tensor([0.0, 0.01])
    profiles = torch.tensor([1], dtype=torch.int32)
    for value, selected in ((1.5, False), (2.5, True)):
        bias = torch.zeros(2, E)
        bias[1, 3] = value
        edited = steer_router_logits(logits, profiles, masks, eps, bias, torch.ones(2))
        assert (3 in edited[0].topk(2).indices.tolist()) is selected
