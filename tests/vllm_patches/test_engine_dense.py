"""A model the plugin cannot steer (dense, no MoE layer): steered requests get a clear error,
unsteered ones are served as usual."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.engines import running_llm

pytestmark = pytest.mark.engine


def _dense_checkpoint(out: Path) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from profile_tools.checkpoint_factory import padded_vocab_size, write_tokenizer

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=padded_vocab_size(), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=1024, tie_word_embeddings=True,
    )
    Qwen3ForCausalLM(config).save_pretrained(out)
    write_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def dense_llm(tmp_path_factory):
    checkpoint = _dense_checkpoint(tmp_path_factory.mktemp("dense-qwen3"))
    with running_llm(checkpoint) as llm:
        yield llm


@pytest.mark.parametrize(
    "extra",
    [{"steering_profile": "anything"}, {"steering": {"activate": {"0": [1]}}}],
)
def test_steering_a_dense_model_is_a_clear_error(dense_llm, extra):
    from vllm import SamplingParams

    with pytest.raises(Exception, match="no Mixture-of-Experts layers to steer"):
        dense_llm.generate("Hello there", SamplingParams(max_tokens=2, extra_args=extra))


def test_unsteered_requests_are_served(dense_llm):
    from vllm import SamplingParams

    out = dense_llm.generate("Hello there", SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
