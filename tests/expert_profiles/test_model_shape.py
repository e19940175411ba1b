"""`expert_profiles.model_shape.shape_from_hf_config` on configs shaped like real checkpoints.

The dicts below carry the routing-relevant keys of the published `config.json` files (plus a
few unrelated ones, as real configs have them); MoE layer placement follows what vLLM's model
code does for each family.
"""

from __future__ import annotations

import dataclasses

import pytest

from expert_profiles.model_shape import ModelShape, shape_from_hf_config

# Qwen/Qwen3-30B-A3B
QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
}
# Qwen/Qwen1.5-MoE-A2.7B
QWEN2_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "num_hidden_layers": 24,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "decoder_sparse_step": 1,
    "shared_expert_intermediate_size": 5632,
    "norm_topk_prob": False,
}
# allenai/OLMoE-1B-7B-0924
OLMOE = {
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "num_hidden_layers": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": False,
}
# mistralai/Mixtral-8x7B-v0.1
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "num_hidden_layers": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.02,
}
# deepseek-ai/DeepSeek-V2-Lite
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "num_hidden_layers": 27,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
}
# deepseek-ai/DeepSeek-V3
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "num_hidden_layers": 61,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "num_nextn_predict_layers": 1,
}
# openai/gpt-oss-20b (its config.json has both "experts_per_token" and "num_experts_per_tok")
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "num_hidden_layers": 24,
    "num_local_experts": 32,
    "experts_per_token": 4,
    "num_experts_per_tok": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
}
# meta-llama/Meta-Llama-3-8B (dense)
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (QWEN3_MOE, ModelShape("Qwen3MoeForCausalLM", 48, 128, 8, tuple(range(48)))),
        (QWEN2_MOE, ModelShape("Qwen2MoeForCausalLM", 24, 60, 4, tuple(range(24)))),
        (OLMOE, ModelShape("OlmoeForCausalLM", 16, 64, 8, tuple(range(16)))),
        (MIXTRAL, ModelShape("MixtralForCausalLM", 32, 8, 2, tuple(range(32)))),
        (DEEPSEEK_V2_LITE, ModelShape("DeepseekV2ForCausalLM", 27, 64, 6, tuple(range(1, 27)))),
        (DEEPSEEK_V3, ModelShape("DeepseekV3ForCausalLM", 61, 256, 8, tuple(range(3, 61)))),
        (GPT_OSS_20B, ModelShape("GptOssForCausalLM", 24, 32, 4, tuple(range(24)))),
    ],
    ids=[
        "qwen3-moe",
        "qwen2-moe",
        "olmoe",
        "mixtral",
        "deepseek-v2-lite",
        "deepseek-v3",
        "gpt-oss",
    ],
)
def test_real_configs(config, expected):
    assert shape_from_hf_config(config) == expected


def test_dense_model_is_not_moe():
    assert shape_from_hf_config(LLAMA3_8B) is None


def test_qwen3_mlp_only_layers_are_dense():
    config = dict(QWEN3_MOE, num_hidden_layers=6, mlp_only_layers=[0, 4])
    assert shape_from_hf_config(config).moe_layers == (1, 2, 3, 5)


def test_qwen_decoder_sparse_step():
    # vLLM: a layer is sparse iff (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers
    config = dict(QWEN2_MOE, num_hidden_layers=8, decoder_sparse_step=2)
    assert shape_from_hf_config(config).moe_layers == (1, 3, 5, 7)
    config = dict(config, mlp_only_layers=[3])
    assert shape_from_hf_config(config).moe_layers == (1, 5, 7)
    config = dict(QWEN2_MOE, num_hidden_layers=7, decoder_sparse_step=3)
    assert shape_from_hf_config(config).moe_layers == (2, 5)


def test_qwen_null_sparse_step_means_every_layer():
    config = dict(QWEN3_MOE, num_hidden_layers=3, decoder_sparse_step=None, mlp_only_layers=None)
    assert shape_from_hf_config(config).moe_layers == (0, 1, 2)


