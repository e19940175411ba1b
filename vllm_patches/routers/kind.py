"""`RouterKind`: what one family of MoE routers is, for steering.

A kind says which Hugging Face `model_type`s route this way, which vLLM router classes
(by class name, narrowed by `predicate` where the class alone does not decide) compute it,
in which space the SteerMoE edit is defined (`EDIT_SPACES`), what activate / deactivate mean,
and how steering attaches to a vLLM MoE layer of this kind. One kind per module in this
package; `vllm_patches.routers` holds the ordered registry. No vLLM import here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# "log_softmax": the paper's definition, s = log_softmax(z), s_e = max(s) + eps / min(s) - eps;
# for a shift-invariant router this is the same as the edit on the raw logits.
# "logits": the same edit on the raw router logits z (routers that are not shift invariant).
EDIT_SPACES = ("log_softmax", "logits")

# attach(module, layer_steering, engine_steering) -> True when the layer routes with the
# fused steered top-k (reported in the engine info), else False.
AttachFn = Callable[[Any, Any, Any], bool]


def always(router: Any) -> bool:
    return True


def correction_bias(router: Any) -> Any:
    """The router's per-expert correction bias (DeepSeek-V3 family), or None."""
    return getattr(router, "e_score_correction_bias", None)


def custom_routing_function(router: Any) -> Any:
    """The model's own routing function the router calls (PhiMoE, Llama-4), or None."""
    return getattr(router, "custom_routing_function", None)


def is_grouped(router: Any) -> bool:
    """Whether the router selects groups of experts first (vLLM's grouped top-k)."""
    return type(router).__name__ == "GroupedTopKRouter" or bool(
        getattr(router, "use_grouped_topk", False))


def scoring(router: Any) -> str:
    return str(getattr(router, "scoring_func", "softmax"))


def plain_topk(router: Any) -> bool:
    """Neither grouped, nor biased, nor a model's own routing function: a plain top-k."""
    return (custom_routing_function(router) is None and not is_grouped(router)
            and correction_bias(router) is None)


def is_llama4_routing(function: Any) -> bool:
    """Llama-4's routing function (sigmoid of the top-1 logit), which vLLM passes as a custom
    routing function."""
    return getattr(function, "__qualname__", "").startswith("Llama4")


def attach_logit_edit(module: Any, layer_steering: Any, engine_steering: Any) -> bool:
    """The logit edit alone (attached by the caller), or the fused steered top-k where
    `STEERMOE_FUSED_ROUTING` is on and the layer supports it."""
    from vllm_patches.fused_steered_routing import install_fused_routing

    return install_fused_routing(module, layer_steering)


@dataclass(frozen=True)
class RouterKind:
    """One way MoE routers turn logits into a selection, and how steermoe steers it."""

    name: str  # FamilySpec.router of profile_tools.checkpoint_factory
    meaning: str  # one line: how the router routes and what the edit guarantees
    model_types: tuple[str, ...]  # Hugging Face config.json `model_type`s routed this way
    vllm_routers: tuple[str, ...]  # vLLM router class names that compute it
    edit_space: str  # one of EDIT_SPACES
    families: str = ""  # display names, for ROUTERS.md
    exact: str = "yes"  # whether the meaning holds exactly, and when (ROUTERS.md)
    tested_by: str = ""  # the tests that show the meaning (ROUTERS.md)
    # Narrows `vllm_routers` where the class alone does not decide (e.g. a bias present).
    predicate: Callable[[Any], bool] = field(default=always, compare=False)
    attach: AttachFn = field(default=attach_logit_edit, compare=False)
    # vLLM router classes the fused steered top-k computes exactly for this kind.
    fused_routers: tuple[str, ...] = ()
    # Selection adds a per-expert correction bias: steered rows are routed again with forcing
    # biases, which CUDA-graph replay cannot express (the engine must run eagerly).
    correction_bias: bool = False

    def __post_init__(self) -> None:
        if self.edit_space not in EDIT_SPACES:
            raise ValueError(f"{self.name}: edit_space must be one of {EDIT_SPACES}")

    def matches(self, router: Any) -> bool:
        """Whether a vLLM router object routes this way."""
        return type(router).__name__ in self.vllm_routers and bool(self.predicate(router))
