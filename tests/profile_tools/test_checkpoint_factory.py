"""`checkpoint_factory` (tiny and real checkpoints) and the Hugging Face reference in tests.

No vLLM engine here: checkpoints are built (once per session, by the `build_tiny` fixture of
tests/conftest.py), loaded in transformers, and checked for shape, caching, tokenizer and chat
template; then `tests.support.hf_reference` is checked on every family.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from profile_tools import checkpoint_factory as factory
from profile_tools.checkpoint_factory import FAMILIES, build_checkpoint, model_shape
from tests.support.hf_reference import (
    hf_routing,
    hf_steered_logits,
    load_reference_model,
    moe_layer_indices,
)

ALL_FAMILIES = sorted(FAMILIES)
REQUIRED = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "phimoe": "PhiMoEForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
TOKENS = list(range(6, 46))  # 40 tokens, clear of the special tokens 0..5


def test_required_families_are_present():
    for family, architecture in REQUIRED.items():
        assert FAMILIES[family].architecture == architecture
        assert FAMILIES[family].router in factory.ROUTER_KINDS


# --------------------------------------------------------------------------------------------
# Tiny checkpoints


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_tiny_checkpoint_loads_and_matches_its_shape(build_tiny, family):
    checkpoint = build_tiny(family)
    names = {p.name for p in checkpoint.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        factory.MARKER,
    } <= names

    model = load_reference_model(checkpoint)
    shape = model_shape(checkpoint)
    assert shape["architecture"] == FAMILIES[family].architecture
    assert shape["num_layers"] == model.config.num_hidden_layers == 4
    assert shape["moe_layers"] == moe_layer_indices(checkpoint)
    expected_layers = [1, 2, 3] if family.startswith("deepseek") else [0, 1, 2, 3]
    assert shape["moe_layers"] == expected_layers
    assert shape["top_k"] == 2
    assert shape["num_experts"] == (16 if family.startswith("deepseek") else 8)
    routing = hf_routing(checkpoint, TOKENS, None)
    assert routing.shape == (len(TOKENS), len(shape["moe_layers"]), shape["top_k"])
    assert routing.min() >= 0 and routing.max() < shape["num_experts"]

    config = json.loads((checkpoint / "config.json").read_text())
    assert config["vocab_size"] % 64 == 0
    assert config["vocab_size"] >= factory.tokenizer_size()
    assert model.get_input_embeddings().weight.shape[0] == config["vocab_size"]
    # Published key names, readable by older transformers too.
    assert "rope_theta" in config and "rope_parameters" not in config
    if family in ("qwen3_moe", "qwen2_moe", "olmoe"):
        assert "num_experts" in config and "num_local_experts" not in config


def test_routing_is_far_from_uniform(build_tiny):
    # Router weights are drawn large: the top expert of a token has most of the mass.
    model = load_reference_model(build_tiny("olmoe"))
    hidden = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model.layers[1].post_attention_layernorm(hidden)
        logits = torch.nn.functional.linear(hidden, model.model.layers[1].mlp.gate.weight)
    top = logits.softmax(-1).amax(-1)
    assert float(top.mean()) > 0.4  # uniform over 8 experts would be 0.125


def test_deepseek_v3_has_a_nonzero_correction_bias(build_tiny):
    model = load_reference_model(build_tiny("deepseek_v3"))
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().min() > 0 and bias.std() > 0.01


def test_rebuild_is_a_cache_hit(tmp_path: Path):
    out = build_checkpoint("qwen3_moe", tmp_path / "ck")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build_checkpoint("qwen3_moe", tmp_path / "ck")
    assert again == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_other_seed_rebuilds_and_same_seed_is_byte_identical(tmp_path: Path):
    first = build_checkpoint("deepseek_v3", tmp_path / "a", seed=3)
    second = build_checkpoint("deepseek_v3", tmp_path / "b", seed=3)
    weights = (first / "model.safetensors").read_bytes()
    assert weights == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()

    build_checkpoint("deepseek_v3", tmp_path / "b", seed=4)
    assert (second / "model.safetensors").read_bytes() != weights
    assert json.loads((second / factory.MARKER).read_text())["seed"] == 4


def test_interrupted_build_is_redone(tmp_path: Path):
    out = build_checkpoint("olmoe", tmp_path / "ck")
    (out / factory.MARKER).unlink()
    (out / "model.safetensors").write_bytes(b"truncated")
    build_checkpoint("olmoe", out)
    assert (out / "model.safetensors").stat().st_size > 1000
    assert (out / factory.MARKER).exists()


def test_missing_file_with_a_marker_is_rebuilt(tmp_path: Path):
    out = build_checkpoint("olmoe", tmp_path / "ck")
    (out / "model.safetensors").unlink()
    build_checkpoint("olmoe", out)
    assert (out / "model.safetensors").exists()


def test_bfloat16_weights(tmp_path: Path):
    from safetensors import safe_open

    out = build_checkpoint("mixtral", tmp_path / "ck", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_unknown_family_size_and_dtype_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown family"):
        build_checkpoint("nope", tmp_path)
    with pytest.raises(ValueError, match="size"):
        build_checkpoint("olmoe", tmp_path, size="huge")
    with pytest.raises(ValueError, match="dtype"):
        build_checkpoint("olmoe", tmp_path, dtype="int8")


# --------------------------------------------------------------------------------------------
# Tokenizer and chat template


def test_tokenizer_round_trips_and_has_a_chat_template(build_tiny):
    from transformers import AutoTokenizer

    checkpoint = build_tiny("qwen3_moe")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    for text in ["The quick brown fox jumps over the lazy dog.", "  12:45, 3.14 — naïve 🙂\n\t"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert len(tokenizer) == factory.tokenizer_size()
    # The corpus is small; merges still make common words single tokens.
    assert len(tokenizer.encode(" the", add_special_tokens=False)) == 1

    config = json.loads((checkpoint / "config.json").read_text())
    assert tokenizer.convert_tokens_to_ids(factory.EOS) == config["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids(factory.BOS) == config["bos_token_id"]
    assert tokenizer.eos_token == factory.EOS and tokenizer.pad_token == factory.PAD

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == config["bos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


def test_generation_config_names_the_special_tokens(build_tiny):
    checkpoint = build_tiny("olmoe")
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    config = json.loads((checkpoint / "config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert generation["pad_token_id"] == config["pad_token_id"]


# --------------------------------------------------------------------------------------------
# Real-size configs (config.json only)

PUBLISHED = {  # family: (num_layers, num_experts, top_k, billions of parameters)
    "qwen3_moe": (48, 128, 8, 30.5),
    "olmoe": (16, 64, 8, 6.9),
    "mixtral": (32, 8, 2, 46.7),
    "phimoe": (32, 16, 2, 41.9),
    "gpt_oss": (24, 32, 4, 20.9),
    "deepseek_v2": (27, 64, 6, 15.7),
    "deepseek_v3": (27, 64, 6, 16.0),
    "qwen2_moe": (24, 60, 4, 14.3),
    "granitemoe": (24, 32, 8, 1.3),
}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_real_size_writes_the_published_shape(tmp_path: Path, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = build_checkpoint(family, tmp_path / family, size="real")
    assert not (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    shape = model_shape(out)
    layers, experts, top_k, billions = PUBLISHED[family]
    assert (shape["num_layers"], shape["num_experts"], shape["top_k"]) == (layers, experts, top_k)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    count = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(count - billions) / billions < 0.03, count


def test_real_then_tiny_in_the_same_dir(tmp_path: Path):
    out = build_checkpoint("olmoe", tmp_path / "ck", size="real")
    build_checkpoint("olmoe", out, size="tiny")
    assert model_shape(out)["num_layers"] == 4 and (out / "model.safetensors").exists()
    build_checkpoint("olmoe", out, size="real")
    assert model_shape(out)["num_layers"] == 16 and not (out / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------
# model_shape on hand-written configs


def _shape_of(tmp_path: Path, config: dict) -> dict:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return model_shape(tmp_path)


def test_model_shape_qwen_sparse_step_and_dense_layers(tmp_path: Path):
    shape = _shape_of(
        tmp_path,
        {
            "architectures": ["Qwen2MoeForCausalLM"],
            "num_hidden_layers": 8,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [3],
        },
    )
    assert shape == {
        "architecture": "Qwen2MoeForCausalLM",
        "num_layers": 8,
        "num_experts": 60,
        "top_k": 4,
        "moe_layers": [1, 5, 7],
    }


def test_model_shape_deepseek_dense_prefix_and_frequency(tmp_path: Path):
    shape = _shape_of(
        tmp_path,
        {
            "architectures": ["DeepseekV3ForCausalLM"],
            "num_hidden_layers": 10,
            "n_routed_experts": 256,
            "num_experts_per_tok": 8,
            "first_k_dense_replace": 3,
            "moe_layer_freq": 2,
        },
    )
    assert shape["moe_layers"] == [4, 6, 8] and shape["num_experts"] == 256


def test_model_shape_every_layer_by_default(tmp_path: Path):
    shape = _shape_of(
        tmp_path,
        {
            "architectures": ["MixtralForCausalLM"],
            "num_hidden_layers": 3,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
    )
    assert shape["moe_layers"] == [0, 1, 2] and shape["num_experts"] == 8


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_list_and_build(tmp_path: Path, capsys):
    assert factory.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(family in listed for family in REQUIRED)
    assert factory.main(["olmoe", str(tmp_path / "ck"), "--size", "real"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_experts"] == 64 and printed["checkpoint"] == str(tmp_path / "ck")


# --------------------------------------------------------------------------------------------
# The Hugging Face reference with the SteerMoE edit


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_reference_is_finite_deterministic_and_obeys_steering(build_tiny, family):
    checkpoint = build_tiny(family)
    shape = model_shape(checkpoint)
    plain = hf_steered_logits(checkpoint, TOKENS, None)
    assert plain.shape == (
        len(TOKENS),
        json.loads((checkpoint / "config.json").read_text())["vocab_size"],
    )
    assert plain.dtype == torch.float32 and torch.isfinite(plain).all()
    assert torch.equal(plain, hf_steered_logits(checkpoint, TOKENS, None))

    steering = {layer: ([0], [1]) for layer in shape["moe_layers"]}
    routing = hf_routing(checkpoint, TOKENS, steering)
    assert (routing == 0).any(axis=-1).all()
    assert not (routing == 1).any()
    # Unsteered, expert 0 is not everywhere and expert 1 is used somewhere: the edit did it.
    plain_routing = hf_routing(checkpoint, TOKENS, None)
    assert not (plain_routing == 0).any(axis=-1).all()
    assert (plain_routing == 1).any()

    steered = hf_steered_logits(checkpoint, TOKENS, steering)
    assert torch.isfinite(steered).all() and not torch.allclose(steered, plain, atol=1e-3)
    # The patch is gone afterwards.
    assert torch.equal(hf_steered_logits(checkpoint, TOKENS, None), plain)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_activating_top_k_experts_fixes_the_routing(build_tiny, family):
    checkpoint = build_tiny(family)
    shape = model_shape(checkpoint)
    chosen = list(range(shape["num_experts"] - shape["top_k"], shape["num_experts"]))
    layer = shape["moe_layers"][-1]
    routing = hf_routing(checkpoint, TOKENS, {layer: (chosen, [])})
    assert (routing[:, -1] == np.array(chosen)).all()
    # Layers before the steered one are untouched.
    plain = hf_routing(checkpoint, TOKENS, None)
    assert np.array_equal(routing[:, :-1], plain[:, :-1])


def test_empty_steering_is_the_plain_model(build_tiny):
    checkpoint = build_tiny("qwen3_moe")
    plain = hf_steered_logits(checkpoint, TOKENS, None)
    empty = hf_steered_logits(checkpoint, TOKENS, {0: ([], []), 2: ([], [])})
    torch.testing.assert_close(empty, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(hf_steered_logits(checkpoint, TOKENS, {}), plain)


def test_reference_refuses_dense_and_missing_layers(build_tiny):
    checkpoint = build_tiny("deepseek_v2")
    with pytest.raises(ValueError, match="no MoE router"):
        hf_steered_logits(checkpoint, TOKENS, {0: ([0], [])})
    with pytest.raises(ValueError, match="out of range"):
        hf_steered_logits(checkpoint, TOKENS, {9: ([0], [])})


def test_softmax_router_edit_is_the_papers_log_prob_edit(build_tiny):
    # On one layer, the reference's selection equals top-k of softmax(steer_log_probs(z)).
    from vllm_patches.steering_math import steer_log_probs

    checkpoint = build_tiny("mixtral")
    model = load_reference_model(checkpoint)
    captured = {}
    router = model.model.layers[2].mlp.gate
    handle = router.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    try:
        routing = hf_routing(checkpoint, TOKENS, {2: ([3], [5, 6])})
    finally:
        handle.remove()
    with torch.no_grad():
        z = torch.nn.functional.linear(captured["x"].reshape(len(TOKENS), -1), router.weight)
    want = steer_log_probs(z, [3], [5, 6], 0.01).softmax(-1).topk(2, dim=-1).indices
    assert np.array_equal(routing[:, 2], want.sort(dim=-1).values.numpy())