def test_deepseek_moe_layer_freq():
    # vLLM: MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0
    config = dict(DEEPSEEK_V2_LITE, num_hidden_layers=8, first_k_dense_replace=1, moe_layer_freq=2)
    assert shape_from_hf_config(config).moe_layers == (2, 4, 6)
    config = dict(DEEPSEEK_V3, num_hidden_layers=6, first_k_dense_replace=0)
    assert shape_from_hf_config(config).moe_layers == (0, 1, 2, 3, 4, 5)
    config = dict(DEEPSEEK_V3, num_hidden_layers=6, first_k_dense_replace=None, moe_layer_freq=None)
    assert shape_from_hf_config(config).moe_layers == (0, 1, 2, 3, 4, 5)


def test_mlp_only_layers_without_sparse_step():
    config = dict(OLMOE, num_hidden_layers=4, mlp_only_layers=[2])
    assert shape_from_hf_config(config).moe_layers == (0, 1, 3)


def test_expert_count_keys_in_order():
    # A null or zero earlier key falls through to the next one.
    config = dict(MIXTRAL, num_experts=None)
    assert shape_from_hf_config(config).num_experts == 8
    config = dict(MIXTRAL, num_experts=0)
    assert shape_from_hf_config(config).num_experts == 8
    config = {"num_hidden_layers": 2, "moe_num_experts": 16, "moe_top_k": 2}
    assert shape_from_hf_config(config) == ModelShape("unknown", 2, 16, 2, (0, 1))
    config = {"num_hidden_layers": 2, "num_experts": 16, "top_k": 4}
    assert shape_from_hf_config(config).top_k == 4
    config = {"num_hidden_layers": 2, "num_experts": 16, "num_selected_experts": 3}
    assert shape_from_hf_config(config).top_k == 3


@pytest.mark.parametrize(
    "change",
    [
        {"num_experts": 0},
        {"num_experts": None},
        {"num_experts_per_tok": None},
        {"num_experts_per_tok": 0},
        {"num_hidden_layers": None},
        {"num_hidden_layers": "16"},
    ],
)
def test_incomplete_moe_config_is_none(change):
    assert shape_from_hf_config(dict(OLMOE, **change)) is None


def test_missing_architectures_is_unknown():
    config = {k: v for k, v in OLMOE.items() if k != "architectures"}
    assert shape_from_hf_config(config).architecture == "unknown"
    assert shape_from_hf_config(dict(OLMOE, architectures=[])).architecture == "unknown"


def test_model_shape_is_frozen_and_to_dict():
    shape = shape_from_hf_config(DEEPSEEK_V3)
    assert shape.to_dict() == {
        "architecture": "DeepseekV3ForCausalLM",
        "num_layers": 61,
        "num_experts": 256,
        "top_k": 8,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        shape.num_layers = 1  # type: ignore[misc]
    assert ModelShape("A", 1, 2, 1).moe_layers == ()


# ---- transformers PretrainedConfig objects -----------------------------------------------------


transformers = pytest.importorskip("transformers")


def test_pretrained_qwen3_moe_config():
    config = transformers.Qwen3MoeConfig(num_hidden_layers=4, num_experts=8, num_experts_per_tok=2)
    assert shape_from_hf_config(config) == ModelShape("unknown", 4, 8, 2, (0, 1, 2, 3))


def test_pretrained_config_with_architectures_and_dense_layers():
    config = transformers.Qwen3MoeConfig(
        num_hidden_layers=4,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        architectures=["Qwen3MoeForCausalLM"],
    )
    assert shape_from_hf_config(config) == ModelShape("Qwen3MoeForCausalLM", 4, 8, 2, (1, 2, 3))


def test_pretrained_mixtral_config():
    config = transformers.MixtralConfig(
        num_hidden_layers=3,
        num_local_experts=4,
        num_experts_per_tok=2,
        architectures=["MixtralForCausalLM"],
    )
    assert shape_from_hf_config(config) == ModelShape("MixtralForCausalLM", 3, 4, 2, (0, 1, 2))


def test_pretrained_dense_config_is_none():
    assert shape_from_hf_config(transformers.LlamaConfig(num_hidden_layers=2)) is None


def test_pretrained_composite_config_uses_text_config():
    config = transformers.Qwen3VLMoeConfig(
        text_config={
            "num_hidden_layers": 4,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "mlp_only_layers": [0],
        },
        architectures=["Qwen3VLMoeForConditionalGeneration"],
    )
    assert shape_from_hf_config(config) == ModelShape(
        "Qwen3VLMoeForConditionalGeneration", 4, 8, 2, (1, 2, 3)
    )
