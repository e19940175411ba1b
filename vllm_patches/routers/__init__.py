"""The router registry: every router kind steermoe steers, in one ordered list.

Each module of this package declares one `RouterKind` (`KIND`): the Hugging Face model types it
covers, the vLLM router classes that compute it, the space the SteerMoE edit is defined in, a
one-line meaning, and how steering attaches to a vLLM MoE layer. To add a family, add its
`model_type` to its kind, or write a module for a new kind and list it in `MODULES` below
(then regenerate the table in ROUTERS.md: `markdown_table()`).

Lookups:
- `kind_for_layer(module)`: the kind of a vLLM MoE layer (by its `router`), or None when
  steermoe does not edit it (the engine then refuses steered requests, naming the router);
  the first kind in `KINDS` that matches decides;
- `kind_for_model_type(model_type)`: the kind of a Hugging Face `model_type`, or None;
- `ROUTER_KINDS[name]`: a kind by name (`FamilySpec.router` of the checkpoint factory).

`vllm_patches/ROUTERS.md` holds the table `markdown_table()` writes, and what each kind means.
"""

from __future__ import annotations

from typing import Any

from vllm_patches.routers import (
    sigmoid_bias_grouped,
    sigmoid_topk,
    softmax_grouped,
    softmax_topk,
    sparsemixer,
    topk_softmax,
)
from vllm_patches.routers.kind import EDIT_SPACES, RouterKind

# One module per kind, in matching order: the first kind that matches a vLLM layer's router is
# its kind. Kinds match disjoint routers, except `topk_softmax`, which vLLM computes as
# `softmax_topk`. (These modules' code runs in compiled graphs: `compile_cache` hashes them.)
MODULES = (softmax_topk, topk_softmax, softmax_grouped, sigmoid_bias_grouped, sparsemixer,
           sigmoid_topk)
KINDS: tuple[RouterKind, ...] = tuple(module.KIND for module in MODULES)
ROUTER_KINDS: dict[str, RouterKind] = {kind.name: kind for kind in KINDS}

__all__ = ["EDIT_SPACES", "KINDS", "MODULES", "ROUTER_KINDS", "RouterKind", "fused_routers",
           "kind_for_layer", "kind_for_model_type", "kind_for_router", "markdown_table"]


def _check_registry() -> None:
    seen: dict[str, str] = {}
    for kind in KINDS:
        for model_type in kind.model_types:
            if model_type in seen:
                raise ValueError(f"model_type {model_type} is in {seen[model_type]} and "
                                 f"{kind.name}")
            seen[model_type] = kind.name


_check_registry()


def kind_for_router(router: Any) -> RouterKind | None:
    """The kind of a vLLM router object, or None if steermoe does not edit it."""
    return next((kind for kind in KINDS if kind.matches(router)), None)


def kind_for_layer(module: Any) -> RouterKind | None:
    """The kind of a vLLM MoE layer (`MoERunner`), by its router; None if not steerable."""
    return kind_for_router(getattr(module, "router", None))


def kind_for_model_type(model_type: str) -> RouterKind | None:
    """The kind of a Hugging Face config `model_type`, or None if no kind lists it."""
    return next((kind for kind in KINDS if model_type in kind.model_types), None)


def fused_routers() -> tuple[str, ...]:
    """vLLM router classes the fused steered top-k computes (for some kind), in order."""
    names: list[str] = []
    for kind in KINDS:
        names += [name for name in kind.fused_routers if name not in names]
    return tuple(names)


def markdown_table() -> str:
    """The registry as the Markdown table in ROUTERS.md."""
    rows = ["| kind | families (`model_type`) | vLLM routers | edit space | meaning | exact? "
            "| tested by |", "|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        types = ", ".join(f"`{t}`" for t in kind.model_types)
        routers = ", ".join(f"`{name}`" for name in kind.vllm_routers)
        rows.append(f"| `{kind.name}` | {kind.families} ({types}) | {routers} | "
                    f"`{kind.edit_space}` | {kind.meaning} | {kind.exact} | {kind.tested_by} |")
    return "\n".join(rows) + "\n"
