"""The registered custom ops that the MoE layers call: the routing edit, the capture copy and
the re-route of correction-bias routers.

On CUDA the MoE layer body runs inside vLLM's opaque `moe_forward` op; on CPU it is traced by
torch.compile, so these must be opaque ops of their own. Each mutates buffers in place and
returns nothing. They skip all work on steps where nothing is steered (nothing recorded),
except while a CUDA graph is being captured: the graph must hold the kernel, whose per-token
profile index then decides on the device. They are defined with `torch.library.Library`
directly (a few microseconds a call, where `torch.library.custom_op` costs tens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_patches import steering_math


@dataclass
class StepFlags:
    """Host-side facts about the step being run, set by the model-runner hook."""

    steering_active: bool = False
    recording: bool = False


FLAGS = StepFlags()

# Routers that add a per-expert correction bias before selection (DeepSeek-V3 family) register
# here, by decoder layer, the function that re-routes their steered rows (engine_steering).
BIASED_REROUTES: dict[int, Callable[..., None]] = {}

_LIB = torch.library.Library("steermoe", "FRAGMENT")
_LIB.define(
    "steer_router_logits_(Tensor(a!) router_logits, Tensor token_profiles, Tensor layer_masks,"
    " Tensor eps) -> ()"
)
_LIB.define("record_routing_(Tensor(a!) record, Tensor topk_ids) -> ()")
_LIB.define(
    "reroute_steered_(Tensor(a!) topk_weights, Tensor(b!) topk_ids, Tensor hidden_states,"
    " Tensor router_logits, int layer) -> ()"
)


def _capturing_graph(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _steer_router_logits_cpu(router_logits, token_profiles, layer_masks, eps) -> None:
    """Apply each token's activate/deactivate mask to its router logits, in place."""
    if FLAGS.steering_active:
        steering_math.steer_router_logits_(router_logits, token_profiles, layer_masks, eps)


def _steer_router_logits_cuda(router_logits, token_profiles, layer_masks, eps) -> None:
    if not (FLAGS.steering_active or _capturing_graph(router_logits)):
        return
    from vllm_patches.triton_steering import steer_router_logits_triton

    steer_router_logits_triton(router_logits, token_profiles, layer_masks, eps, out=router_logits)


def _record_routing(record, topk_ids) -> None:
    """Copy one layer's top-k expert ids into its rows of the capture buffer."""
    if FLAGS.recording or _capturing_graph(record):
        record[: topk_ids.shape[0], : topk_ids.shape[1]].copy_(topk_ids)


def _reroute_steered(topk_weights, topk_ids, hidden_states, router_logits, layer) -> None:
    """Replace the routing of steered rows of a biased router (see BiasedRerouter)."""
    if FLAGS.steering_active:
        BIASED_REROUTES[layer](topk_weights, topk_ids, hidden_states, router_logits)


_LIB.impl("steer_router_logits_", _steer_router_logits_cpu, "CPU")
_LIB.impl("steer_router_logits_", _steer_router_logits_cuda, "CUDA")
for _key in ("CPU", "CUDA"):
    _LIB.impl("record_routing_", _record_routing, _key)
    _LIB.impl("reroute_steered_", _reroute_steered, _key)


def _no_output(*args, **kwargs) -> None:
    return None


for _name in ("steer_router_logits_", "record_routing_", "reroute_steered_"):
    torch.library.register_fake(f"steermoe::{_name}", _no_output, lib=_LIB)
