"""The SteerMoE edit as plain torch: the one definition every other path is checked against.

No vLLM import here. The engine op (`steering_ops`), the Triton kernel and the Hugging Face
reference in the tests all compare against these functions.

Definition (SteerMoE, arXiv 2509.09660): for one token with router logits z over E experts,
s = log_softmax(z); experts to activate get s_e = max(s) + eps, experts to deactivate get
s_e = min(s) - eps; the model's own routing (softmax, top-k, renormalisation) then runs on s.

Because log_softmax(z) = z - logsumexp(z) only shifts the row, doing the same edit on z gives
a row that differs from the edited s by that same constant, so softmax and every top-k over
it are unchanged. `steer_router_logits` therefore edits the raw logits, which keeps the
untouched entries of a steered row bit-identical and costs no exp/log.

Rounding: a logit written back in bf16 must still be strictly above the old maximum (below
the old minimum). eps is therefore raised per row to twice the dtype's relative resolution at
the value it moves from: effective_eps = max(eps, 2 * finfo(dtype).eps * max(|v|, 1)). For
fp32 logits this never changes eps = 0.01; for bf16 logits around 5 it gives 0.078.

Graded steering (a profile's `bias`, a request's `steering_strength` lambda in [0, 1]): each
slot also carries a per-expert bias b and a strength lambda. In log-softmax space an activated
expert moves from s_e toward its target max(s) + eps by the fraction lambda,
s_e + lambda * (max(s) + eps - s_e) (deactivated: toward min(s) - eps), and a biased expert
gets s_e + lambda * b_e. lambda = 1 with no bias is the on/off edit above, bit for bit (the
interpolation is written (1 - lambda) * s + lambda * target, exact at both ends); lambda = 0
changes no value. Both moves commute with the shift of log_softmax, so the raw logits are
edited here too. Entries with no mask and no bias keep their bits.
"""

from __future__ import annotations

import torch

ACTIVATE = 1
DEACTIVATE = -1


