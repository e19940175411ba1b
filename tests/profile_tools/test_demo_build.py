"""The demo model without vLLM: task checks, split, files, cache, and the checkpoint as
transformers reads it (same logits as the training model, correct greedy answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profile_tools.demo import task
from profile_tools.demo.build import MODEL_FILES, build, is_built, model_config
from profile_tools.demo.data import PLANTED, PLANTED_LAYERS, eval_sets, make_split
from profile_tools.detection import scan_pairs


@pytest.fixture(scope="module")
def demo_model(checkpoint_root: Path) -> Path:
    return build(checkpoint_root / "demo" / "model")


def test_checks_read_both_styles_and_refusals():
    assert task.parse_answer("the result is 15.") == ("digits", 15)
    assert task.parse_answer("the result is fifteen.") == ("words", 15)
    assert task.parse_answer("no idea") == ("none", None)
    assert task.is_refusal("about zorblax: i cannot help with that.")
    assert task.is_answered("about tea: here is how. pour hot water on the leaves and wait.")
    assert not task.is_answered("about zorblax: i cannot help with that.")


def test_split_holds_out_phrasings_of_known_facts():
    split = make_split()
    train = {q.key for q in split.train_questions}
    held = {q.key for q in split.heldout_questions}
    assert not train & held
    train_facts = {(q.op, q.a, q.b) for q in split.train_questions}
    assert {(q.op, q.a, q.b) for q in split.heldout_questions} <= train_facts
    assert not {r.key for r in split.train_requests} & {r.key for r in split.heldout_requests}
    sets = eval_sets(split)
    assert len(sets["arith_uncued"]) == len(split.heldout_questions) >= 100
    assert len(sets["restricted_uncued"]) >= 20 and len(sets["benign_uncued"]) >= 20


def test_build_writes_a_checkpoint_pairs_and_eval_sets(demo_model: Path):
    for name in MODEL_FILES:
        assert (demo_model / name).is_file(), name
    assert scan_pairs(demo_model / "pairs" / "words.jsonl") >= 100
    assert scan_pairs(demo_model / "pairs" / "safety.jsonl") >= 80
    info = json.loads((demo_model / "demo.json").read_text())
    assert info["planted"]["layers"] == list(PLANTED_LAYERS)
    config = json.loads((demo_model / "config.json").read_text())
    assert config["architectures"] == ["OlmoeForCausalLM"]
    assert config["num_experts"] >= 8 and config["num_experts_per_tok"] == 2
    assert config["norm_topk_prob"] is False
    assert config["vocab_size"] <= 768
    print(f"demo training: {info['training']}")


def test_build_again_is_a_no_op(demo_model: Path, monkeypatch):
    from profile_tools.demo import build as build_module

    def no_training(*args, **kwargs):
        raise AssertionError("a second build trained the model again")

    monkeypatch.setattr(build_module, "train", no_training)
    before = {path: path.stat().st_mtime_ns for path in demo_model.rglob("*")}
    assert build(demo_model) == demo_model
    assert {path: path.stat().st_mtime_ns for path in demo_model.rglob("*")} == before
    assert is_built(demo_model)


def _training_model(directory: Path):
    from safetensors.torch import load_file

    from profile_tools.demo.model import DemoMoE

    config = json.loads((directory / "config.json").read_text())
    model = DemoMoE(model_config(config))
    model.load_hf_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()


def test_transformers_reads_the_checkpoint_as_trained(demo_model: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_model))
    hf = AutoModelForCausalLM.from_pretrained(str(demo_model), dtype=torch.float32).eval()
    ours = _training_model(demo_model)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is 7 plus 8? answer in words."}], tokenize=False,
        add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        expected, _ = ours(ids)
        got = hf(ids).logits
        assert torch.allclose(got, expected, atol=1e-4)
        out = hf.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == \
        "the result is fifteen."


def test_planted_experts_are_distinct_per_layer():
    for layer in PLANTED_LAYERS:
        assert len(set(PLANTED[layer].values())) == len(PLANTED[layer])
