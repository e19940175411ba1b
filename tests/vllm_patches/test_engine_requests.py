"""One real Qwen3-MoE engine: bad steering fails its own request, prefix caching is salted,
and unsteered requests are untouched by the plugin (compared with an engine without it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from profile_tools.checkpoint_factory import model_shape
from tests.support.engines import running_llm
from vllm_patches.routing_capture import fetch_routing

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [
    "The library opens at eight in the morning and",
    "Red, orange, yellow, green, blue, indigo and violet are",
    "The meeting starts at 9:30 on Monday and ends",
]


def _profile(name: str, model: dict[str, Any], **sets: Any) -> dict[str, Any]:
    return {"format": "steermoe-profile/1", "name": name, "model": model, **sets}


@pytest.fixture(scope="module")
def engine(build_tiny, tmp_path_factory):
    checkpoint = build_tiny("qwen3_moe")
    shape = model_shape(checkpoint)
    model = {k: shape[k] for k in ("architecture", "num_layers", "num_experts", "top_k")}
    profiles = tmp_path_factory.mktemp("profiles")
    (profiles / "calm.json").write_text(
        json.dumps(_profile("calm", model, activate={"1": [5]}, deactivate={"2": [0, 1]}))
    )
    other = {**model, "num_experts": 64, "top_k": 8}
    (profiles / "other-model.json").write_text(
        json.dumps(_profile("other-model", other, deactivate={"1": [40]}))
    )
    with running_llm(checkpoint, profiles, enable_prefix_caching=True, block_size=32) as llm:
        yield {"llm": llm, "checkpoint": checkpoint, "shape": shape, "profiles": profiles}


def _params(**extra: Any):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=5,
                          extra_args=extra or None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"steering_profile": "nope"}, "unknown steering profile 'nope'"),
        ({"steering_profile": "other-model"}, "but the served model is Qwen3MoeForCausalLM"),
        ({"steering_profile": "../calm"}, "invalid steering profile name"),
        ({"steering": {"activate": {"1": [99]}}}, "the model has 8 experts per layer"),
        ({"steering": {"activate": {"1": [0, 1, 2]}}}, "more than the model's top-k of 2"),
        ({"steering": {"activate": {"9": [0]}}}, "layer 9 does not exist"),
        ({"steering": {"activate": "all"}}, "invalid inline steering"),
        ({"steering": {"activate": {"1": [0]}}, "steering_profile": "calm"}, "not both"),
        ({"capture_routing": "yes"}, "'capture_routing' must be true or false"),
        ({"steering": {}}, "steering selects no experts"),
        ({"steering": {"activate": {"1": []}}}, "steering selects no experts"),
        ({"steering": "{}"}, "steering selects no experts"),
        ({"steering": "[" * 5000}, "must be an object"),
    ],
)
def test_bad_steering_fails_only_that_request(engine, extra, message):
    llm = engine["llm"]
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        llm.generate(PROMPTS[0], _params(**extra))
    # The engine keeps serving, steered and not.
    ok = llm.generate(PROMPTS, [_params(), _params(steering_profile="calm"), _params()])
    assert all(len(o.outputs[0].token_ids) == 4 for o in ok)


def test_prefix_cache_is_not_shared_across_steering(engine):
    llm = engine["llm"]
    prompt = (
        "Please answer the question using only the document. If the answer is not there, say "
        "so clearly. The library opens at eight in the morning and closes at six in the evening"
    )
    capture = {"capture_routing": True}
    runs = [
        ({}, "plain, fills the cache"),
        ({"steering_profile": "calm"}, "steered: must not reuse the plain blocks"),
        ({"steering_profile": "calm"}, "steered again: reuses the steered blocks"),
        ({"steering": {"activate": {"1": [5]}, "deactivate": {"2": [0, 1]}}}, "same sets inline"),
    ]
    computed = []
    for extra, _ in runs:
        out = llm.generate(prompt, _params(**capture, **extra))[0]
        ids = fetch_routing(llm, [out.request_id])[out.request_id].expert_ids
        computed.append(int((ids[:, 0, 0] >= 0).sum()))
    prompt_len = len(out.prompt_token_ids)
    assert computed[1] >= prompt_len, "a steered request reused unsteered KV blocks"
    assert computed[2] < prompt_len, "identical steering should share the prefix cache"
    assert computed[3] < prompt_len, "identical expert sets (inline) share the prefix cache"


def _computed_prompt_rows(llm, prompt: str, **extra: Any) -> tuple[int, int]:
    """(prompt positions the engine computed rather than read from the prefix cache, prompt
    length) of one request."""
    out = llm.generate(prompt, _params(capture_routing=True, **extra))[0]
    ids = fetch_routing(llm, [out.request_id])[out.request_id].expert_ids
    prompt_len = len(out.prompt_token_ids)
    return int((ids[:prompt_len, 0, 0] >= 0).sum()), prompt_len


def test_prefix_cache_is_not_shared_between_two_steerings(engine):
    """Steering A fills the cache; steering B on the same prompt must compute every prompt
    position itself, and B again reuses B's blocks (so the cache is on and would be seen)."""
    llm = engine["llm"]
    prompt = ("Summarise the notice for a visitor. The swimming pool is closed on Tuesdays for "
              "cleaning, opens at seven on other days and lends towels at the front desk")
    steer_a = {"steering_profile": "calm"}
    steer_b = {"steering": {"activate": {"1": [6]}, "deactivate": {"2": [3]}}}
    computed_a, prompt_len = _computed_prompt_rows(llm, prompt, **steer_a)
    assert computed_a == prompt_len  # a prompt this engine has not seen
    computed_a_again, _ = _computed_prompt_rows(llm, prompt, **steer_a)
    assert computed_a_again < prompt_len, "steering A did not reuse its own blocks"
    computed_b, _ = _computed_prompt_rows(llm, prompt, **steer_b)
    assert computed_b == prompt_len, "steering B read KV blocks filled under steering A"
    computed_b_again, _ = _computed_prompt_rows(llm, prompt, **steer_b)
    assert computed_b_again < prompt_len, "steering B did not reuse its own blocks"
    computed_a_last, _ = _computed_prompt_rows(llm, prompt, **steer_a)
    assert computed_a_last == computed_a_again, "steering A now reads other blocks"


