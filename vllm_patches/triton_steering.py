"""The SteerMoE router-logit edit as one Triton kernel (one program per token row).

Same contract as `steering_math.steer_router_logits` (bit for bit for on/off steering; graded
values to one rounding, see below):

* rows whose profile is 0 are copied unchanged;
* a steered row's max / min over its first E columns are taken in float32 from the original
  row; activated experts get `max + eff_eps`, deactivated ones `min - eff_eps`, where
  `eff_eps = max(eps, 2 * finfo(dtype).eps * max(|v|, 1))` (`steering_math.effective_eps`),
  rounded once to the logits' dtype; every other entry keeps its original bits.
* graded steering (optional `layer_bias` [P, E] and `strength` [P]): activated / deactivated
  entries become `(1 - lambda) * z + lambda * target`, biased ones `z + lambda * b`, rounded once;
  at lambda = 1 without bias the bits are the on/off edit's. Between the ends a GPU may fuse
  the multiply-add, so graded values agree with `steering_math` to one rounding, not bit for
  bit.

The kernel reads everything it needs (which rows are steered, which mask row applies) from
device tensors, so a launch does no host synchronisation and can be captured in a CUDA graph.

bf16 rounding is written out as integer round-to-nearest-even (what torch's `.to(bfloat16)`
does) rather than left to `tl.cast`: Triton's CPU interpreter truncates fp32 -> bf16, and the
explicit form gives the same bits on the interpreter and on a GPU. fp16 uses the native cast,
which rounds to nearest even on both.

Triton is imported lazily: the module imports on machines without it, and the kernel is
built on first use, so `TRITON_INTERPRET=1` set before that first call takes effect.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 2 * finfo(dtype).eps, a power of two, so multiplying by it in fp32 is exact (as in torch).
_RESOLUTION = {dt: 2.0 * torch.finfo(dt).eps for dt in _SUPPORTED_DTYPES}
# Kind of final cast: 0 = none (fp32), 1 = explicit bf16 round-to-nearest-even, 2 = fp16.
_CAST_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def triton_available() -> bool:
    """True when triton imports and can run here (a CUDA device, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """Build (once) and return the jitted kernel; imports triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _steer_router_logits_kernel(
        logits_ptr,
        out_ptr,
        profiles_ptr,
        masks_ptr,
        eps_ptr,
        bias_ptr,
        strength_ptr,
        stride_p,
        stride_eps,
        stride_br,
        stride_bc,
        stride_s,
        num_cols,
        num_experts,
        stride_lr,
        stride_lc,
        stride_or,
        stride_oc,
        stride_mr,
        stride_mc,
        RESOLUTION: tl.constexpr,
        CAST_KIND: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_E)
        in_row = cols < num_cols
        is_expert = cols < num_experts

        x = tl.load(logits_ptr + row * stride_lr + cols * stride_lc, mask=in_row, other=0.0)
        profile = tl.load(profiles_ptr + row * stride_p).to(tl.int64)
        steered = profile != 0

        # Exact upcast to fp32 (bf16 by bit shift, so it is exact in the interpreter too).
        if CAST_KIND == 1:
            xf = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            xf = x.to(tl.float32)

        z_max = tl.max(tl.where(is_expert, xf, float("-inf")), axis=0)
        z_min = tl.min(tl.where(is_expert, xf, float("inf")), axis=0)
        # torch.amax/amin propagate NaN; tl.max/tl.min on a GPU may not.
        has_nan = tl.max(tl.where(is_expert, (xf != xf).to(tl.int32), 0), axis=0) > 0
        z_max = tl.where(has_nan, float("nan"), z_max)
        z_min = tl.where(has_nan, float("nan"), z_min)

        row_eps = tl.load(eps_ptr + profile * stride_eps).to(tl.float32)
        eps_hi = tl.maximum(row_eps, RESOLUTION * tl.maximum(tl.abs(z_max), 1.0))
        eps_lo = tl.maximum(row_eps, RESOLUTION * tl.maximum(tl.abs(z_min), 1.0))
        high = z_max + eps_hi
        low = z_min - eps_lo

        # Unsteered rows and non-expert columns read mask 0 and bias 0 (leave). One comparison
        # builds the load mask: the interpreter mis-types `block & scalar` boolean masks.
        steerable = cols < tl.where(steered, num_experts, 0)
        mask_row = tl.load(
            masks_ptr + profile * stride_mr + cols * stride_mc, mask=steerable, other=0
        )
        bias_row = tl.load(
            bias_ptr + profile * stride_br + cols * stride_bc, mask=steerable, other=0.0
        ).to(tl.float32)
        lam = tl.load(strength_ptr + profile * stride_s).to(tl.float32)
        activate = mask_row == 1
        deactivate = mask_row == -1
        keep = 1.0 - lam
        full = lam == 1.0
        yf = tl.where(activate, tl.where(full, high, keep * xf + lam * high),
                      tl.where(deactivate, tl.where(full, low, keep * xf + lam * low),
                               xf + lam * bias_row))

        if CAST_KIND == 1:
            # fp32 -> bf16 round-to-nearest-even on the bits, NaN -> canonical 0x7FC0 (as torch).
            yb = yf.to(tl.uint32, bitcast=True)
            yb = (yb + 0x7FFF + ((yb >> 16) & 1)) >> 16
            yb = tl.where(yf != yf, 0x7FC0, yb)
            y_out = yb.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        elif CAST_KIND == 2:
            y_out = yf.to(tl.float16)
        else:
            y_out = yf

        touched = activate | deactivate | (bias_row != 0.0)
        y = tl.where(touched, y_out, x)
        tl.store(out_ptr + row * stride_or + cols * stride_oc, y, mask=in_row)

    return _steer_router_logits_kernel


def _num_warps(block_e: int) -> int:
    return 1 if block_e <= 256 else (2 if block_e <= 1024 else 4)


def steer_router_logits_triton(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    layer_bias: torch.Tensor | None = None,
    strength: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `steering_math.steer_router_logits`; same arguments, same bits.

    router_logits: [T, E'] fp32/bf16/fp16, any strides; columns >= E pass through.
    token_profiles: [>= T] int32 (int64 also accepted); entry t is token t's profile, 0 =
        unsteered; a longer (persistent, graph-captured) buffer is fine, only [:T] is read.
    layer_masks: [P, E] int8 (+1 activate, -1 deactivate, 0 leave).
    eps: [P] float32.
    out: optional [T, E'] tensor of the same dtype to write into (may be router_logits itself);
        otherwise a new tensor laid out like `router_logits.clone()` is returned.
    layer_bias: optional [P, E] float32 graded bias; strength: optional [P] float32 (default:
        no bias, strength 1: the on/off edit).
    No host synchronisation: safe to capture in a CUDA graph. Profile ids are not range-checked.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be 2-D [T, E'], got {tuple(router_logits.shape)}")
    dtype = router_logits.dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported router_logits dtype {dtype}")
    num_tokens, num_cols = router_logits.shape
    if layer_masks.dim() != 2:
        raise ValueError(f"layer_masks must be 2-D [P, E], got {tuple(layer_masks.shape)}")
    num_experts = layer_masks.shape[1]
    if num_experts > num_cols:
        raise ValueError(f"layer_masks has {num_experts} experts but logits only {num_cols}")
    if token_profiles.dim() != 1 or token_profiles.shape[0] < num_tokens:
        raise ValueError(
            f"token_profiles must be [>= {num_tokens}], got {tuple(token_profiles.shape)}"
        )
    if eps.dim() != 1 or eps.shape[0] < layer_masks.shape[0]:
        raise ValueError(f"eps must be [{layer_masks.shape[0]}], got {tuple(eps.shape)}")
    if eps.dtype != torch.float32:
        eps = eps.float()
    num_profiles = layer_masks.shape[0]
    if layer_bias is None:
        layer_bias = torch.zeros(num_profiles, num_experts, dtype=torch.float32,
                                 device=router_logits.device)
    if strength is None:
        strength = torch.ones(num_profiles, dtype=torch.float32, device=router_logits.device)
    if layer_bias.shape != layer_masks.shape or strength.dim() != 1 \
            or strength.shape[0] < num_profiles:
        raise ValueError("layer_bias must be shaped like layer_masks and strength be [P]")

    if out is None:
        out = torch.empty_like(router_logits)
    elif out.shape != router_logits.shape or out.dtype != dtype:
        raise ValueError("out must have the shape and dtype of router_logits")
    if num_tokens == 0 or num_cols == 0:
        return out

    import triton

    block_e = triton.next_power_of_2(num_cols)
    _kernel()[(num_tokens,)](
        router_logits,
        out,
        token_profiles,
        layer_masks,
        eps,
        layer_bias,
        strength,
        token_profiles.stride(0),
        eps.stride(0),
        layer_bias.stride(0),
        layer_bias.stride(1),
        strength.stride(0),
        num_cols,
        num_experts,
        router_logits.stride(0),
        router_logits.stride(1),
        out.stride(0),
        out.stride(1),
        layer_masks.stride(0),
        layer_masks.stride(1),
        RESOLUTION=_RESOLUTION[dtype],
        CAST_KIND=_CAST_KIND[dtype],
        BLOCK_E=block_e,
        num_warps=_num_warps(block_e),
    )
    return out
