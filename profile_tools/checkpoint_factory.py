"""Random-weight checkpoints of real Mixture-of-Experts architectures, built locally.

No model can be downloaded in this project's environments, so tests and benchmarks build their
own: `build_checkpoint("olmoe", dir)` writes a Hugging Face checkpoint directory (config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json) made with the
transformers model class of that family and a byte-level BPE tokenizer trained here on a small
built-in corpus. Weights are drawn from a fixed seed, so a (family, size, seed, dtype) always
gives the same bytes; router weights are drawn large enough that routing is far from uniform.

size="tiny": 4 decoder layers, hidden 128, head_dim 32 (vLLM's CPU attention wants a multiple
of 32), 8 experts top-2 (DeepSeek: 16 experts in 4 groups, 2 groups kept, layer 0 dense).
size="real": only config.json (with the published model's shape) plus the tokenizer, for
`LLM(model=dir, load_format="dummy", skip_tokenizer_init=True)` on a GPU.

config.json is written with the key names the published checkpoints use (`num_experts` for
Qwen, `rope_theta` rather than `rope_parameters`, ...) so older transformers releases read it
the same way; the model is built from that file as transformers parses it.

CLI: python -m profile_tools.checkpoint_factory FAMILY OUT_DIR [--size tiny|real] [--seed N]
     [--dtype bfloat16|float16|float32]; python -m profile_tools.checkpoint_factory --list
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vllm_patches.routers import ROUTER_KINDS

FACTORY_VERSION = 2
MARKER = ".checkpoint_factory.json"
SIZES = ("tiny", "real")
DTYPES = ("bfloat16", "float16", "float32")

# Special tokens of the local tokenizer; their ids are their positions here.
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>")
TOKENIZER_VOCAB = 1024
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Tokenizer training text: plain English, punctuation and digits.
CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a step.
Mixture of experts models route every token to a few experts chosen by a small router network.
Each expert is a feed forward block; the router scores all experts and keeps the top few.
Steering a model means switching some experts on and others off for a request at inference time.
The server receives a request, applies the profile of the request and returns the completion.
What is the capital of France? The capital of France is Paris. Berlin is the capital of Germany.
Please answer the question using only the document. If the answer is not there, say so clearly.
I cannot help with that request because it could cause harm. Here is a safer alternative instead.
She opened the window and the cold morning air filled the small room with the smell of rain.
They walked along the river until the sun went down behind the hills and the lights came on.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 32 64 100 128 256 512 1000 1024.
Dates and times: 2024-01-31, 12:45, 3.14159, 2.71828, 42, 7 x 8 = 56, 9 + 10 = 19, 100 / 4 = 25.
The meeting starts at 9:30 on Monday and ends at 11:00; bring the report, the slides and a pen.
def add(a, b): return a + b  # a tiny function in a programming language called Python
Hello, world! How are you today? I am fine, thank you. Good morning, good evening, good night.
The user asked the assistant for a summary of the article, and the assistant wrote three lines.
Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees, which is 32 Fahrenheit.
A model with sixty four experts and eight active experts per token uses only part of its weights.
Tests compare the reference implementation with the engine and report any difference they find.
Once upon a time there was a little robot who wanted to learn how to paint the colours of the sky.
Red, orange, yellow, green, blue, indigo and violet are the colours of the rainbow after a storm.
The library opens at eight in the morning and closes at six in the evening, except on Sundays.
""".strip()


@dataclass(frozen=True)
class FamilySpec:
    """One MoE architecture: what config.json says for each size and how its router scores."""

    name: str
    architecture: str  # the `architectures` entry of config.json (what vLLM dispatches on)
    model_type: str
    router: str  # the router kind's name (vllm_patches.routers.ROUTER_KINDS)
    tiny: Mapping[str, Any]  # config.json keys of the tiny size (vocab and token ids added)
    real_name: str  # the published checkpoint whose shape `size="real"` copies
    real: Mapping[str, Any]  # config.json of the published checkpoint (shape keys)
    note: str = ""

    def __post_init__(self) -> None:
        kind = ROUTER_KINDS.get(self.router)
        if kind is None or self.model_type not in kind.model_types:
            raise ValueError(f"{self.name}: router kind {self.router!r} does not list model_type "
                             f"{self.model_type!r} (vllm_patches/routers)")