def test_prefix_cache_salt_cannot_be_forged(engine):
    """The digest of a steering is public; a client salt built from it must not let an
    unsteered request fill the blocks that steered requests read (nor steering A's, B's)."""
    from expert_profiles.directory import load_profile_file
    from expert_profiles.request_steering import salted

    llm = engine["llm"]
    prompt = ("Answer from the document only; say when the answer is not there. The museum "
              "opens at ten, closes at five, and is free on the first Sunday of every month")
    digest = load_profile_file(engine["profiles"] / "calm.json").digest(0.01)
    forged = [f"|steermoe:{digest}", salted(None, digest), f"steermoe:{digest}"]
    for salt in forged:
        llm.generate({"prompt": prompt, "cache_salt": salt}, _params())
    other = {"steering": {"activate": {"1": [6]}}}
    llm.generate(prompt, _params(**other))  # steering B fills its own blocks
    out = llm.generate(prompt, _params(capture_routing=True, steering_profile="calm"))[0]
    ids = fetch_routing(llm, [out.request_id])[out.request_id].expert_ids
    assert int((ids[:, 0, 0] >= 0).sum()) >= len(out.prompt_token_ids), \
        "a steered request read KV blocks filled under a forged salt or other steering"


PLUGIN_OFF_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    checkpoint, out, prompts, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), \
        json.loads(sys.argv[4])
    llm = LLM(model=checkpoint, **kwargs)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=5)
    result = []
    for o in llm.generate(prompts, params):
        c = o.outputs[0]
        result.append({"ids": list(c.token_ids),
                       "logprobs": [{str(t): l.logprob for t, l in d.items()} for d in c.logprobs]})
    json.dump(result, open(out, "w"))
"""


def test_unsteered_requests_match_an_engine_without_the_plugin(engine, tmp_path):
    from tests.support.engines import ENGINE_DEFAULTS

    llm = engine["llm"]
    mixed = llm.generate(
        PROMPTS, [_params(), _params(steering_profile="calm"), _params()]
    )
    script = tmp_path / "plugin_off.py"
    script.write_text(PLUGIN_OFF_SCRIPT)
    out = tmp_path / "plugin_off.json"
    kwargs = {**ENGINE_DEFAULTS, "enable_prefix_caching": True, "block_size": 32}
    env = {**os.environ, "VLLM_PLUGINS": "", "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, str(script), str(engine["checkpoint"]), str(out), json.dumps(PROMPTS),
         json.dumps(kwargs)],
        check=True, env=env, timeout=600,
    )
    reference = json.loads(out.read_text())
    for index in (0, 2):  # the unsteered requests of the mixed batch
        got = mixed[index].outputs[0]
        assert list(got.token_ids) == reference[index]["ids"]
        for step, want in zip(got.logprobs, reference[index]["logprobs"], strict=True):
            for token, logprob in step.items():
                assert logprob.logprob == pytest.approx(want[str(token)], abs=1e-5)
    # The steered one really was steered: its first-step distribution moved.
    steered_first = mixed[1].outputs[0].logprobs[0]
    plain_first = reference[1]["logprobs"][0]
    shared = [t for t in steered_first if str(t) in plain_first]
    moved = [abs(steered_first[t].logprob - plain_first[str(t)]) for t in shared]
    assert len(shared) < len(steered_first) or max(moved) > 1e-3
