"""The guard lifecycle in `EngineSteering`, without vLLM: a guarded request runs unsteered while
its prompt is computed, each prompt position is counted once (chunked prefill, preemption), the
decision is made after the last prompt token, and a decided request's prompt stays unsteered
if it is computed again. The routing the layers would record is written into the capture
buffer by hand."""

from __future__ import annotations

import numpy as np
import torch

from expert_profiles.guard_spec import GuardSpec
from expert_profiles.request_steering import GUARD_ID_KEY, RESOLVED_KEY, guarded
from tests.vllm_patches.test_steering_table import MOE_LAYERS, NUM_EXPERTS, X, make_engine

PROMPT = 6


def guard(prefers: int, threshold: float = 0.5) -> GuardSpec:
    """Fires when layer 1 routes tokens to expert `prefers` (weight 20 on its share)."""
    weights = [[0.0] * NUM_EXPERTS for _ in MOE_LAYERS]
    weights[0][prefers] = 20.0
    return GuardSpec("g", tuple(MOE_LAYERS), tuple(tuple(row) for row in weights), -10.0,
                     threshold)


class Guarded:
    """extra_args of guarded requests, and the prompt lengths the worker reads."""

    def __init__(self, spec: GuardSpec):
        self.extra = {}
        self.spec = spec

    def add(self, req_id: str, decision_id: str | None = None) -> None:
        args = {RESOLVED_KEY: guarded(X, self.spec).to_extra_args()}
        if decision_id is not None:
            args[GUARD_ID_KEY] = decision_id
        self.extra[req_id] = args

    def __call__(self, req_id: str):
        return self.extra.get(req_id)


def run(engine, requests: Guarded, req_id: str, count: int, first: int, expert: int) -> list:
    """One step of `count` tokens from position `first`; the layers route every token to
    `expert` (and expert 7). Returns the step's per-token slots."""
    engine.prepare_step([req_id], np.array([count]), np.array([first]), requests,
                        prompt_len_of=lambda r: PROMPT)
    slots = engine.table.token_profiles[:count].tolist()
    ids = torch.tensor([expert, 7], dtype=torch.int32)
    engine.recorder.buffer[:, :count] = ids
    engine.finish_step()
    return slots


def test_a_guard_that_fires_steers_only_the_tokens_after_the_prompt():
    engine, requests = make_engine(), Guarded(guard(prefers=3))
    requests.add("r", decision_id="client-r")
    assert run(engine, requests, "r", 4, 0, expert=3) == [0] * 4  # chunked prefill
    assert engine.guard_decisions.take(["client-r"]) == {}  # not decided yet
    assert run(engine, requests, "r", 2, 4, expert=3) == [0] * 2
    decision = engine.guard_decisions.take(["client-r"])["client-r"]
    assert decision["fired"] is True and decision["prompt_tokens"] == PROMPT
    assert abs(decision["score"] - requests.spec.score(_counts(3, PROMPT), PROMPT)) < 1e-6
    steered = run(engine, requests, "r", 1, PROMPT, expert=0)
    assert steered[0] != 0
    # Preempted: the prompt is computed again, unsteered as the first time; decode is steered.
    again = run(engine, requests, "r", PROMPT + 1, 0, expert=0)
    assert again[:PROMPT] == [0] * PROMPT and again[PROMPT] == steered[0]
    assert engine.guard_decisions.take(["client-r"]) == {}  # decided once


def test_a_guard_that_does_not_fire_leaves_the_request_unsteered():
    engine, requests = make_engine(), Guarded(guard(prefers=3))
    requests.add("r")
    run(engine, requests, "r", PROMPT, 0, expert=5)
    assert engine.guard_decisions.take(["r"])["r"]["fired"] is False
    assert run(engine, requests, "r", 1, PROMPT, expert=3) == [0]
    assert not engine.flags.recording  # nothing left to count


def test_preemption_during_the_prompt_counts_each_position_once():
    engine, requests = make_engine(), Guarded(guard(prefers=3))
    requests.add("r")
    run(engine, requests, "r", 3, 0, expert=3)
    # Preempted after 3 tokens, recomputed from 0 with other routing: positions 0-2 are not
    # counted again; 3-5 are.
    run(engine, requests, "r", PROMPT, 0, expert=5)
    decision = engine.guard_decisions.take(["r"])["r"]
    assert decision["prompt_tokens"] == PROMPT
    counts = _counts(3, 3) + _counts(5, 3)
    assert abs(decision["score"] - requests.spec.score(counts, PROMPT)) < 1e-6


def test_a_request_finished_during_its_prompt_leaves_nothing_behind():
    engine, requests = make_engine(), Guarded(guard(prefers=3))
    requests.add("r")
    run(engine, requests, "r", 3, 0, expert=3)
    engine.forget(["r"])
    assert not engine._guarded and not engine._decided and not engine._steer_from
    assert engine.guard_decisions.take(["r"]) == {}
    # The same id again starts from nothing.
    run(engine, requests, "r", PROMPT, 0, expert=5)
    assert engine.guard_decisions.take(["r"])["r"]["prompt_tokens"] == PROMPT


def test_a_guard_the_engine_cannot_run_applies_its_profile():
    engine = make_engine()
    requests = Guarded(GuardSpec("g", (0, 1), ((0.0,) * NUM_EXPERTS,) * 2, 0.0, 0.5))
    requests.add("r")
    slots = run(engine, requests, "r", 2, 0, expert=3)
    assert slots[0] != 0 and slots == [slots[0]] * 2  # fail closed: steered
    decision = engine.guard_decisions.take(["r"])["r"]
    assert decision["fired"] is None and "profile applies" in decision["error"]


def _counts(expert: int, tokens: int) -> np.ndarray:
    counts = np.zeros((len(MOE_LAYERS), NUM_EXPERTS), dtype=np.int64)
    counts[:, expert] += tokens
    counts[:, 7] += tokens
    return counts