def _frozen(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(kwargs)


# Shared by every tiny config: head_dim 32, GQA 4 query heads over 2 KV heads.
_TINY_COMMON = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    tie_word_embeddings=False,
    use_cache=True,
    attention_dropout=0.0,
)

_DEEPSEEK_TINY = dict(
    _TINY_COMMON,
    intermediate_size=256,
    moe_intermediate_size=64,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    # MLA: vLLM's CPU MLA decode kernel supports only kv_lora_rank 512 + rope 64 (= 576).
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=64,
    v_head_dim=64,
    attention_bias=False,
    num_key_value_heads=4,  # MLA: one KV head per query head
)

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="qwen3_moe",
            architecture="Qwen3MoeForCausalLM",
            model_type="qwen3_moe",
            router="softmax_topk",
            tiny=_frozen(
                **_TINY_COMMON,
                head_dim=32,
                intermediate_size=256,
                moe_intermediate_size=64,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                attention_bias=False,
                use_sliding_window=False,
                sliding_window=None,
            ),
            real_name="Qwen/Qwen3-30B-A3B",
            real=_frozen(
                hidden_size=2048,
                intermediate_size=6144,
                moe_intermediate_size=768,
                num_hidden_layers=48,
                num_attention_heads=32,
                num_key_value_heads=4,
                head_dim=128,
                num_experts=128,
                num_experts_per_tok=8,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                max_position_embeddings=40960,
                max_window_layers=48,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                attention_bias=False,
                use_sliding_window=False,
                sliding_window=None,
                vocab_size=151936,
                bos_token_id=151643,
                eos_token_id=151645,
                tie_word_embeddings=False,
            ),
        ),
        FamilySpec(
            name="qwen2_moe",
            architecture="Qwen2MoeForCausalLM",
            model_type="qwen2_moe",
            router="softmax_topk",
            tiny=_frozen(
                **_TINY_COMMON,
                intermediate_size=256,
                moe_intermediate_size=64,
                shared_expert_intermediate_size=128,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=False,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                use_sliding_window=False,
            ),
            real_name="Qwen/Qwen1.5-MoE-A2.7B",
            real=_frozen(
                hidden_size=2048,
                intermediate_size=5632,
                moe_intermediate_size=1408,
                shared_expert_intermediate_size=5632,
                num_hidden_layers=24,
                num_attention_heads=16,
                num_key_value_heads=16,
                num_experts=60,
                num_experts_per_tok=4,
                norm_topk_prob=False,
                decoder_sparse_step=1,
                max_position_embeddings=8192,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                use_sliding_window=False,
                vocab_size=151936,
                bos_token_id=151643,
                eos_token_id=151643,
                tie_word_embeddings=False,
            ),
            note="shared expert with a sigmoid gate, outside the router",
        ),
        FamilySpec(
            name="olmoe",
            architecture="OlmoeForCausalLM",
            model_type="olmoe",
            router="softmax_topk",
            tiny=_frozen(
                **_TINY_COMMON,
                intermediate_size=64,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=False,
                clip_qkv=None,
                attention_bias=False,
            ),
            real_name="allenai/OLMoE-1B-7B-0125",
            real=_frozen(
                hidden_size=2048,
                intermediate_size=1024,
                num_hidden_layers=16,
                num_attention_heads=16,
                num_key_value_heads=16,
                num_experts=64,
                num_experts_per_tok=8,
                norm_topk_prob=False,
                clip_qkv=None,
                max_position_embeddings=4096,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                attention_bias=False,
                vocab_size=50304,
                pad_token_id=1,
                eos_token_id=50279,
                tie_word_embeddings=False,
            ),
            note="OLMoE's attention has q/k RMSNorm over the whole projection",
        ),
        FamilySpec(
            name="mixtral",
            architecture="MixtralForCausalLM",
            model_type="mixtral",
            router="softmax_topk",
            tiny=_frozen(
                **_TINY_COMMON,
                head_dim=32,
                intermediate_size=64,
                num_local_experts=8,
                num_experts_per_tok=2,
                router_jitter_noise=0.0,
                sliding_window=None,
            ),
            real_name="mistralai/Mixtral-8x7B-Instruct-v0.1",
            real=_frozen(
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                num_local_experts=8,
                num_experts_per_tok=2,
                max_position_embeddings=32768,
                rope_theta=1000000.0,
                rms_norm_eps=1e-5,
                sliding_window=None,
                vocab_size=32000,
                bos_token_id=1,
                eos_token_id=2,
                tie_word_embeddings=False,
            ),
        ),
        FamilySpec(
            name="phimoe",
            # The published Phi-3.5-MoE names this "PhiMoEForCausalLM", the name vLLM registers;
            # transformers' own class is PhimoeForCausalLM (it dispatches on model_type).
            architecture="PhiMoEForCausalLM",
            model_type="phimoe",
            router="sparsemixer",
            tiny=_frozen(
                **{**_TINY_COMMON, "rms_norm_eps": 1e-5},
                intermediate_size=64,
                num_local_experts=8,
                num_experts_per_tok=2,
                router_jitter_noise=0.01,
                input_jitter_noise=0.0,
                # vLLM's PhiMoE always has biases on qkv/o and lm_head (as Phi-3.5-MoE does).
                attention_bias=True,
                lm_head_bias=True,
                sliding_window=None,
            ),
            real_name="microsoft/Phi-3.5-MoE-instruct",
            real=_frozen(
                hidden_size=4096,
                intermediate_size=6400,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                num_local_experts=16,
                num_experts_per_tok=2,
                router_jitter_noise=0.01,
                input_jitter_noise=0.01,
                attention_bias=True,
                lm_head_bias=True,
                # The published config has longrope scaling to 131072; plain rope at 4096 here.
                max_position_embeddings=4096,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                sliding_window=None,
                vocab_size=32064,
                bos_token_id=1,
                eos_token_id=32000,
                tie_word_embeddings=False,
            ),
            note="LayerNorm (with bias), not RMSNorm; sparsemixer top-2 routing",
        ),
        FamilySpec(
            name="gpt_oss",
            architecture="GptOssForCausalLM",
            model_type="gpt_oss",
            router="topk_softmax",
            tiny=_frozen(
                **{k: v for k, v in _TINY_COMMON.items() if k != "rope_theta"},
                head_dim=32,
                intermediate_size=64,
                num_local_experts=8,
                num_experts_per_tok=2,
                experts_per_token=2,
                sliding_window=128,
                layer_types=["sliding_attention", "full_attention"] * 2,
                attention_bias=True,
                swiglu_limit=7.0,
                # vLLM's GPT-OSS always builds YaRN rope; factor 1 makes it plain rope.
                rope_theta=150000.0,
                rope_scaling={
                    "rope_type": "yarn",
                    "factor": 1.0,
                    "original_max_position_embeddings": 2048,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "truncate": False,
                },
            ),
            real_name="openai/gpt-oss-20b",
            real=_frozen(
                hidden_size=2880,
                intermediate_size=2880,
                num_hidden_layers=24,
                num_attention_heads=64,
                num_key_value_heads=8,
                head_dim=64,
                num_local_experts=32,
                num_experts_per_tok=4,
                experts_per_token=4,
                sliding_window=128,
                layer_types=["sliding_attention", "full_attention"] * 12,
                attention_bias=True,
                swiglu_limit=7.0,
                initial_context_length=4096,
                max_position_embeddings=131072,
                rope_theta=150000.0,
                rope_scaling={
                    "rope_type": "yarn",
                    "factor": 32.0,
                    "original_max_position_embeddings": 4096,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "truncate": False,
                },
                rms_norm_eps=1e-5,
                vocab_size=201088,
                pad_token_id=199999,
                eos_token_id=200002,
                tie_word_embeddings=False,
            ),
            note="router has a bias; attention sinks; real config omits the MXFP4 quantization",
        ),
        FamilySpec(
            name="deepseek_v2",
            architecture="DeepseekV2ForCausalLM",
            model_type="deepseek_v2",
            router="softmax_grouped",
            tiny=_frozen(
                **_DEEPSEEK_TINY,
                q_lora_rank=None,
                topk_method="group_limited_greedy",
                scoring_func="softmax",
                norm_topk_prob=False,
                routed_scaling_factor=1.0,
            ),
            real_name="deepseek-ai/DeepSeek-V2-Lite",
            real=_frozen(
                hidden_size=2048,
                intermediate_size=10944,
                moe_intermediate_size=1408,
                num_hidden_layers=27,
                num_attention_heads=16,
                num_key_value_heads=16,
                n_routed_experts=64,
                n_shared_experts=2,
                num_experts_per_tok=6,
                n_group=1,
                topk_group=1,
                topk_method="greedy",
                scoring_func="softmax",
                norm_topk_prob=False,
                routed_scaling_factor=1.0,
                first_k_dense_replace=1,
                moe_layer_freq=1,
                kv_lora_rank=512,
                q_lora_rank=None,
                qk_rope_head_dim=64,
                qk_nope_head_dim=128,
                v_head_dim=128,
                # The published config has YaRN scaling to 163840; plain rope at 4096 here.
                max_position_embeddings=4096,
                rope_theta=10000.0,
                rms_norm_eps=1e-6,
                attention_bias=False,
                vocab_size=102400,
                bos_token_id=100000,
                eos_token_id=100001,
                tie_word_embeddings=False,
            ),
            note="MLA attention; routed_scaling_factor; shared experts outside the router",
        ),
        FamilySpec(
            name="deepseek_v3",
            architecture="DeepseekV3ForCausalLM",
            model_type="deepseek_v3",
            router="sigmoid_bias_grouped",
            tiny=_frozen(
                **{**_DEEPSEEK_TINY, "n_shared_experts": 1},
                q_lora_rank=96,
                topk_method="noaux_tc",
                scoring_func="sigmoid",
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
                rope_interleave=True,
            ),
            # DeepSeek-V3 itself (671B) does not fit one GPU; Moonlight is the same class.
            real_name="moonshotai/Moonlight-16B-A3B",
            real=_frozen(
                hidden_size=2048,
                intermediate_size=11264,
                moe_intermediate_size=1408,
                num_hidden_layers=27,
                num_attention_heads=16,
                num_key_value_heads=16,
                n_routed_experts=64,
                n_shared_experts=2,
                num_experts_per_tok=6,
                n_group=1,
                topk_group=1,
                topk_method="noaux_tc",
                scoring_func="sigmoid",
                norm_topk_prob=True,
                routed_scaling_factor=2.446,
                first_k_dense_replace=1,
                moe_layer_freq=1,
                kv_lora_rank=512,
                q_lora_rank=None,
                qk_rope_head_dim=64,
                qk_nope_head_dim=128,
                v_head_dim=128,
                max_position_embeddings=8192,
                rope_theta=50000.0,
                rms_norm_eps=1e-5,
                attention_bias=False,
                vocab_size=163840,
                bos_token_id=163584,
                eos_token_id=163585,
                tie_word_embeddings=False,
            ),
            note="sigmoid scores, e_score_correction_bias for selection only, grouped top-k",
        ),
        FamilySpec(
            name="granitemoe",
            architecture="GraniteMoeForCausalLM",
            model_type="granitemoe",
            router="topk_softmax",
            tiny=_frozen(
                **_TINY_COMMON,
                intermediate_size=64,
                num_local_experts=8,
                num_experts_per_tok=2,
                # Milder than the published 12 / 0.22 / 6 so that the experts move the logits.
                embedding_multiplier=2.0,
                attention_multiplier=1.0 / 32,
                residual_multiplier=0.5,
                logits_scaling=2.0,
                attention_bias=False,
            ),
            real_name="ibm-granite/granite-3.0-1b-a400m-instruct",
            real=_frozen(
                hidden_size=1024,
                intermediate_size=512,
                num_hidden_layers=24,
                num_attention_heads=16,
                num_key_value_heads=8,
                num_local_experts=32,
                num_experts_per_tok=8,
                embedding_multiplier=12.0,
                attention_multiplier=0.015625,
                residual_multiplier=0.22,
                logits_scaling=6.0,
                max_position_embeddings=4096,
                rope_theta=10000.0,
                rms_norm_eps=1e-6,
                attention_bias=False,
                vocab_size=49155,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
                tie_word_embeddings=True,
            ),
            note="muP-style multipliers on embeddings, attention, residuals and logits",
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Tokenizer


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE tokenizer on CORPUS (deterministic) and return its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.splitlines()
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    return tokenizer.to_str()


def tokenizer_size() -> int:
    """Number of tokens of the local tokenizer (special tokens included)."""
    return len(json.loads(_tokenizer_json())["model"]["vocab"])


def padded_vocab_size() -> int:
    """Model vocab size of tiny checkpoints: the tokenizer size rounded up to a multiple of 64."""
    return 64 * math.ceil(tokenizer_size() / 64)


def write_tokenizer(
    out: Path, tokenizer_json: str | None = None, model_max_length: int = 2048
) -> None:
    """tokenizer.json (this module's, unless given), tokenizer_config.json with the chat
    template, special_tokens_map.json."""
    text = _tokenizer_json() if tokenizer_json is None else tokenizer_json
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Configs and weights


def checkpoint_config(family: str, size: str = "tiny", dtype: str = "bfloat16") -> dict[str, Any]:
    """The config.json dict `build_checkpoint` writes for (family, size, dtype)."""
    spec = _spec(family)
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config: dict[str, Any] = {"architectures": [spec.architecture], "model_type": spec.model_type}
    if size == "tiny":
        config.update(copy.deepcopy(dict(spec.tiny)))
        config.update(
            vocab_size=padded_vocab_size(),
            bos_token_id=SPECIAL_TOKENS.index(BOS),
            eos_token_id=SPECIAL_TOKENS.index(EOS),
            pad_token_id=SPECIAL_TOKENS.index(PAD),
        )
    else:
        config.update(copy.deepcopy(dict(spec.real)))
    config["torch_dtype"] = dtype
    return config


def _spec(family: str) -> FamilySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}") from None


