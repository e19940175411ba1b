"""Sigmoid scores plus a per-expert correction bias for selection, grouped (DeepSeek-V3,
Moonlight, Kimi-K2, GLM-4.5; group score = sum of the top-2 biased scores).

There the logit edit alone cannot guarantee selection: the bias, added for selection only, can
outweigh any sigmoid score. So the logits are edited, and then steered rows are routed again by
the model's own routing function with the correction bias raised by `FORCING_BIAS` for
activated experts and lowered by it for deactivated ones (one call per profile in the step).
Activated experts (and their groups) are thereby always selected, deactivated ones never; the
weights stay the router's own: sigmoid of the edited logits (an activated expert has the
token's highest affinity), renormalised and scaled by `routed_scaling_factor`. Exact.

Graded steering here is the edit on the logits z (the log-odds the sigmoid reads): a bias b
gives sigmoid(z + lambda * b), and at a strength lambda < 1 activated / deactivated experts move
the fraction lambda toward their targets. Only full-strength switches are forced by the
re-route; graded rows are routed by the model's own rule on the edited logits, correction bias
included, so a graded push guarantees no selection.

The re-route runs in Python per profile present in the step, which CUDA-graph replay cannot
express: an engine with these routers and CUDA graphs refuses steered requests with a message
asking for `--enforce-eager`. Tested by `test_biased_routers.py` (vLLM's CPU and GPU routers
against a direct implementation of this meaning).

`attach` wraps the router's `_compute_routing` (vLLM 0.26 through 0.32: `(hidden_states,
router_logits, indices_type, *, input_ids=None) -> (topk_weights, topk_ids)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vllm_patches.routers.kind import RouterKind, correction_bias

# Added to / subtracted from the correction bias of forced / forbidden experts. Router scores
# are in [0, 1] (sigmoid) so this decides selection, and group scores too.
FORCING_BIAS = 1.0e4

RouteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class BiasedRerouter:
    """Routes the steered rows of one layer again with forcing biases (see the module)."""

    def __init__(self, layer_steering: Any, bias: torch.Tensor, route: RouteFn):
        self.steering = layer_steering
        self.bias = bias
        self.route = route

    def __call__(self, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 hidden_states: torch.Tensor, router_logits: torch.Tensor) -> None:
        tokens = router_logits.shape[0]
        profiles = self.steering.token_profiles[:tokens].long()
        masks = self.steering.masks
        forced = masks.ne(0).any(dim=1) & self.steering.strength.eq(1.0)
        touched = forced[profiles]
        for profile in profiles[touched].unique().tolist():
            rows = (profiles == profile).nonzero().squeeze(1)
            mask = masks[profile].to(self.bias.dtype)
            bias = self.bias + FORCING_BIAS * mask
            weights, ids = self.route(hidden_states[rows], router_logits[rows], bias)
            topk_weights[rows] = weights.to(topk_weights.dtype)
            topk_ids[rows] = ids.to(topk_ids.dtype)


def reroute_biased(module: Any, layer_steering: Any) -> None:
    """Route steered rows of a correction-bias router again with forcing biases."""
    router = module.router
    original = router._compute_routing

    def route(hidden_states, router_logits, bias):
        saved = router.e_score_correction_bias
        router.e_score_correction_bias = bias
        try:
            return original(hidden_states, router_logits, None, input_ids=None)
        finally:
            router.e_score_correction_bias = saved

    layer_steering.rerouter = BiasedRerouter(layer_steering, router.e_score_correction_bias,
                                             route)

    def _compute_routing(hidden_states, router_logits, indices_type, *, input_ids=None):
        weights, ids = original(hidden_states, router_logits, indices_type, input_ids=input_ids)
        layer_steering.reroute(weights, ids, hidden_states, router_logits)
        return weights, ids

    router._compute_routing = _compute_routing


def attach(module: Any, layer_steering: Any, engine_steering: Any) -> bool:
    reroute_biased(module, layer_steering)
    return False  # never the fused routing


KIND = RouterKind(
    name="sigmoid_bias_grouped",
    meaning="sigmoid; choose by sigmoid + correction bias (groups by top-2 sum); steered rows "
            "are routed again with the bias moved by 1e4, so activated experts are always "
            "selected, deactivated ones never (graded steering: the logit edit only)",
    model_types=("deepseek_v3", "kimi_k2", "glm4_moe"),
    families="DeepSeek-V3, Moonlight, Kimi-K2, GLM-4.5",
    # Every router of vLLM that selects with a correction bias.
    vllm_routers=("GroupedTopKRouter", "FusedTopKBiasRouter", "CPURouter"),
    predicate=lambda router: correction_bias(router) is not None,
    edit_space="logits",
    attach=attach,
    correction_bias=True,
    tested_by="`test_biased_routers.py` (vLLM's CPU router against a direct implementation "
              "of this meaning), engine tests vs Hugging Face",
)
