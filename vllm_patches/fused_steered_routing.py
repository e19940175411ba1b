"""The fused steered top-k in vLLM's CUDA routing: one kernel instead of edit + top-k.

Without it (the default), a steered MoE layer on CUDA runs two routing kernels: the SteerMoE
edit of the router logits (`triton_steering`, from the `MoERunner._maybe_dispatch` hook) and
then vLLM's own `topk_softmax`, plus a copy into the routing-capture buffer. With
`STEERMOE_FUSED_ROUTING=1`, `install_fused_routing` replaces the router's `_compute_routing`
for the router classes the fused kernel computes exactly (`fused_routing.fused_steered_topk`):

* `FusedTopKRouter` with softmax scoring (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, GPT-OSS,
  Granite-MoE: softmax top-k, renormalised or not; top-k then softmax is the renormalised form);
* `GroupedTopKRouter` with softmax scoring and no correction bias (DeepSeek-V2; with vLLM's
  own fallback to plain top-k, without scaling, when the experts do not split into groups).

The layer's edit hook then does nothing for layers whose experts take their routing from the
router (vLLM's modular kernels); layers on monolithic expert kernels, which route inside the
kernel from the logits, keep the edit. The fused kernel writes the routing-capture buffer
itself, so the capture copy goes too. Steps with nothing steered and nothing recorded run
vLLM's own `_compute_routing` unchanged (outside a CUDA-graph capture; a graph holds the fused
kernel, which reads the per-token profile index on the device).

Everything else keeps today's path: CPU engines, correction-bias routers (re-routed by
`routers.sigmoid_bias_grouped`), custom routing functions (PhiMoE), sigmoid scoring, layers
whose logits are gathered across ranks before routing (naive DP/EP dispatch, prefill context
parallel).

Triton cannot load a compiled kernel while a stream is being captured, and the hooks skip
their kernels on idle steps, so nothing would otherwise compile a kernel before vLLM captures
its graphs: on CUDA, `install_fused_routing` compiles the edit kernel for this layer (every
float dtype), and the fused routing launches each kernel variant once in an eager step (vLLM
warms every graph size eagerly right before capturing it); a variant first met inside a
capture runs the same routing in plain torch instead.

Setting (environment, read when the model is loaded): `STEERMOE_FUSED_ROUTING`: `0` (default,
the edit kernel before vLLM's top-k) or `1` (the fused kernel where supported).

Like `vllm_compat`, this module knows vLLM internals (router class and attribute names,
`_compute_routing`, `MoERunner.is_monolithic`); it touches nothing unless called.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from vllm_patches import fused_routing, routers
from vllm_patches.vllm_compat.layer_lookup import STEERING_ATTR

logger = logging.getLogger("steermoe")

FUSED_ROUTING_ENV = "STEERMOE_FUSED_ROUTING"
# The router classes the fused kernel computes exactly (per router kind: `routers`).
FUSED_ROUTERS = routers.fused_routers()
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")
EDIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

RouteFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def fused_routing_enabled() -> bool:
    """The `STEERMOE_FUSED_ROUTING` setting (default off); an unknown value means off."""
    value = os.environ.get(FUSED_ROUTING_ENV, "").strip().lower()
    if value in _ON:
        return True
    if value not in _OFF:
        logger.warning("steermoe: %s=%r is not one of 0/1; fused routing stays off",
                       FUSED_ROUTING_ENV, value[:20])
    return False


def _capturing(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def unsupported_reason(module: Any, layer_steering: Any, *,
                       require_cuda: bool = True) -> str | None:
    """Why the fused routing cannot replace this layer's routing; None when it can."""
    router = getattr(module, "router", None)
    name = type(router).__name__
    if require_cuda and not layer_steering.token_profiles.is_cuda:
        return "not a CUDA engine"
    if require_cuda and torch.version.hip is not None:
        return "ROCm routes with its own kernels"
    if name not in FUSED_ROUTERS:
        return f"router {name} is not one of {', '.join(FUSED_ROUTERS)}"
    if not callable(getattr(router, "_compute_routing", None)):
        return f"router {name} has no _compute_routing"
    if getattr(router, "scoring_func", "softmax") != "softmax":
        return f"scoring {getattr(router, 'scoring_func', None)!r} is not softmax"
    if getattr(router, "e_score_correction_bias", None) is not None:
        return "the router has a correction bias"
    if int(getattr(router, "num_fused_shared_experts", 0) or 0):
        return "shared experts are fused into the router"
    if not hasattr(module, "is_monolithic"):
        return "this vLLM does not say whether a layer's experts are monolithic"
    if getattr(module, "do_naive_dispatch_combine", False):
        return "router logits are gathered across ranks before routing"
    config = getattr(module, "moe_config", None)
    if int(getattr(config, "pcp_size", 1) or 1) > 1:
        return "prefill context parallel gathers router logits before routing"
    return None


