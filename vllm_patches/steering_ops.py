"""The registered custom ops that the MoE layers call: the routing edit and the capture copy.

On CUDA the MoE layer body runs inside vLLM's opaque `moe_forward` op; on CPU it is traced by
torch.compile, so the edit and the capture must be opaque ops of their own. Both mutate a
buffer in place and return nothing. They skip all work on steps where nothing is steered
(nothing recorded), except while a CUDA graph is being captured: the graph must hold the
kernel, whose per-token profile index then decides on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_patches import steering_math


@dataclass
class StepFlags:
    """Host-side facts about the step being run, set by the model-runner hook."""

    steering_active: bool = False
    recording: bool = False


FLAGS = StepFlags()


def _capturing_graph(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


@torch.library.custom_op("steermoe::steer_router_logits_", mutates_args=("router_logits",))
def steer_router_logits_(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
) -> None:
    """Apply each token's activate/deactivate mask to its router logits, in place."""
    if not FLAGS.steering_active:
        return
    steering_math.steer_router_logits_(router_logits, token_profiles, layer_masks, eps)


@steer_router_logits_.register_kernel("cuda")
def _steer_router_logits_cuda(
    router_logits: torch.Tensor,
    token_profiles: torch.Tensor,
    layer_masks: torch.Tensor,
    eps: torch.Tensor,
) -> None:
    if not (FLAGS.steering_active or _capturing_graph(router_logits)):
        return
    from vllm_patches.triton_steering import steer_router_logits_triton

    steer_router_logits_triton(router_logits, token_profiles, layer_masks, eps, out=router_logits)


@steer_router_logits_.register_fake
def _steer_router_logits_fake(router_logits, token_profiles, layer_masks, eps) -> None:
    return None


@torch.library.custom_op("steermoe::record_routing_", mutates_args=("record",))
def record_routing_(record: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """Copy one layer's top-k expert ids into its rows of the capture buffer."""
    if not (FLAGS.recording or _capturing_graph(record)):
        return
    record[: topk_ids.shape[0], : topk_ids.shape[1]].copy_(topk_ids)


@record_routing_.register_fake
def _record_routing_fake(record, topk_ids) -> None:
    return None


# Routers that add a per-expert correction bias before selection (DeepSeek-V3 family) register
# here, by decoder layer, the function that re-routes their steered rows (engine_steering).
BIASED_REROUTES: dict[int, object] = {}


@torch.library.custom_op(
    "steermoe::reroute_steered_", mutates_args=("topk_weights", "topk_ids")
)
def reroute_steered_(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    hidden_states: torch.Tensor,
    router_logits: torch.Tensor,
    layer: int,
) -> None:
    """Replace the routing of steered rows of a biased router (see BiasedRerouter)."""
    if not FLAGS.steering_active:
        return
    BIASED_REROUTES[layer](topk_weights, topk_ids, hidden_states, router_logits)


@reroute_steered_.register_fake
def _reroute_steered_fake(topk_weights, topk_ids, hidden_states, router_logits, layer) -> None:
    return None
