"""Sparsemixer: top-2 by successive argmax with a jitter mask (PhiMoE).

Sparsemixer is not shift-invariant (its mask scales with `abs(z)`), so steering is defined on
the raw logits: an activated expert is the argmax at each stage and is selected; a deactivated
one is the minimum and is not; the weights are sparsemixer's own on the edited logits.
vLLM runs it as a custom routing function (`CustomRoutingRouter`); any other custom routing
function but Llama-4's (`sigmoid_topk`) is steered the same way: the edit on the logits it is
given. Tested by the engine tests against Hugging Face with the same `z`-space edit.
"""

from vllm_patches.routers.kind import RouterKind, custom_routing_function, is_llama4_routing


def _custom_routing(router) -> bool:
    function = custom_routing_function(router)
    if is_llama4_routing(function):
        return False
    return function is not None or type(router).__name__ == "CustomRoutingRouter"


KIND = RouterKind(
    name="sparsemixer",
    meaning="PhiMoE sparsemixer on the raw logits (not shift invariant); activated experts "
            "are selected, deactivated ones not; weights are sparsemixer's",
    model_types=("phimoe",),
    families="PhiMoE",
    vllm_routers=("CustomRoutingRouter", "CPURouter"),
    predicate=_custom_routing,
    edit_space="logits",
    exact="selection yes; weights are sparsemixer's",
    tested_by="engine tests vs Hugging Face with the same `z`-space edit",
)
