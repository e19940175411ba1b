"""Grouped softmax top-k, group score = max of the group (DeepSeek-V2).

An activated expert is the row maximum, so its group has the highest group score and is kept;
a deactivated one is the row minimum. Exact while the activated experts of a layer span at
most `topk_group` groups. Tested by `test_steering_math.py` (vLLM's grouped top-k).
"""

from vllm_patches.routers.kind import RouterKind, correction_bias, is_grouped

KIND = RouterKind(
    name="softmax_grouped",
    meaning="softmax, keep topk_group groups by group max, top-k; exact while the activated "
            "experts of a layer span at most topk_group groups",
    model_types=("deepseek_v2",),
    families="DeepSeek-V2",
    vllm_routers=("GroupedTopKRouter", "CPURouter"),
    predicate=lambda router: is_grouped(router) and correction_bias(router) is None,
    edit_space="log_softmax",
    fused_routers=("GroupedTopKRouter",),
    exact="yes, while the activated experts of a layer span at most `topk_group` groups",
    tested_by="`test_steering_math.py` (vLLM's grouped top-k)",
)
