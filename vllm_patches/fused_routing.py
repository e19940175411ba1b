"""Steered routing in one pass: the SteerMoE edit, softmax, top-k and renormalisation.

`fused_steered_topk` returns what vLLM's `fused_topk` returns for the logits after
`steering_math.steer_router_logits`, without writing the edited logits anywhere:

* per token row t, profile p = token_profiles[t]; p == 0 rows are routed as they come;
* a steered row's max / min over its first E columns (E = layer_masks.shape[1]) are taken in
  float32; activated experts get `max + eff_eps`, deactivated ones `min - eff_eps`
  (`steering_math.effective_eps`), rounded once to the logits' dtype, exactly as the edit does;
  graded steering (optional `layer_bias` [P, E], `strength` [P]) moves them as the edit does
  (`steering_math`), rounded once;
* softmax in float32 over all columns (columns >= E are routed but never steered), top-k by
  repeated arg-max with ties going to the lowest expert id (vLLM's `topk_softmax` rule),
  weights in descending order, optionally renormalised over the k (this is also top-k then
  softmax over the k logits, the GPT-OSS router), then multiplied by `routed_scaling_factor`;
* optional grouped selection (DeepSeek-V2): group score = max probability in the group, the
  `topk_group` best groups are kept (ties to the lower group), top-k among their experts.

Returns (topk_weights float32 [T, k], topk_ids int32 [T, k]). Nothing reads device values on
the host, so a call can be captured in a CUDA graph; the per-token profile index and the mask
table are read on the device. Two implementations with one contract: a Triton kernel (CUDA,
or the CPU interpreter with TRITON_INTERPRET=1) and plain torch (`steered_topk_torch`).

NaN logits are not supported (vLLM's routing gives no defined answer for them either).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from vllm_patches.steering_math import effective_eps, graded_values, row_strength

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 2 * finfo(dtype).eps, a power of two, so multiplying by it in fp32 is exact (as in torch).
_RESOLUTION = {dt: 2.0 * torch.finfo(dt).eps for dt in _SUPPORTED_DTYPES}
# Kind of rounding of the edited values: 0 = none (fp32), 1 = bf16 (explicit RNE), 2 = fp16.
_CAST_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Elements of one program's [rows, experts] tile (more rows per program for few experts).
_TILE = 1024
_INTERPRET_TILE = 8192


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when triton imports and can run here (a CUDA device, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return torch.cuda.is_available() or _interpreting()


def _check_args(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
    top_k: int,
    num_expert_group: int | None,
    topk_group: int | None,
) -> None:
    """Shape and dtype checks (metadata only: no device value is read)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be 2-D [T, E'], got {tuple(router_logits.shape)}")
    if router_logits.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported router_logits dtype {router_logits.dtype}")
    num_tokens, num_cols = router_logits.shape
    if layer_masks.dim() != 2 or layer_masks.shape[1] > num_cols:
        raise ValueError(
            f"layer_masks must be [P, E] with E <= {num_cols}, got {tuple(layer_masks.shape)}"
        )
    if token_profiles.dim() != 1 or token_profiles.shape[0] < num_tokens:
        raise ValueError(
            f"token_profiles must be [>= {num_tokens}], got {tuple(token_profiles.shape)}"
        )
    if eps.dim() != 1 or eps.shape[0] < layer_masks.shape[0]:
        raise ValueError(f"eps must be [{layer_masks.shape[0]}], got {tuple(eps.shape)}")
    if not 1 <= top_k <= num_cols:
        raise ValueError(f"top_k must be in [1, {num_cols}], got {top_k}")
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError("give both num_expert_group and topk_group, or neither")
    if num_expert_group is not None:
        assert topk_group is not None
        if num_expert_group < 1 or num_cols % num_expert_group:
            raise ValueError(f"{num_cols} experts do not split into {num_expert_group} groups")
        if not 1 <= topk_group <= num_expert_group:
            raise ValueError(f"topk_group must be in [1, {num_expert_group}], got {topk_group}")
        if topk_group * (num_cols // num_expert_group) < top_k:
            raise ValueError(f"{topk_group} groups hold fewer than top_k={top_k} experts")


def _check_record(record: torch.Tensor | None, num_tokens: int, top_k: int) -> None:
    if record is None:
        return
    if (record.dim() != 2 or record.shape[0] < num_tokens or record.shape[1] < top_k
            or record.dtype != torch.int32 or record.stride(1) != 1):
        raise ValueError(f"record must be int32 [>= {num_tokens}, >= {top_k}], rows contiguous")


def _empty_outputs(
    num_tokens: int, top_k: int, device: torch.device, indices_type: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=indices_type or torch.int32, device=device)
    return weights, ids


# ---- plain torch ---------------------------------------------------------------------------


def steered_logits_fp32(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
    layer_bias: torch.Tensor | None = None,
    strength: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 copy of `steering_math.steer_router_logits(...)`, computed for every row.

    Same values as the edit (the edited entries rounded once to the logits' dtype), but with
    no data-dependent branch: rows with profile 0 read the all-zero mask row 0 and stay as
    they are. Graph-capturable.
    """
    num_tokens = router_logits.shape[0]
    num_experts = layer_masks.shape[1]
    dtype = router_logits.dtype
    profiles = token_profiles[:num_tokens].long()
    masks = layer_masks[profiles]
    x = router_logits.float()
    z = x[:, :num_experts]
    row_eps = eps[profiles].float().unsqueeze(1)
    z_max = z.amax(dim=1, keepdim=True)
    z_min = z.amin(dim=1, keepdim=True)
    high = z_max + effective_eps(row_eps, z_max, dtype)
    low = z_min - effective_eps(row_eps, z_min, dtype)
    # Unsteered rows read mask row 0, which a caller may have left non-zero: ignore it there.
    steered = profiles.unsqueeze(1) != 0
    masks = torch.where(steered, masks, torch.zeros_like(masks))
    bias = (torch.where(steered, layer_bias[profiles].float(), 0.0) if layer_bias is not None
            else torch.zeros_like(z))
    graded, touched = graded_values(z, masks, high, low, bias, row_strength(profiles, strength))
    edited = torch.where(touched, graded.to(dtype).float(), z)
    if num_experts == x.shape[1]:
        return edited
    return torch.cat([edited, x[:, num_experts:]], dim=1)


def _topk_lowest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along dim 1 of float32 scores >= 0 (or -1 for excluded entries), descending, ties
    to the lowest index.

    Selects on one int64 key per entry: the score's bits (ordered like the scores, as they are
    not negative) above the reversed index, so equal scores rank by index. One `topk`, no sort.
    """
    num_cols = scores.shape[1]
    bits = scores.view(torch.int32).long()
    reversed_index = num_cols - 1 - torch.arange(num_cols, device=scores.device)
    _, ids = torch.topk((bits << 32) | reversed_index, k, dim=1)
    return scores.gather(1, ids), ids


def route_softmax_topk(
    logits_fp32: torch.Tensor,
    top_k: int,
    renormalize: bool,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's softmax routing on float32 logits: (weights fp32 [T, k], ids int64 [T, k])."""
    probs = torch.softmax(logits_fp32, dim=-1)
    scores = probs
    if num_expert_group is not None:
        assert topk_group is not None
        num_tokens = probs.shape[0]
        group_scores = probs.view(num_tokens, num_expert_group, -1).amax(dim=-1)
        _, groups = _topk_lowest_index(group_scores, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        keep = keep.repeat_interleave(probs.shape[1] // num_expert_group, dim=1)
        scores = probs.masked_fill(~keep, -1.0)  # below every probability
    weights, ids = _topk_lowest_index(scores, top_k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids


def steered_topk_torch(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
    top_k: int,
    renormalize: bool,
    *,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    indices_type: torch.dtype | None = None,
    record: torch.Tensor | None = None,
    layer_bias: torch.Tensor | None = None,
    strength: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_steered_topk` in plain torch (any device; no host sync, graph-capturable)."""
    _check_args(router_logits, token_profiles, layer_masks, eps, top_k, num_expert_group,
                topk_group)
    _check_record(record, router_logits.shape[0], top_k)
    edited = steered_logits_fp32(router_logits, token_profiles, layer_masks, eps, layer_bias,
                                 strength)
    weights, ids = route_softmax_topk(
        edited, top_k, renormalize, num_expert_group, topk_group, routed_scaling_factor
    )
    if record is not None:
        record[: ids.shape[0], :top_k].copy_(ids)
    return weights, ids.to(indices_type or torch.int32)


# ---- Triton --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """Build (once) and return the jitted kernel; imports triton."""
    import triton
    import triton.language as tl

    # num_tokens changes every step: not specialising on it keeps one compiled variant per
    # BLOCK_T, so a variant warmed in an eager step is the one a CUDA-graph capture reuses.
    @triton.jit(do_not_specialize=["num_tokens"])
    def _fused_steered_topk_kernel(
        logits_ptr,
        weights_ptr,
        ids_ptr,
        record_ptr,
        profiles_ptr,
        masks_ptr,
        eps_ptr,
        bias_ptr,
        strength_ptr,
        num_tokens,
        num_cols,
        num_experts,
        group_size,
        scale,
        stride_lr,
        stride_lc,
        stride_wr,
        stride_ir,
        stride_rec,
        stride_p,
        stride_mr,
        stride_mc,
        stride_eps,
        stride_br,
        stride_bc,
        stride_s,
        TOP_K: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_E: tl.constexpr,
        RESOLUTION: tl.constexpr,
        CAST_KIND: tl.constexpr,
        RENORMALIZE: tl.constexpr,
        NUM_GROUPS: tl.constexpr,
        TOPK_GROUP: tl.constexpr,
        HAS_RECORD: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < num_tokens
        rows = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_E)
        in_row = cols[None, :] < num_cols
        is_expert = cols[None, :] < num_experts

        x = tl.load(
            logits_ptr + rows[:, None] * stride_lr + cols[None, :] * stride_lc,
            mask=row_ok[:, None] & in_row,
            other=0.0,
        )
        # Exact upcast to fp32 (bf16 by bit shift, so it is exact in the interpreter too).
        if CAST_KIND == 1:
            xf = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            xf = x.to(tl.float32)

        # ---- the edit: activated -> max + eps, deactivated -> min - eps (rounded to dtype)
        profile = tl.load(profiles_ptr + rows * stride_p, mask=row_ok, other=0).to(tl.int64)
        z_max = tl.max(tl.where(is_expert, xf, float("-inf")), axis=1)
        z_min = tl.min(tl.where(is_expert, xf, float("inf")), axis=1)
        row_eps = tl.load(eps_ptr + profile * stride_eps, mask=row_ok, other=0.0).to(tl.float32)
        high = z_max + tl.maximum(row_eps, RESOLUTION * tl.maximum(tl.abs(z_max), 1.0))
        low = z_min - tl.maximum(row_eps, RESOLUTION * tl.maximum(tl.abs(z_min), 1.0))
        # Unsteered rows and non-expert columns read mask 0 and bias 0 (leave), with no
        # memory traffic.
        steerable = cols[None, :] < tl.where(profile != 0, num_experts, 0)[:, None]
        mask_row = tl.load(
            masks_ptr + profile[:, None] * stride_mr + cols[None, :] * stride_mc,
            mask=steerable,
            other=0,
        )
        bias_row = tl.load(
            bias_ptr + profile[:, None] * stride_br + cols[None, :] * stride_bc,
            mask=steerable,
            other=0.0,
        ).to(tl.float32)
        lam = tl.load(strength_ptr + profile * stride_s, mask=row_ok, other=1.0).to(tl.float32)
        full = (lam == 1.0)[:, None]
        keep = (1.0 - lam)[:, None]
        lam2 = lam[:, None]
        hi = tl.where(full, high[:, None], keep * xf + lam2 * high[:, None])
        lo = tl.where(full, low[:, None], keep * xf + lam2 * low[:, None])
        g = tl.where(mask_row == 1, hi, tl.where(mask_row == -1, lo, xf + lam2 * bias_row))
        if CAST_KIND == 1:
            # fp32 -> bf16 round-to-nearest-even on the bits, and back to fp32 (exact).
            gb = g.to(tl.uint32, bitcast=True)
            gb = ((gb + 0x7FFF + ((gb >> 16) & 1)) >> 16) << 16
            g = gb.to(tl.float32, bitcast=True)
        elif CAST_KIND == 2:
            g = g.to(tl.float16).to(tl.float32)
        touched = (mask_row != 0) | (bias_row != 0.0)
        y = tl.where(touched, g, xf)
        y = tl.where(in_row, y, float("-inf"))

        # ---- softmax over all columns, in fp32 (as vLLM's topk_softmax)
        y_max = tl.max(y, axis=1)
        num = tl.exp(y - y_max[:, None])
        probs = num * (1.0 / tl.sum(num, axis=1))[:, None]
        scores = tl.where(in_row, probs, float("-inf"))

        # ---- optional grouped selection: keep the TOPK_GROUP groups with the best max
        if NUM_GROUPS > 0:
            group = cols[None, :] // group_size
            group_score = tl.full([BLOCK_T, BLOCK_E], -1.0, tl.float32)
            for g in tl.static_range(NUM_GROUPS):
                in_group = (group == g) & in_row
                best_in_group = tl.max(tl.where(in_group, probs, -1.0), axis=1)
                group_score = tl.where(in_group, best_in_group[:, None], group_score)
            kept = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.max(group_score, axis=1)
                chosen = tl.min(tl.where(group_score == best[:, None], group, NUM_GROUPS), axis=1)
                hit = group == chosen[:, None]
                kept = tl.where(hit, 1, kept)
                group_score = tl.where(hit, -2.0, group_score)
            scores = tl.where(kept != 0, scores, float("-inf"))

        # ---- top-k by repeated arg-max, ties to the lowest expert id
        slots = tl.arange(0, BLOCK_K)[None, :]
        top_w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
        top_i = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
        for i in tl.static_range(TOP_K):
            best = tl.max(scores, axis=1)
            pick = tl.min(tl.where(scores == best[:, None], cols[None, :], BLOCK_E), axis=1)
            top_w = tl.where(slots == i, best[:, None], top_w)
            top_i = tl.where(slots == i, pick[:, None], top_i)
            scores = tl.where(cols[None, :] == pick[:, None], float("-inf"), scores)
        if RENORMALIZE:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]
        top_w = top_w * scale

        out_mask = row_ok[:, None] & (slots < TOP_K)
        tl.store(weights_ptr + rows[:, None] * stride_wr + slots, top_w, mask=out_mask)
        tl.store(ids_ptr + rows[:, None] * stride_ir + slots, top_i, mask=out_mask)
        if HAS_RECORD:
            tl.store(record_ptr + rows[:, None] * stride_rec + slots, top_i, mask=out_mask)

    return _fused_steered_topk_kernel


def triton_variant(
    router_logits: torch.Tensor, top_k: int, *, grouped: bool, with_record: bool,
    indices_type: torch.dtype | None = None,
) -> tuple[Any, ...]:
    """What decides which compiled kernel a `steered_topk_triton` call launches, apart from
    the per-layer constants (experts, top-k, grouping, mask table): dtype, tile height, record,
    index dtype and the logits' strides and alignment. Callers that must not compile inside a
    CUDA-graph capture remember the variants they have launched outside one."""
    block_t, block_e, num_warps = _launch_shape(router_logits.shape[0], router_logits.shape[1])
    return (
        router_logits.dtype, block_t, block_e, num_warps, top_k, grouped, with_record,
        indices_type or torch.int32, tuple(router_logits.stride()),
        router_logits.data_ptr() % 16 == 0,
    )


def _launch_shape(num_tokens: int, num_cols: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps) for one launch."""
    import triton

    block_e = triton.next_power_of_2(num_cols)
    tile = _INTERPRET_TILE if _interpreting() else _TILE
    block_t = min(triton.next_power_of_2(max(num_tokens, 1)), max(1, tile // block_e))
    elements = block_t * block_e
    num_warps = 1 if elements <= 256 else (2 if elements <= 512 else 4)
    return block_t, block_e, num_warps


def steered_topk_triton(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
    top_k: int,
    renormalize: bool,
    *,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    indices_type: torch.dtype | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    record: torch.Tensor | None = None,
    layer_bias: torch.Tensor | None = None,
    strength: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_steered_topk` as one Triton launch; `out` = preallocated (weights, ids)."""
    _check_record(record, router_logits.shape[0], top_k)
    _check_args(router_logits, token_profiles, layer_masks, eps, top_k, num_expert_group,
                topk_group)
    num_tokens, num_cols = router_logits.shape
    if eps.dtype != torch.float32:
        eps = eps.float()
    if layer_bias is None:
        layer_bias = torch.zeros(layer_masks.shape, dtype=torch.float32,
                                 device=router_logits.device)
    if strength is None:
        strength = torch.ones(layer_masks.shape[0], dtype=torch.float32,
                              device=router_logits.device)
    if out is None:
        weights, ids = _empty_outputs(num_tokens, top_k, router_logits.device, indices_type)
    else:
        weights, ids = out
        if weights.shape != (num_tokens, top_k) or weights.dtype != torch.float32:
            raise ValueError(f"out weights must be float32 [{num_tokens}, {top_k}]")
        if ids.shape != (num_tokens, top_k) or ids.stride(1) != 1 or weights.stride(1) != 1:
            raise ValueError(f"out ids must be [{num_tokens}, {top_k}], rows contiguous")
    if num_tokens == 0:
        return weights, ids

    import triton

    block_t, block_e, num_warps = _launch_shape(num_tokens, num_cols)
    _kernel()[(triton.cdiv(num_tokens, block_t),)](
        router_logits,
        weights,
        ids,
        ids if record is None else record,
        token_profiles,
        layer_masks,
        eps,
        layer_bias,
        strength,
        num_tokens,
        num_cols,
        layer_masks.shape[1],
        num_cols // num_expert_group if num_expert_group else 1,
        float(routed_scaling_factor),
        router_logits.stride(0),
        router_logits.stride(1),
        weights.stride(0),
        ids.stride(0),
        0 if record is None else record.stride(0),
        token_profiles.stride(0),
        layer_masks.stride(0),
        layer_masks.stride(1),
        eps.stride(0),
        layer_bias.stride(0),
        layer_bias.stride(1),
        strength.stride(0),
        TOP_K=top_k,
        BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        RESOLUTION=_RESOLUTION[router_logits.dtype],
        CAST_KIND=_CAST_KIND[router_logits.dtype],
        RENORMALIZE=bool(renormalize),
        NUM_GROUPS=num_expert_group or 0,
        TOPK_GROUP=topk_group or 0,
        HAS_RECORD=record is not None,
        num_warps=num_warps,
    )
    return weights, ids


# ---- entry point ---------------------------------------------------------------------------


def fused_steered_topk(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
    top_k: int,
    renormalize: bool,
    *,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    indices_type: torch.dtype | None = None,
    record: torch.Tensor | None = None,
    backend: str = "auto",
    layer_bias: torch.Tensor | None = None,
    strength: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steered softmax top-k routing: (topk_weights fp32 [T, k], topk_ids int32 [T, k]).

    router_logits: [T, E'] fp32/bf16/fp16, any strides; all E' columns are routed, the first
        E = layer_masks.shape[1] can be steered.
    token_profiles: [>= T] int32/int64; entry t is token t's row of layer_masks, 0 = unsteered.
    layer_masks: [P, E] int8 (+1 activate, -1 deactivate, 0 leave); eps: [P] float32.
    layer_bias: optional [P, E] float32 graded bias; strength: optional [P] float32 (default:
        none and 1, the on/off edit).
    record: optional int32 [>= T, >= k] buffer (the routing-capture buffer of this layer): the
        ids are also written to its first T rows, so capturing routing costs no extra kernel.
    backend: "triton", "torch", or "auto" (Triton for CUDA tensors, and for CPU tensors under
        TRITON_INTERPRET=1; torch otherwise).
    """
    if backend == "auto":
        use_triton = (router_logits.is_cuda or _interpreting()) and triton_available()
        backend = "triton" if use_triton else "torch"
    kwargs: dict[str, Any] = dict(
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
        indices_type=indices_type,
        record=record,
        layer_bias=layer_bias,
        strength=strength,
    )
    if backend == "triton":
        return steered_topk_triton(
            router_logits, token_profiles, layer_masks, eps, top_k, renormalize, **kwargs
        )
    if backend == "torch":
        return steered_topk_torch(
            router_logits, token_profiles, layer_masks, eps, top_k, renormalize, **kwargs
        )
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
