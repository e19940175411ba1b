"""The router registry (`vllm_patches.routers`): one kind per router family, found from a vLLM
layer's router or a Hugging Face `model_type`; ROUTERS.md's table is the registry's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from profile_tools.checkpoint_factory import FAMILIES
from vllm_patches import routers

ROUTERS_MD = Path(routers.__file__).parents[1] / "ROUTERS.md"
E, K = 16, 2
# The vLLM router classes steermoe edits (any other is refused: not steerable).
STEERABLE = {"FusedTopKRouter", "FusedTopKBiasRouter", "GroupedTopKRouter",
             "CustomRoutingRouter", "CPURouter"}
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed")


def test_routers_md_table_is_the_registry():
    text = ROUTERS_MD.read_text()
    assert routers.markdown_table() in text
    for kind in routers.KINDS:
        assert f"| `{kind.name}` |" in text


def test_kinds_are_well_formed():
    assert list(routers.ROUTER_KINDS) == [kind.name for kind in routers.KINDS]
    for kind in routers.KINDS:
        assert kind.edit_space in routers.EDIT_SPACES
        assert kind.model_types and kind.vllm_routers and kind.meaning
        assert set(kind.vllm_routers) <= STEERABLE
        assert set(kind.fused_routers) <= set(kind.vllm_routers)
    assert set().union(*(kind.vllm_routers for kind in routers.KINDS)) == STEERABLE
    assert routers.fused_routers() == ("FusedTopKRouter", "GroupedTopKRouter")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_factory_family_has_its_kind(family):
    spec = FAMILIES[family]
    assert routers.kind_for_model_type(spec.model_type) is routers.ROUTER_KINDS[spec.router]


@pytest.mark.parametrize(("model_type", "name", "space", "biased"), [
    ("qwen3_moe", "softmax_topk", "log_softmax", False),
    ("gpt_oss", "topk_softmax", "log_softmax", False),
    ("deepseek_v2", "softmax_grouped", "log_softmax", False),
    ("deepseek_v3", "sigmoid_bias_grouped", "logits", True),
    ("phimoe", "sparsemixer", "logits", False),
])
def test_model_type_lookup(model_type, name, space, biased):
    kind = routers.kind_for_model_type(model_type)
    assert (kind.name, kind.edit_space, kind.correction_bias) == (name, space, biased)
    assert routers.kind_for_model_type("llama") is None


def _phimoe_routing(hidden_states, gating_output, topk, renormalize):
    raise AssertionError("not called")


class Llama4MoE:  # vLLM's Llama-4 passes its routing function as a custom routing function
    @staticmethod
    def custom_routing_function(hidden_states, gating_output, topk, renormalize):
        raise AssertionError("not called")


def _vllm_routers():
    from vllm.model_executor.layers.fused_moe.router.custom_routing_router import (
        CustomRoutingRouter,
    )
    from vllm.model_executor.layers.fused_moe.router.fused_topk_bias_router import (
        FusedTopKBiasRouter,
    )
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import (
        GroupedTopKRouter,
    )

    bias = torch.zeros(E)
    grouped = dict(top_k=K, global_num_experts=E, num_expert_group=4, topk_group=2)
    cases = [
        (FusedTopKRouter(top_k=K, global_num_experts=E), "softmax_topk"),
        (FusedTopKRouter(top_k=K, global_num_experts=E, scoring_func="sigmoid"), "sigmoid_topk"),
        (FusedTopKBiasRouter(top_k=K, global_num_experts=E, e_score_correction_bias=bias,
                             scoring_func="sigmoid"), "sigmoid_bias_grouped"),
        (GroupedTopKRouter(**grouped, scoring_func="softmax"), "softmax_grouped"),
        (GroupedTopKRouter(**grouped, scoring_func="sigmoid", e_score_correction_bias=bias),
         "sigmoid_bias_grouped"),
        (CustomRoutingRouter(top_k=K, global_num_experts=E,
                             custom_routing_function=_phimoe_routing), "sparsemixer"),
        (CustomRoutingRouter(top_k=1, global_num_experts=E,
                             custom_routing_function=Llama4MoE.custom_routing_function),
         "sigmoid_topk"),
    ]
    if importlib.util.find_spec("vllm.model_executor.layers.fused_moe.router.cpu_router"):
        from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

        cases += [
            (CPURouter(top_k=K, global_num_experts=E), "softmax_topk"),
            (CPURouter(**grouped, use_grouped_topk=True), "softmax_grouped"),
            (CPURouter(**grouped, use_grouped_topk=True, scoring_func="sigmoid",
                       e_score_correction_bias=bias), "sigmoid_bias_grouped"),
            (CPURouter(top_k=K, global_num_experts=E, custom_routing_function=_phimoe_routing),
             "sparsemixer"),
        ]
    return cases


@needs_vllm
def test_layer_lookup_on_vllm_routers():
    from types import SimpleNamespace

    for router, name in _vllm_routers():
        kind = routers.kind_for_layer(SimpleNamespace(router=router))
        assert kind is not None and kind.name == name, (type(router).__name__, name)


@needs_vllm
def test_routers_steermoe_does_not_edit_have_no_kind():
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import (
        RoutingSimulatorRouter,
    )

    assert routers.kind_for_router(RoutingSimulatorRouter(top_k=K, global_num_experts=E)) is None
    assert routers.kind_for_layer(SimpleNamespace(router=None)) is None
