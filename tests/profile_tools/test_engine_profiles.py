"""One real Qwen3-MoE engine (prefix caching off) serving a profile directory:

- detection counts equal counts made here from the raw routing capture of the same requests;
  the profile follows the RD table; serving it shifts routing as the profile says; an
  interrupted detection resumes to the same result;
- the store is live: a profile edited while requests run affects new requests only, a corrupt
  file fails only its own requests, an added profile serves at once, a deleted one is unknown.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from expert_profiles.examples.make_pairs import DEFAULT_OUT as EXAMPLE_PAIRS
from expert_profiles.pairs import parse_pair
from expert_profiles.schema import SteeringProfile
from expert_profiles.store import ProfileStore
from profile_tools.checkpoint_factory import model_shape
from profile_tools.detection import DetectionError, DetectionState, detect_profile
from tests.support.engines import running_llm
from vllm_patches.routing_capture import fetch_routing

pytestmark = pytest.mark.engine

NUM_PAIRS = 24
BATCH_PAIRS = 8
ACTIVATE, DEACTIVATE = 3, 4
PROMPTS = ["The library opens at eight in the morning and",
           "Red, orange, yellow, green, blue, indigo and violet are",
           "What is 7 + 8? The answer is"]


@pytest.fixture(scope="module")
def engine(build_tiny, tmp_path_factory):
    checkpoint = build_tiny("qwen3_moe")
    profiles = tmp_path_factory.mktemp("profiles")
    pairs = tmp_path_factory.mktemp("pairs") / "digits.jsonl"
    lines = EXAMPLE_PAIRS.read_text().splitlines()[:NUM_PAIRS]
    pairs.write_text("\n".join(lines) + "\n")
    with running_llm(checkpoint, profiles, enable_prefix_caching=False) as llm:
        yield {"llm": llm, "checkpoint": checkpoint, "store": ProfileStore(profiles),
               "pairs": pairs, "shape": model_shape(checkpoint)}


@pytest.fixture(scope="module")
def detected(engine):
    result = detect_profile(engine["llm"], engine["pairs"], engine["store"].directory,
                            name="digits", activate=ACTIVATE, deactivate=DEACTIVATE,
                            batch_size=BATCH_PAIRS, progress=False)
    return result


def _params(max_tokens: int = 1, **extra: Any):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=extra or None)


def _capture(llm, prompts, max_tokens: int = 1, **extra: Any):
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
    outputs = llm.generate(prompts, _params(max_tokens, capture_routing=True, **extra),
                           use_tqdm=False)
    records = fetch_routing(llm, [o.request_id for o in outputs])
    return [records[o.request_id] for o in outputs]


# ---- detection -------------------------------------------------------------------------------


def _sides_by_template(tokenizer, pair) -> list[tuple[list[int], int, int]]:
    """(token ids, target start, target end) found from the template's own tokenization."""
    sides = []
    for side in (pair.side1, pair.side2):
        messages = [m.model_dump() for m in side.messages]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": side.target}], tokenize=True,
            return_dict=False,
        )
        target = tokenizer(side.target, add_special_tokens=False)["input_ids"]
        assert list(full[: len(prompt)]) == list(prompt)
        assert list(full[len(prompt): len(prompt) + len(target)]) == list(target)
        sides.append((list(full), len(prompt), len(prompt) + len(target)))
    return sides


def test_detection_counts_equal_counts_from_the_raw_capture(engine, detected):
    from transformers import AutoTokenizer

    pd = pytest.importorskip("pandas")
    tokenizer = AutoTokenizer.from_pretrained(str(engine["checkpoint"]))
    lines = engine["pairs"].read_text().splitlines()
    pairs = [parse_pair(line, n) for n, line in enumerate(lines, 1)]
    num_experts = engine["shape"]["num_experts"]
    hits = {1: {}, 2: {}}
    tokens = {1: 0, 2: 0}
    for start in range(0, len(pairs), BATCH_PAIRS):  # the same requests, batched the same way
        sides = [s for pair in pairs[start:start + BATCH_PAIRS]
                 for s in _sides_by_template(tokenizer, pair)]
        records = _capture(engine["llm"], [ids for ids, _, _ in sides])
        for index, ((_, first, last), record) in enumerate(zip(sides, records, strict=True)):
            which = 1 if index % 2 == 0 else 2
            tokens[which] += last - first
            for t in range(first, last):
                for j, layer in enumerate(record.moe_layers):
                    for expert in set(record.expert_ids[t, j].tolist()):
                        assert 0 <= expert < num_experts
                        key = (layer, expert)
                        hits[which][key] = hits[which].get(key, 0) + 1

    table = pd.read_csv(detected.stats_path)
    assert len(table) == len(engine["shape"]["moe_layers"]) * num_experts
    assert set(table["N1"]) == {tokens[1]} and set(table["N2"]) == {tokens[2]}
    for row in table.to_dict(orient="records"):
        key = (row["layer"], row["expert"])
        a1, a2 = row["A1"], row["A2"]
        assert a1 == hits[1].get(key, 0), key
        assert a2 == hits[2].get(key, 0), key
        assert (row["D1"], row["D2"]) == (tokens[1] - a1, tokens[2] - a2)
        assert row["RD"] == pytest.approx(a1 / tokens[1] - a2 / tokens[2], abs=1e-12)
    assert detected.pairs_used == NUM_PAIRS and detected.pairs_skipped == 0
    assert detected.heatmap_path.read_bytes()[:4] == b"\x89PNG"


