"""Sigmoid scores without a correction bias, top-k (Llama-4 style top-1).

Sigmoid is monotonic: activated experts have the highest scores and are selected, deactivated
ones the lowest. Sigmoid is not shift-invariant, so the edit is defined on the raw logits.
Exact by construction.
"""

from vllm_patches.routers.kind import (
    RouterKind,
    custom_routing_function,
    is_llama4_routing,
    plain_topk,
    scoring,
)


def _sigmoid_scored(router) -> bool:
    if is_llama4_routing(custom_routing_function(router)):
        return True
    return plain_topk(router) and scoring(router) != "softmax"


KIND = RouterKind(
    name="sigmoid_topk",
    meaning="sigmoid scores without a bias, top-k; sigmoid is monotonic, so activated experts "
            "are selected, deactivated ones not",
    model_types=("llama4", "llama4_text"),
    families="Llama-4",
    vllm_routers=("FusedTopKRouter", "FusedTopKBiasRouter", "CustomRoutingRouter", "CPURouter"),
    predicate=_sigmoid_scored,
    edit_space="logits",
    tested_by="by construction",
)