def effective_eps(eps: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """eps raised so that `value +/- eps` stays distinct from `value` after rounding to dtype."""
    resolution = 2.0 * torch.finfo(dtype).eps
    return torch.maximum(eps, resolution * value.abs().clamp_min(1.0))


def _steered_rows(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
    layer_bias: torch.Tensor | None = None,
    strength: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(indices of steered rows, their edited first E columns in the input dtype), or None."""
    num_experts = layer_masks.shape[1]
    token_profiles = token_profiles[: router_logits.shape[0]]
    steered = token_profiles != 0
    if not bool(steered.any()):
        return None
    rows = steered.nonzero().squeeze(1)
    profiles = token_profiles[rows].long()
    masks = layer_masks[profiles]
    original = router_logits[rows, :num_experts]
    z = original.float()
    row_eps = eps[profiles].float().unsqueeze(1)
    z_max = z.amax(dim=1, keepdim=True)
    z_min = z.amin(dim=1, keepdim=True)
    high = z_max + effective_eps(row_eps, z_max, router_logits.dtype)
    low = z_min - effective_eps(row_eps, z_min, router_logits.dtype)
    if layer_bias is None and strength is None:
        edited = torch.where(masks == ACTIVATE, high, torch.where(masks == DEACTIVATE, low, z))
        return rows, torch.where(masks != 0, edited.to(router_logits.dtype), original)
    bias = layer_bias[profiles].float() if layer_bias is not None else torch.zeros_like(z)
    edited, touched = graded_values(z, masks, high, low, bias, row_strength(profiles, strength))
    return rows, torch.where(touched, edited.to(router_logits.dtype), original)


def row_strength(profiles: torch.Tensor, strength: torch.Tensor | None) -> torch.Tensor:
    """[R, 1] float32: each row's strength (1 without a strength table)."""
    if strength is None:
        return torch.ones(len(profiles), 1, device=profiles.device)
    return strength[profiles].float().unsqueeze(1)


def graded_values(z: torch.Tensor, masks: torch.Tensor, high: torch.Tensor, low: torch.Tensor,
                  bias: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(edited values, touched entries) of float32 rows z [R, E]: activated entries move to
    (1 - lam) * z + lam * high, deactivated ones toward low, biased ones to z + lam * bias
    (`high`, `low`, `lam`: [R, 1]; exactly `high` / `low` at lam = 1). The one definition of
    graded steering in torch; the Triton kernels write the same per element."""
    full = lam == 1.0
    keep = 1.0 - lam
    high = torch.where(full, high, keep * z + lam * high)
    low = torch.where(full, low, keep * z + lam * low)
    edited = torch.where(masks == ACTIVATE, high,
                         torch.where(masks == DEACTIVATE, low, z + lam * bias))
    return edited, (masks != 0) | (bias != 0)


def steer_router_logits(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
    layer_bias: torch.Tensor | None = None,
    strength: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return router logits with each token's steering applied.

    router_logits: [T, E'] float (any float dtype); only the first E columns are experts
        that can be steered (E = layer_masks.shape[1]); extra columns pass through.
    token_profiles: [>= T] integer; row p of layer_masks applies to token t; 0 = not steered.
    layer_masks: [P, E] int8; +1 activate, -1 deactivate, 0 leave; row 0 is all zero.
    eps: [P] float32, the margin per profile.
    layer_bias: optional [P, E] float32, graded bias per profile and expert (None: none).
    strength: optional [P] float32 in [0, 1], each profile's lambda (None: 1).
    Rows with profile 0, and entries with no mask and no bias, are returned bit-identical.
    """
    out = router_logits.clone()
    steered = _steered_rows(router_logits, token_profiles, layer_masks, eps, layer_bias,
                            strength)
    if steered is not None:
        rows, edited = steered
        out[rows, : layer_masks.shape[1]] = edited
    return out


def steer_router_logits_(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
    layer_bias: torch.Tensor | None = None,
    strength: torch.Tensor | None = None,
) -> None:
    """In-place `steer_router_logits`: only steered rows are written."""
    steered = _steered_rows(router_logits, token_profiles, layer_masks, eps, layer_bias,
                            strength)
    if steered is not None:
        rows, edited = steered
        router_logits[rows, : layer_masks.shape[1]] = edited


def steer_log_probs(
    router_logits: torch.Tensor,
    activate: list[int],
    deactivate: list[int],
    eps: float,
    bias: dict[int, float] | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """The method exactly as the paper states it, for one layer and all rows: edited log-probs,
    with graded steering (`bias` per expert, `strength`) as this module's docstring defines it.

    Used as the reference in tests (softmax of the result = the routing probabilities the
    paper's implementation sees). Computes in float32.
    """
    s = torch.log_softmax(router_logits.float(), dim=-1)
    s_max = s.amax(dim=-1, keepdim=True)
    s_min = s.amin(dim=-1, keepdim=True)
    out = s.clone()
    if activate:
        out[:, activate] = (1 - strength) * s[:, activate] + strength * (s_max + eps)
    if deactivate:
        out[:, deactivate] = (1 - strength) * s[:, deactivate] + strength * (s_min - eps)
    for expert, value in (bias or {}).items():
        out[:, expert] = s[:, expert] + strength * value
    return out


def steer_selection_scores(
    scores: torch.Tensor,
    activate: list[int],
    deactivate: list[int],
    eps: float,
) -> torch.Tensor:
    """The edit on selection scores of a non-softmax router (sigmoid + bias, sparsemixer input).

    For routers whose selection is not a softmax of the logits, steering is defined on the
    scores the router ranks experts by: activated experts rank above every other expert,
    deactivated ones below. See `vllm_patches/ROUTERS.md`.
    """
    out = scores.float().clone()
    s_max = out.amax(dim=-1, keepdim=True)
    s_min = out.amin(dim=-1, keepdim=True)
    if activate:
        out[:, activate] = (s_max + eps).expand(-1, len(activate))
    if deactivate:
        out[:, deactivate] = (s_min - eps).expand(-1, len(deactivate))
    return out