def test_profile_takes_the_experts_the_rd_table_names(engine, detected):
    pd = pytest.importorskip("pandas")
    shape = engine["shape"]
    table = pd.read_csv(detected.stats_path)
    table["abs_rd"] = table["RD"].abs()
    ranked = table.sort_values(["abs_rd", "layer", "expert"], ascending=[False, True, True])
    want_on: dict[int, list[int]] = {}
    for row in ranked[ranked["RD"] > 0].head(ACTIVATE).itertuples():
        if len(want_on.get(row.layer, [])) < shape["top_k"]:
            want_on.setdefault(row.layer, []).append(row.expert)
    want_off: dict[int, list[int]] = {}
    for row in ranked[ranked["RD"] < 0].head(DEACTIVATE).itertuples():
        if len(want_off.get(row.layer, [])) < shape["num_experts"] - shape["top_k"]:
            want_off.setdefault(row.layer, []).append(row.expert)
    profile = engine["store"].get("digits")
    assert profile.activate == {k: sorted(v) for k, v in want_on.items()}
    assert profile.deactivate == {k: sorted(v) for k, v in want_off.items()}
    assert profile.model.architecture == shape["architecture"]
    assert profile.source["pairs_used"] == NUM_PAIRS


def _assert_steered(records, activate: dict[int, list[int]], deactivate: dict[int, list[int]]):
    for record in records:
        computed = record.expert_ids[(record.expert_ids >= 0).all(axis=(1, 2))]
        assert len(computed) > 0
        for layer, experts in activate.items():
            column = computed[:, record.moe_layers.index(layer)]
            for expert in experts:
                assert (column == expert).any(axis=1).all(), (layer, expert)
        for layer, experts in deactivate.items():
            column = computed[:, record.moe_layers.index(layer)]
            assert not np.isin(column, experts).any(), (layer, experts)


def test_serving_the_detected_profile_shifts_routing(engine, detected):
    profile = engine["store"].get("digits")
    steered = _capture(engine["llm"], PROMPTS, max_tokens=4, steering_profile="digits")
    _assert_steered(steered, profile.activate, profile.deactivate)
    plain = _capture(engine["llm"], PROMPTS, max_tokens=4)
    with pytest.raises(AssertionError):  # without steering the model routes differently
        _assert_steered(plain, profile.activate, profile.deactivate)


class _Interrupted(Exception):
    pass


class _InterruptingTokenizer:
    """The engine's tokenizer, failing after `limit` renderings (an interrupted run)."""

    def __init__(self, tokenizer, limit: int):
        self._tokenizer = tokenizer
        self._left = limit

    def apply_chat_template(self, *args, **kwargs):
        if self._left == 0:
            raise _Interrupted
        self._left -= 1
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def test_interrupted_detection_resumes_to_the_same_result(engine, detected):
    llm, directory = engine["llm"], engine["store"].directory
    interrupting = _InterruptingTokenizer(llm.get_tokenizer(), limit=2 * 2 * BATCH_PAIRS + 3)
    with pytest.raises(_Interrupted):
        detect_profile(llm, engine["pairs"], directory, name="digits-resumed",
                       activate=ACTIVATE, deactivate=DEACTIVATE, batch_size=BATCH_PAIRS,
                       tokenizer=interrupting, progress=False)
    state_path = directory / "digits-resumed.detect-state.npz"
    assert not engine["store"].exists("digits-resumed")
    with pytest.raises(DetectionError, match="--resume"):
        detect_profile(llm, engine["pairs"], directory, name="digits-resumed",
                       batch_size=BATCH_PAIRS, progress=False)
    fingerprint = {"model": {k: engine["shape"][k] for k in
                             ("architecture", "num_layers", "num_experts", "top_k")},
                   "pairs_file": engine["pairs"].name,
                   "moe_layers": engine["shape"]["moe_layers"]}
    partial = DetectionState.read(state_path, fingerprint)
    assert partial.lines_done == 2 * BATCH_PAIRS and partial.pairs_used == 2 * BATCH_PAIRS

    detect_profile(llm, engine["pairs"], directory, name="digits-resumed", activate=ACTIVATE,
                   deactivate=DEACTIVATE, batch_size=BATCH_PAIRS, resume=True, progress=False)
    assert not state_path.exists()
    store = engine["store"]
    assert store.get_stats("digits-resumed") == store.get_stats("digits")
    resumed, original = store.get("digits-resumed"), store.get("digits")
    assert (resumed.activate, resumed.deactivate) == (original.activate, original.deactivate)