def _router_modules(model: Any) -> list[Any]:
    """The MoE router modules of a transformers model (class name contains 'Router')."""
    return [m for m in model.modules() if "router" in type(m).__name__.lower()]


def _init_weights(model: Any, seed: int) -> None:
    """Overwrite every parameter and persistent buffer with a seeded, scale-aware random draw.

    Linear / expert weights: N(0, 1/fan_in); embeddings: N(0, 1); norm weights: 1 + N(0, 0.1);
    biases: N(0, 0.1); GPT-OSS sinks: N(0, 0.5). Router weights: N(0, 3/sqrt(hidden)) so router
    logits have std ~3 and routing is clearly non-uniform; router biases N(0, 0.5);
    DeepSeek-V3 e_score_correction_bias: N(0, 0.1); lm_head bias (PhiMoE) zero.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    router_tensors = {}
    for module in _router_modules(model):
        for name, tensor in list(module.named_parameters(recurse=False)):
            router_tensors[id(tensor)] = name
    hidden = model.config.hidden_size
    state = model.state_dict(keep_vars=True)
    for name in sorted(state):
        tensor = state[name]
        if not tensor.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        shape = tuple(tensor.shape)
        if name == "lm_head.bias":
            # vLLM 0.32's PhiMoE builds lm_head with a bias but never adds it to the logits.
            values = torch.zeros(shape)
        elif id(tensor) in router_tensors:
            std = 3.0 / math.sqrt(hidden) if leaf == "weight" else 0.5
            values = torch.randn(shape, generator=generator) * std
        elif leaf == "e_score_correction_bias":
            values = torch.randn(shape, generator=generator) * 0.1
        elif leaf == "sinks":
            values = torch.randn(shape, generator=generator) * 0.5
        elif "norm" in name and leaf == "weight":
            values = 1.0 + torch.randn(shape, generator=generator) * 0.1
        elif len(shape) == 1:
            values = torch.randn(shape, generator=generator) * 0.1
        elif "embed" in name:
            values = torch.randn(shape, generator=generator)
        elif len(shape) == 2:
            values = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
        else:
            # Fused expert tensors, [E, out, in] or (GPT-OSS) [E, in, out]: the input side of
            # gate/up is the hidden size; of down/output it is the expert intermediate size,
            # the smaller of the two last dims in every tiny config.
            fan_in = min(shape[-2:]) if ("down" in leaf or "output" in name) else hidden
            values = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        with torch.no_grad():
            tensor.copy_(values.to(tensor.dtype))


def _write_weights(out: Path, config_path: Path, seed: int, dtype: str) -> None:
    """Build the transformers model from config.json, draw its weights, save model.safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(config_path.parent)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    _init_weights(model, seed)
    model = model.to(getattr(torch, dtype))
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.move(str(Path(tmp) / "model.safetensors"), out / "model.safetensors")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_FILES = {
    "real": ("config.json", "generation_config.json", *_TOKENIZER_FILES),
    "tiny": ("config.json", "generation_config.json", "model.safetensors", *_TOKENIZER_FILES),
}


