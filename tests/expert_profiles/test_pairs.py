"""`expert_profiles.pairs` and the pure parts of `detection`: parsing, rendering, target spans,
counting, checkpoint state; and the example pairs file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expert_profiles.examples import make_pairs
from expert_profiles.pairs import (
    PairsFileError,
    PairSide,
    count_pairs,
    iter_lines,
    parse_pair,
    render_side,
)
from profile_tools.detection import (
    DetectionError,
    DetectionState,
    count_target_experts,
    scan_pairs,
)

GOOD = {
    "id": 1,
    "side1": {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "target": "5"},
    "side2": {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "target": "five"},
}


@pytest.fixture(scope="module")
def tokenizer(build_tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny("qwen3_moe")))


def test_parse_good_pair():
    pair = parse_pair(json.dumps(GOOD), 1)
    assert pair.id == 1 and pair.side2.target == "five"
    assert pair.side1.messages[0].role == "user"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "line 7: not valid JSON"),
        (json.dumps({**GOOD, "side2": None}), "line 7: side2"),
        (json.dumps({**GOOD, "extra": 1}), "line 7: extra"),
        (json.dumps({**GOOD, "side1": {**GOOD["side1"], "target": "  "}}), "target must not be"),
        (json.dumps({**GOOD, "side1": {"messages": [{"content": "x"}], "target": "a"}}), "role"),
    ],
)
def test_parse_errors_name_the_line(line, message):
    with pytest.raises(PairsFileError, match=message):
        parse_pair(line, 7)


def test_scan_and_stream(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": 2}) + "\n")
    assert scan_pairs(path) == 2 == count_pairs(path)
    assert [n for n, _ in iter_lines(path, skip=1)] == [2, 3]
    path.write_text(json.dumps(GOOD) + "\nnot json\n")
    with pytest.raises(PairsFileError, match="line 2"):
        scan_pairs(path)
    path.write_text("\n")
    with pytest.raises(PairsFileError, match="no pairs"):
        scan_pairs(path)


def test_render_locates_the_target_tokens(tokenizer):
    side = PairSide.model_validate(
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "What is 7 + 8?"}],
         "target": "7 + 8 = 15."}
    )
    rendered = render_side(tokenizer, side)
    span = rendered.token_ids[rendered.target_start:rendered.target_end]
    assert tokenizer.decode(span).strip() == "7 + 8 = 15."
    # Same ids as the template's own tokenization; the prompt part is the generation prompt.
    conversation = [m.model_dump() for m in side.messages]
    full = tokenizer.apply_chat_template(
        conversation + [{"role": "assistant", "content": side.target}], tokenize=True,
        return_dict=False,
    )
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert rendered.token_ids == list(full)
    assert rendered.target_start == len(prompt)
    assert rendered.target_end < len(rendered.token_ids)  # the end-of-turn tokens follow


def test_render_uses_the_last_occurrence(tokenizer):
    side = PairSide.model_validate(
        {"messages": [{"role": "user", "content": "Say five."}], "target": "five"}
    )
    rendered = render_side(tokenizer, side)
    assert tokenizer.decode(rendered.token_ids[rendered.target_start:rendered.target_end]) \
        .strip() == "five"
    assert rendered.target_start > 5


def test_render_reports_a_template_that_drops_the_target():
    class Dropping:
        def apply_chat_template(self, conversation, tokenize):
            return "<s>hello</s>"

    side = PairSide.model_validate({"messages": [], "target": "absent"})
    with pytest.raises(PairsFileError, match="does not contain the target"):
        render_side(Dropping(), side)


# ---- counting and checkpoint state ---------------------------------------------------------


def test_count_target_experts_matches_a_loop():
    rng = np.random.default_rng(0)
    tokens, layers, top_k, experts = 12, 3, 2, 6
    ids = np.stack([
        np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)])
        for _ in range(tokens)
    ])
    got = count_target_experts(ids, 4, 10, experts)
    want = np.zeros((layers, experts), dtype=int)
    for t in range(4, 10):
        for j in range(layers):
            for e in set(ids[t, j].tolist()):
                want[j, e] += 1
    assert np.array_equal(got, want)
    assert got.sum() == 6 * layers * top_k


def test_count_refuses_uncomputed_rows():
    ids = np.zeros((5, 2, 2), dtype=np.int32)
    ids[3] = -1
    with pytest.raises(DetectionError, match="enable_prefix_caching=False"):
        count_target_experts(ids, 2, 5, 4)
    with pytest.raises(DetectionError, match="need 9"):
        count_target_experts(ids, 2, 9, 4)


def test_state_roundtrip_and_fingerprint(tmp_path):
    state = DetectionState.empty([0, 2], 4)
    state.a1[1, 3] = 7
    state.n1, state.lines_done, state.pairs_used = 9, 12, 10
    state.skip("p3", "too long")
    path = tmp_path / "x.detect-state.npz"
    fingerprint = {"model": "m", "pairs_file": "p.jsonl"}
    path.write_bytes(state.to_bytes(fingerprint))
    back = DetectionState.read(path, fingerprint)
    assert back.a1[1, 3] == 7 and back.n1 == 9 and back.lines_done == 12
    assert back.skipped == {"too long": 1} and back.moe_layers == [0, 2]
    with pytest.raises(DetectionError, match="another run"):
        DetectionState.read(path, {**fingerprint, "model": "other"})


# ---- the example pairs file ------------------------------------------------------------------


def test_example_file_is_valid_and_reproducible(tmp_path):
    assert scan_pairs(make_pairs.DEFAULT_OUT) == make_pairs.DEFAULT_COUNT
    fresh = make_pairs.write_pairs(tmp_path / "again.jsonl")
    assert fresh.read_bytes() == make_pairs.DEFAULT_OUT.read_bytes()
    first = parse_pair(make_pairs.DEFAULT_OUT.read_text().splitlines()[0], 1)
    assert first.side1.messages == first.side2.messages
    assert any(ch.isdigit() for ch in first.side1.target)
    assert not any(ch.isdigit() for ch in first.side2.target)


@pytest.mark.parametrize(("n", "words"), [(0, "zero"), (14, "fourteen"), (40, "forty"),
                                          (99, "ninety-nine"), (300, "three hundred"),
                                          (512, "five hundred and twelve")])
def test_number_words(n, words):
    assert make_pairs.number_words(n) == words