def test_pairs_too_long_for_the_context_are_skipped_and_counted(engine, tmp_path):
    lines = engine["pairs"].read_text().splitlines()[:2]
    long_pair = parse_pair(lines[1], 2).model_dump()
    long_pair["side2"]["messages"][0]["content"] = "seven " * 600
    pairs = tmp_path / "long.jsonl"
    pairs.write_text(lines[0] + "\n" + json.dumps(long_pair) + "\n")
    result = detect_profile(engine["llm"], pairs, tmp_path, name="with-long", activate=1,
                            deactivate=0, progress=False)
    assert (result.pairs_used, result.pairs_skipped) == (1, 1)
    source = ProfileStore(tmp_path).get("with-long").source
    assert source["skipped_reasons"] == {"longer than max_model_len - 1 (511)": 1}


def test_detection_refuses_an_engine_with_prefix_caching(engine, monkeypatch, tmp_path):
    cache_config = engine["llm"].llm_engine.vllm_config.cache_config
    monkeypatch.setattr(cache_config, "enable_prefix_caching", True)
    with pytest.raises(DetectionError, match="enable_prefix_caching=False"):
        detect_profile(engine["llm"], engine["pairs"], tmp_path, name="x", progress=False)


# ---- the live store --------------------------------------------------------------------------


def _profile(engine, name: str, **sets: Any) -> SteeringProfile:
    model = {k: engine["shape"][k] for k in ("architecture", "num_layers", "num_experts", "top_k")}
    return SteeringProfile.model_validate({"name": name, "model": model, **sets})


_ids = itertools.count()


def test_edit_while_running_affects_new_requests_only(engine):
    llm, store = engine["llm"], engine["store"]
    first = {"activate": {"1": [3]}, "deactivate": {"1": [5]}}
    second = {"activate": {"1": [5]}, "deactivate": {"1": [3]}}
    store.put(_profile(engine, "live", **first), overwrite=True)
    params = _params(12, steering_profile="live", capture_routing=True)
    old_id, new_id = f"live-old-{next(_ids)}", f"live-new-{next(_ids)}"
    llm.llm_engine.add_request(old_id, PROMPTS[0], params)
    produced = 0
    while produced < 2:  # the old request is decoding when the profile changes
        for output in llm.llm_engine.step():
            if output.request_id == old_id:
                produced = len(output.outputs[0].token_ids)
                assert not output.finished
    store.put(_profile(engine, "live", **second), overwrite=True)
    llm.llm_engine.add_request(new_id, PROMPTS[1], params)
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    records = fetch_routing(llm, [old_id, new_id])
    _assert_steered([records[old_id]], {1: [3]}, {1: [5]})
    _assert_steered([records[new_id]], {1: [5]}, {1: [3]})
    old_rows = (records[old_id].expert_ids >= 0).all(axis=(1, 2)).sum()
    assert old_rows > len(llm.get_tokenizer()(PROMPTS[0])["input_ids"]), \
        "the old request's decode steps after the edit were recorded"


def test_corrupt_file_fails_only_its_own_requests(engine, detected):
    llm, store = engine["llm"], engine["store"]
    store.put(_profile(engine, "fragile", activate={"2": [1]}), overwrite=True)
    store.profile_path("fragile").write_text('{"format": "steermoe-profile/1", "name": "fra')
    with pytest.raises(Exception, match="steering profile 'fragile' cannot be used: "
                                        "fragile.json: not valid JSON"):
        llm.generate(PROMPTS[0], _params(2, steering_profile="fragile"), use_tqdm=False)
    profile = store.get("digits")
    steered = _capture(llm, PROMPTS[:2], max_tokens=2, steering_profile="digits")
    _assert_steered(steered, profile.activate, profile.deactivate)
    store.put(_profile(engine, "fragile", activate={"2": [1]}), overwrite=True)
    _assert_steered(_capture(llm, PROMPTS[:1], steering_profile="fragile"), {2: [1]}, {})


def test_added_profile_serves_without_restart_and_deleted_one_is_unknown(engine):
    llm, store = engine["llm"], engine["store"]
    assert not store.exists("fresh")
    with pytest.raises(Exception, match="unknown steering profile 'fresh'"):
        llm.generate(PROMPTS[0], _params(1, steering_profile="fresh"), use_tqdm=False)
    store.put(_profile(engine, "fresh", activate={"2": [4]}, deactivate={"0": [0, 1]}))
    _assert_steered(_capture(llm, PROMPTS, max_tokens=3, steering_profile="fresh"),
                    {2: [4]}, {0: [0, 1]})
    store.delete("fresh")
    with pytest.raises(Exception, match="unknown steering profile 'fresh'"):
        llm.generate(PROMPTS[0], _params(1, steering_profile="fresh"), use_tqdm=False)
    assert [Path(p).name for p in store.list()].count("fresh") == 0