def _marker(family: str, size: str, seed: int, dtype: str) -> dict[str, Any]:
    return {
        "family": family,
        "size": size,
        "seed": seed,
        "dtype": dtype,
        "factory_version": FACTORY_VERSION,
    }


def build_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Path:
    """Write a checkpoint of `family` into out_dir and return out_dir.

    A dir that already holds a complete build of the same (family, size, seed, dtype) is left
    alone (the marker file is written last, so an interrupted build is redone).
    """
    config = checkpoint_config(family, size, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker_path = out / MARKER
    wanted = _marker(family, size, seed, dtype)
    expected = [out / name for name in _FILES[size]]
    if marker_path.exists():
        try:
            if json.loads(marker_path.read_text()) == wanted and all(p.exists() for p in expected):
                return out
        except (OSError, ValueError):
            pass
        marker_path.unlink()
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        (out / stale).unlink(missing_ok=True)

    config_path = out / "config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(out)
    generation = {
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
    }
    generation = {k: v for k, v in generation.items() if v is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if size == "tiny":
        _write_weights(out, config_path, seed, dtype)
    marker_path.write_text(json.dumps(wanted) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# Shape of a checkpoint


def model_shape(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Architecture, layer count, expert count, top-k and MoE layer indices from config.json."""
    from expert_profiles.model_shape import shape_from_hf_config

    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    shape = shape_from_hf_config(config)
    if shape is None:
        raise ValueError(f"{checkpoint_dir}: config.json describes no Mixture-of-Experts model")
    return {**shape.to_dict(), "moe_layers": list(shape.moe_layers)}


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m profile_tools.checkpoint_factory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("family", nargs="?", help="one of --list")
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    args = parser.parse_args(argv)
    if args.list:
        for spec in FAMILIES.values():
            print(f"{spec.name:12s} {spec.architecture:22s} {spec.router:21s} {spec.real_name}")
        return 0
    if not args.family or not args.out_dir:
        parser.error("FAMILY and OUT_DIR are required (or --list)")
    if args.family not in FAMILIES:
        parser.error(f"unknown family {args.family!r}; known: {', '.join(FAMILIES)}")
    out = build_checkpoint(
        args.family, args.out_dir, size=args.size, seed=args.seed, dtype=args.dtype
    )
    print(json.dumps({"checkpoint": str(out), **model_shape(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
