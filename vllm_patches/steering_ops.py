"""The registered custom ops that the MoE layers call: the routing edit, the capture copy and
the re-route of correction-bias routers.

On CUDA the MoE layer body runs inside vLLM's opaque `moe_forward` op; on CPU it is traced by
torch.compile, so these must be opaque ops of their own. Each mutates buffers in place and
returns nothing. They skip all work on steps where nothing is steered (nothing recorded),
except while a CUDA graph is being captured: the graph must hold the kernel, whose per-token
profile index then decides on the device. They are defined with `torch.library.Library`
directly (a few microseconds a call, where `torch.library.custom_op` costs tens).

State is per engine, never in this module: each op takes the name vLLM registered the MoE
layer under (`layer_name`, as vLLM's own `moe_forward` does) and finds the layer's steering in
the forward context of the step being run (`vllm_compat.layer_lookup`); that steering holds
its engine's `StepFlags` and, for correction-bias routers, the layer's re-route. So several
engines in one process stay independent, and the name is a constant in a compiled graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_patches import steering_math
from vllm_patches.vllm_compat.layer_lookup import steering_of_layer


@dataclass
class StepFlags:
    """Host-side facts about the step one engine is running, set by its model-runner hook."""

    steering_active: bool = False
    recording: bool = False
    # Some request of the step has graded steering (bias, or strength below 1).
    graded: bool = False


_LIB = torch.library.Library("steermoe", "FRAGMENT")
_LIB.define(
    "steer_router_logits_(Tensor(a!) router_logits, Tensor token_profiles, Tensor layer_masks,"
    " Tensor eps, Tensor layer_bias, Tensor strength, str layer_name) -> ()"
)
_LIB.define("record_routing_(Tensor(a!) record, Tensor topk_ids, str layer_name) -> ()")
_LIB.define(
    "reroute_steered_(Tensor(a!) topk_weights, Tensor(b!) topk_ids, Tensor hidden_states,"
    " Tensor router_logits, str layer_name) -> ()"
)


def _capturing_graph(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _flags(layer_name: str) -> StepFlags:
    return steering_of_layer(layer_name).flags


def _steer_router_logits_cpu(router_logits, token_profiles, layer_masks, eps, layer_bias,
                             strength, layer_name) -> None:
    """Apply each token's steering (masks, graded bias, strength) to its router logits; the
    graded tables are read only on steps with a graded request (the on/off edit is cheaper)."""
    flags = _flags(layer_name)
    if flags.steering_active:
        graded = (layer_bias, strength) if flags.graded else (None, None)
        steering_math.steer_router_logits_(router_logits, token_profiles, layer_masks, eps,
                                           *graded)


def _steer_router_logits_cuda(router_logits, token_profiles, layer_masks, eps, layer_bias,
                              strength, layer_name) -> None:
    if not (_capturing_graph(router_logits) or _flags(layer_name).steering_active):
        return
    from vllm_patches.triton_steering import steer_router_logits_triton

    steer_router_logits_triton(router_logits, token_profiles, layer_masks, eps, out=router_logits,
                               layer_bias=layer_bias, strength=strength)


def _record_routing(record, topk_ids, layer_name) -> None:
    """Copy one layer's top-k expert ids into its rows of the capture buffer."""
    if _capturing_graph(record) or _flags(layer_name).recording:
        record[: topk_ids.shape[0], : topk_ids.shape[1]].copy_(topk_ids)


def _reroute_steered(topk_weights, topk_ids, hidden_states, router_logits, layer_name) -> None:
    """Replace the routing of steered rows of a biased router (routers.sigmoid_bias_grouped)."""
    steering = steering_of_layer(layer_name)
    if steering.flags.steering_active:
        steering.rerouter(topk_weights, topk_ids, hidden_states, router_logits)


_LIB.impl("steer_router_logits_", _steer_router_logits_cpu, "CPU")
_LIB.impl("steer_router_logits_", _steer_router_logits_cuda, "CUDA")
for _key in ("CPU", "CUDA"):
    _LIB.impl("record_routing_", _record_routing, _key)
    _LIB.impl("reroute_steered_", _reroute_steered, _key)


def _no_output(*args, **kwargs) -> None:
    return None


for _name in ("steer_router_logits_", "record_routing_", "reroute_steered_"):
    torch.library.register_fake(f"steermoe::{_name}", _no_output, lib=_LIB)