def precompile_edit_kernel(layer_steering: Any, num_cols: int) -> None:
    """Compile the Triton edit kernel for this layer's tables, for every float dtype, outside
    any CUDA-graph capture (the edit op skips idle eager steps, so vLLM's warm-up runs would
    not compile it)."""
    from vllm_patches.triton_steering import steer_router_logits_triton

    device = layer_steering.token_profiles.device
    for dtype in EDIT_DTYPES:
        logits = torch.zeros(1, num_cols, dtype=dtype, device=device)
        steer_router_logits_triton(logits, layer_steering.token_profiles, layer_steering.masks,
                                   layer_steering.eps, out=logits,
                                   layer_bias=layer_steering.bias,
                                   strength=layer_steering.strength)


def _padding_mask_fn() -> Callable[[int], torch.Tensor | None] | None:
    """vLLM's padding mask of the step (vLLM >= 0.32 skips padded rows in its top-k)."""
    try:
        from vllm.model_executor.layers.fused_moe.router import fused_topk_router
    except ImportError:
        return None
    return getattr(fused_topk_router, "_get_padding_mask", None)


class FusedLayerRouting:
    """One MoE layer's routing with the fused steered top-k; replaces the layer's edit hook."""

    def __init__(self, module: Any, layer_steering: Any, original: RouteFn, *,
                 backend: str = "auto",
                 padding_mask: Callable[[int], torch.Tensor | None] | None = None):
        self.module = module
        self.router = module.router
        self.hook = layer_steering
        self.layer = layer_steering.layer
        self.original = original
        self.backend = backend
        self.padding_mask = padding_mask
        self.warm: set[tuple[Any, ...]] = set()
        self.torch_fallbacks = 0

    # What the registered ops read (they find this object on the layer by its name).

    @property
    def flags(self) -> Any:
        return self.hook.flags

    @property
    def rerouter(self) -> Any:
        return self.hook.rerouter

    # ---- the edit hook's interface (MoERunner._maybe_dispatch / BaseRouter.capture_fn) ----

    def _routes_here(self) -> bool:
        return not bool(getattr(self.module, "is_monolithic", True))

    def steer(self, router_logits: torch.Tensor) -> torch.Tensor:
        """The edit, only for layers whose experts route the logits themselves."""
        if self._routes_here():
            return router_logits
        return self.hook.steer(router_logits)

    def capture(self, topk_ids: torch.Tensor) -> None:
        """Nothing: `compute_routing` records (the fused kernel writes the buffer itself)."""

    def reroute(self, *args: Any) -> None:  # biased routers are never fused
        self.hook.reroute(*args)

    # ---- routing ---------------------------------------------------------------------------

    def _grouping(self, num_cols: int) -> tuple[int | None, int | None, float]:
        """(num_expert_group, topk_group, scale) as vLLM's router would route these logits."""
        if type(self.router).__name__ != "GroupedTopKRouter":
            return None, None, 1.0
        groups = int(self.router.num_expert_group)
        if num_cols <= groups or num_cols % groups:
            return None, None, 1.0  # vLLM falls back to plain fused_topk, without scaling
        return groups, int(self.router.topk_group), float(self.router.routed_scaling_factor)

    def compute_routing(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                        indices_type: torch.dtype | None, *,
                        input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        flags = self.hook.flags
        capturing = _capturing(router_logits)
        top_k = int(self.router.top_k)
        num_tokens, num_cols = router_logits.shape
        if router_logits.dtype not in fused_routing._SUPPORTED_DTYPES or top_k > num_cols:
            return self._edit_then_route(hidden_states, router_logits, indices_type, input_ids)
        groups, keep, scale = self._grouping(num_cols)
        ids_type = indices_type if indices_type in (torch.int32, torch.int64) else None
        record = self.hook.record if (flags.recording or capturing) else None
        use_triton = self.backend == "triton" or (
            self.backend == "auto" and (router_logits.is_cuda or fused_routing._interpreting())
            and fused_routing.triton_available())
        variant = None
        if use_triton:
            variant = fused_routing.triton_variant(
                router_logits, top_k, grouped=groups is not None, with_record=True,
                indices_type=ids_type)
        cold = variant is not None and variant not in self.warm
        if not (flags.steering_active or flags.recording or capturing or cold):
            return self.original(hidden_states, router_logits, indices_type, input_ids=input_ids)
        backend = "triton" if use_triton else "torch"
        if cold and capturing:
            # Triton cannot load a kernel inside a capture: the same routing in plain torch.
            backend = "torch"
            self.torch_fallbacks += 1
            if self.torch_fallbacks == 1:
                logger.warning("steermoe: layer %d met a new routing kernel variant inside a "
                               "CUDA-graph capture; that graph routes in plain torch",
                               self.layer)
        elif cold:
            record = self.hook.record  # compile the variant a capture will use (with record)
        weights, ids = fused_routing.fused_steered_topk(
            router_logits, self.hook.token_profiles, self.hook.masks, self.hook.eps, top_k,
            bool(self.router.renormalize), num_expert_group=groups, topk_group=keep,
            routed_scaling_factor=scale, indices_type=ids_type, record=record, backend=backend,
            layer_bias=self.hook.bias, strength=self.hook.strength)
        if cold and backend == "triton":
            self.warm.add(variant)
        mask = self.padding_mask(num_tokens) if self.padding_mask is not None else None
        if mask is not None and (groups is None or getattr(self.router, "skip_padding", False)):
            padded = mask[:num_tokens].unsqueeze(1)
            weights = weights.masked_fill(padded, 0)
            ids = ids.masked_fill(padded, -1)
        return weights, ids

    def _edit_then_route(self, hidden_states, router_logits, indices_type, input_ids):
        """Today's path, for logits the fused kernel does not take."""
        router_logits = self.hook.steer(router_logits)
        weights, ids = self.original(hidden_states, router_logits, indices_type,
                                     input_ids=input_ids)
        self.hook.capture(ids)
        return weights, ids


def install_fused_routing(module: Any, layer_steering: Any, *, require_cuda: bool = True,
                          backend: str = "auto") -> bool:
    """Route `module` (a vLLM MoERunner whose edit hook is `layer_steering`) with the fused
    steered top-k when `STEERMOE_FUSED_ROUTING` is on and the layer supports it; True if
    installed. Call after the layer's hook and capture function are attached.

    On CUDA it also compiles the Triton edit kernel for this layer, installed or not, so
    that no kernel is first compiled inside a CUDA-graph capture. `require_cuda=False`
    (tests) installs on CPU tensors too; `backend` is passed to `fused_steered_topk`.
    """
    router = getattr(module, "router", None)
    if layer_steering.token_profiles.is_cuda and fused_routing.triton_available():
        precompile_edit_kernel(layer_steering, int(layer_steering.masks.shape[1]))
    if not fused_routing_enabled():
        return False
    reason = unsupported_reason(module, layer_steering, require_cuda=require_cuda)
    if reason is None and backend != "torch" and not fused_routing.triton_available():
        reason = "triton cannot run here"
    if reason is not None:
        logger.info("steermoe: layer %d keeps the edit + vLLM top-k: %s",
                    layer_steering.layer, reason)
        return False
    routing = FusedLayerRouting(module, layer_steering, router._compute_routing,
                                backend=backend, padding_mask=_padding_mask_fn())
    router._compute_routing = routing.compute_routing
    router.set_capture_fn(routing.capture)
    setattr(module, STEERING_ATTR, routing)
    logger.debug("steermoe: layer %d routes with the fused steered top-k", layer_steering.layer)
    return True
