"""The routing shape of a served MoE model, read from its Hugging Face config.

A profile is valid for a model only if it was made for the same architecture, number of
decoder layers, experts per MoE layer and top-k, and names only layers that hold an MoE block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts")


@dataclass(frozen=True)
class ModelShape:
    """What a steering profile must agree with."""

    architecture: str
    num_layers: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
        }


def _first(config: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _moe_layers(config: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
    """Indices of decoder layers with an MoE block, following each family's config keys."""
    layers = range(num_layers)
    if "first_k_dense_replace" in config:  # DeepSeek-V2/V3, Kimi, GLM-4.5
        first_dense = int(config.get("first_k_dense_replace") or 0)
        freq = int(config.get("moe_layer_freq") or 1)
        return tuple(i for i in layers if i >= first_dense and i % freq == 0)
    if "decoder_sparse_step" in config:  # Qwen2-MoE, Qwen3-MoE
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or [])
        return tuple(i for i in layers if i not in dense and (i + 1) % step == 0)
    if config.get("mlp_only_layers"):
        dense = set(config["mlp_only_layers"])
        return tuple(i for i in layers if i not in dense)
    return tuple(layers)


def shape_from_hf_config(config: Mapping[str, Any] | Any) -> ModelShape | None:
    """ModelShape of an HF config (dict or PretrainedConfig); None if it is not an MoE model."""
    if not isinstance(config, Mapping):
        text_config = getattr(config, "text_config", None)
        if text_config is not None and text_config is not config:
            inner = shape_from_hf_config(text_config)
            if inner is not None:
                archs = getattr(config, "architectures", None) or [inner.architecture]
                return ModelShape(archs[0], inner.num_layers, inner.num_experts, inner.top_k,
                                  inner.moe_layers)
        config = config.to_dict()
    num_experts = _first(config, _NUM_EXPERTS_KEYS)
    top_k = _first(config, _TOP_K_KEYS)
    num_layers = config.get("num_hidden_layers")
    if num_experts is None or top_k is None or not isinstance(num_layers, int):
        return None
    architectures = config.get("architectures") or ["unknown"]
    return ModelShape(
        architecture=architectures[0],
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        moe_layers=_moe_layers(config, num_layers),
    )
