"""Softmax over all experts, top-k, renormalised or not (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral).

The paper's definition applies as written: `log_softmax` only shifts a row, so the edited
logits give the same softmax, top-k and weights as the edited log-probs. Exact. Tested by
`test_steering_math.py` (vLLM's own CPU top-k) and the engine tests against Hugging Face.
"""

from vllm_patches.routers.kind import RouterKind, plain_topk, scoring

KIND = RouterKind(
    name="softmax_topk",
    meaning="softmax over all experts, top-k, optional renormalisation; activated experts "
            "are always selected, deactivated ones never",
    model_types=("qwen3_moe", "qwen2_moe", "olmoe", "mixtral"),
    families="Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral",
    # vLLM's plain top-k routers (CPURouter on CPU; FusedTopKBiasRouter without a bias).
    vllm_routers=("FusedTopKRouter", "FusedTopKBiasRouter", "CPURouter"),
    predicate=lambda router: plain_topk(router) and scoring(router) == "softmax",
    edit_space="log_softmax",
    fused_routers=("FusedTopKRouter",),
    tested_by="`test_steering_math.py` (vLLM's own CPU top-k), engine tests vs Hugging Face",
)
