"""Top-k of the logits, then softmax over the k (GPT-OSS, Granite-MoE).

The top-k of the edited row contains every activated expert and the softmax over the chosen
logits is shift-invariant, so the paper's edit holds exactly. vLLM computes this as a
renormalised softmax top-k (`FusedTopKRouter`), so a vLLM layer of these models is found as
`softmax_topk` first (the registry's order); both attach the same way.
"""

from vllm_patches.routers.kind import RouterKind, plain_topk, scoring

KIND = RouterKind(
    name="topk_softmax",
    meaning="top-k of the logits, then softmax over the k; activated experts are always "
            "selected, deactivated ones never",
    model_types=("gpt_oss", "granitemoe"),
    families="GPT-OSS, Granite-MoE",
    vllm_routers=("FusedTopKRouter",),
    predicate=lambda router: plain_topk(router) and scoring(router) == "softmax",
    edit_space="log_softmax",
    fused_routers=("FusedTopKRouter",),
    tested_by="`test_steering_math.py`, engine tests vs Hugging Face",
)
