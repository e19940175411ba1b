"""The pieces that make steering exact under vLLM's parallel layouts, without an engine.

- pipeline stages: a table checks steering against the model's MoE layers and writes the ones
  its stage holds; the stages' routing records merge by layer into one record per request;
- start-up: every stage learns the model's MoE layers (`_gather_stages`), layouts steering
  cannot follow are refused on every rank, naming them;
- data parallel: routing is fetched from every engine core, not the first one only.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from expert_profiles.request_steering import RESOLVED_KEY, ResolvedSteering
from vllm_patches import steering_ops, vllm_compat
from vllm_patches.engine_steering import EngineSteering, MoELayerInfo
from vllm_patches.routing_capture import (
    DISCARD_METHOD,
    TAKE_METHOD,
    RoutingRecord,
    RoutingRecorder,
    _merge,
    fetch_routing,
    fetch_routing_async,
    take_answer,
)
from vllm_patches.steering_table import SteeringTable, StepPlan
from vllm_patches.vllm_compat import worker_hooks
from vllm_patches.vllm_compat.layer_lookup import forward_context_of

CPU = torch.device("cpu")
MODEL_LAYERS = [1, 2, 4, 5]  # decoder layers 0 and 3 are dense
STAGES = [[1, 2], [4, 5]]  # what two pipeline stages hold
NUM_EXPERTS = 8
TOP_K = 2


LAYER_NAME = "model.layers.1.mlp.experts"


@pytest.fixture
def flags():
    """The step flags of one engine, whose MoE layer the ops find as LAYER_NAME."""
    flags = steering_ops.StepFlags()
    with forward_context_of(SimpleNamespace(layer_name=LAYER_NAME, flags=flags, rerouter=None)):
        yield flags


def steer(activate=None, deactivate=None, digest="d" * 16) -> ResolvedSteering:
    return ResolvedSteering("inline", digest, activate or {}, deactivate or {}, 0.01)


def stage_table(stage: int) -> SteeringTable:
    return SteeringTable(STAGES[stage], NUM_EXPERTS, 8, 4, CPU, top_k=TOP_K,
                         model_layers=MODEL_LAYERS)


# ---- steering table of one pipeline stage ----------------------------------------------------


def test_a_stage_accepts_layers_of_other_stages_and_writes_its_own():
    both = steer(activate={1: [3], 5: [6]}, deactivate={4: [0]})
    first, second = stage_table(0), stage_table(1)
    assert first.problem(both) is None and second.problem(both) is None
    for table in (first, second):
        table.prepare_step(StepPlan(["r"], np.array([2]), np.array([0])), lambda r: both)
        assert table.steering_active
    slot = int(first.token_profiles[0])
    assert first.layer_masks(1)[slot, 3] == 1 and first.layer_masks(2)[slot].eq(0).all()
    assert second.layer_masks(4)[slot, 0] == -1 and second.layer_masks(5)[slot, 6] == 1


def test_a_stage_runs_steering_of_other_stages_only_as_a_zero_mask(flags):
    other = steer(activate={5: [6]})
    table = stage_table(0)
    table.prepare_step(StepPlan(["r"], np.array([3]), np.array([0])), lambda r: other)
    slot = int(table.token_profiles[0])
    assert slot != 0 and table.masks[:, slot].eq(0).all()
    logits = torch.randn(3, NUM_EXPERTS)
    edited = logits.clone()
    flags.steering_active = table.steering_active
    assert flags.steering_active
    torch.ops.steermoe.steer_router_logits_(edited, table.token_profiles,
                                            table.layer_masks(1), table.eps, table.layer_bias(1),
                                            table.strength, LAYER_NAME)
    assert torch.equal(edited, logits)
    # The same step on the stage that holds layer 5 edits it.
    held = stage_table(1)
    held.prepare_step(StepPlan(["r"], np.array([3]), np.array([0])), lambda r: other)
    torch.ops.steermoe.steer_router_logits_(edited, held.token_profiles, held.layer_masks(5),
                                            held.eps, held.layer_bias(5), held.strength,
                                            LAYER_NAME)
    assert (edited.argmax(dim=1) == 6).all()


def test_a_layer_outside_the_model_is_refused_by_every_stage():
    bad = steer(activate={3: [1]})  # layer 3 is dense
    for stage in (0, 1):
        assert "layer 3 is not a MoE layer" in stage_table(stage).problem(bad)
    with pytest.raises(ValueError, match="not among the model's MoE layers"):
        SteeringTable([1, 3], NUM_EXPERTS, 8, 4, CPU, top_k=TOP_K, model_layers=MODEL_LAYERS)


def test_engine_steering_of_a_stage_checks_the_model_and_records_its_layers():
    layers = [MoELayerInfo(layer, NUM_EXPERTS, TOP_K, "FusedTopKRouter") for layer in STAGES[1]]
    engine = EngineSteering(layers, 8, 4, CPU, model_layers=MODEL_LAYERS)
    assert engine.describe()["moe_layers"] == MODEL_LAYERS
    assert engine.recorder.moe_layers == STAGES[1]
    extra = {RESOLVED_KEY: steer(activate={1: [3]}).to_extra_args(), "capture_routing": True}
    engine.prepare_step(["r"], np.array([2]), np.array([0]), lambda r: extra)
    assert engine.flags.steering_active  # steered (on another stage), nothing fails
    for j in range(len(STAGES[1])):
        engine.recorder.buffer[j, :2] = torch.tensor([[j, 7], [j, 6]], dtype=torch.int32)
    engine.finish_step()
    answer = take_answer(engine.recorder, ["r"])
    assert answer["held_layers"] == STAGES[1]
    assert RoutingRecord.from_wire(answer["records"]["r"]).moe_layers == STAGES[1]
    assert take_answer(None, ["r"]) == {"held_layers": [], "records": {}}


# ---- merging the workers' routing records --------------------------------------------------


def record(layers, rows=3, base=0) -> dict:
    ids = np.arange(rows * len(layers) * TOP_K, dtype=np.int32).reshape(rows, len(layers), TOP_K)
    return RoutingRecord(ids + base, list(layers)).to_wire()


def answer(layers, **records) -> dict:
    return {"held_layers": list(layers), "records": records}


def test_pipeline_stages_merge_by_layer():
    first, second = record(STAGES[0]), record(STAGES[1], base=100)
    merged = _merge([answer(STAGES[1], a=second), answer(STAGES[0], a=first)])
    got = merged["a"]
    assert got.moe_layers == MODEL_LAYERS and got.expert_ids.shape == (3, 4, TOP_K)
    np.testing.assert_array_equal(got.expert_ids[:, :2], RoutingRecord.from_wire(first).expert_ids)
    np.testing.assert_array_equal(got.expert_ids[:, 2:],
                                  RoutingRecord.from_wire(second).expert_ids)


def test_tensor_parallel_copies_merge_into_one_and_disagreement_is_logged(caplog):
    same = record(MODEL_LAYERS)
    merged = _merge([answer(MODEL_LAYERS, a=same), answer(MODEL_LAYERS, a=same)])
    assert merged["a"].moe_layers == MODEL_LAYERS
    with caplog.at_level(logging.WARNING, logger="steermoe"):
        other = _merge([answer(MODEL_LAYERS, a=same),
                        answer(MODEL_LAYERS, a=record(MODEL_LAYERS, base=1))])
    np.testing.assert_array_equal(other["a"].expert_ids, merged["a"].expert_ids)
    assert "ranks disagree" in caplog.text


def test_a_record_missing_on_one_stage_is_never_returned_partially(caplog):
    with caplog.at_level(logging.WARNING, logger="steermoe"):
        merged = _merge([answer(STAGES[0], a=record(STAGES[0]), b=record(STAGES[0])),
                         answer(STAGES[1], b=record(STAGES[1]))])
    assert list(merged) == ["b"] and "incomplete" in caplog.text
    uneven = _merge([answer(STAGES[0], a=record(STAGES[0], rows=3)),
                     answer(STAGES[1], a=record(STAGES[1], rows=4))])
    assert uneven == {}


def test_data_parallel_engines_and_dense_stages_merge():
    merged = _merge([answer(MODEL_LAYERS, a=record(MODEL_LAYERS)),
                     answer(MODEL_LAYERS, b=record(MODEL_LAYERS)), answer([]), None, {}])
    assert sorted(merged) == ["a", "b"]
    legacy = _merge([{"a": record(MODEL_LAYERS)}])  # a bare mapping of records
    assert legacy["a"].moe_layers == MODEL_LAYERS


def test_recorder_answers_round_trip_through_fetch_routing():
    recorders = [RoutingRecorder(stage, TOP_K, 8, CPU) for stage in STAGES]
    for n, recorder in enumerate(recorders):
        recorder.plan_step([("a", 0, 2, 0)])
        recorder.buffer[:, :2] = n
        recorder.collect_step()

    class Engine:
        def collective_rpc(self, method, args=()):
            assert method == TAKE_METHOD
            return [take_answer(recorder, *args) for recorder in recorders]

    got = fetch_routing(Engine(), ["a"])["a"]
    assert got.moe_layers == MODEL_LAYERS
    assert got.expert_ids[:, :2].max() == 0 and got.expert_ids[:, 2:].min() == 1


# ---- data parallel: every engine core is asked -------------------------------------------------


class DataParallelClient:
    """An `AsyncLLM` with two engine cores whose `collective_rpc` answers for the first only,
    as vLLM's internal load balancer does."""

    def __init__(self, per_engine):
        self.per_engine = per_engine
        self.calls = []
        self.engine_core = SimpleNamespace(core_engines=[b"e0", b"e1"],
                                           _call_utility_async=self._call)

    async def _call(self, utility, method, timeout, args, kwargs, *, engine):
        self.calls.append((utility, method, args, engine))
        return self.per_engine[engine]

    async def collective_rpc(self, method, args=()):
        return self.per_engine[b"e0"]


def test_routing_is_fetched_from_every_data_parallel_engine():
    client = DataParallelClient({
        b"e0": [answer(MODEL_LAYERS, a=record(MODEL_LAYERS))],
        b"e1": [answer(MODEL_LAYERS, b=record(MODEL_LAYERS, base=5))],
    })
    got = asyncio.run(fetch_routing_async(client, ["a", "b"]))
    assert sorted(got) == ["a", "b"]
    assert [(c[0], c[1], c[3]) for c in client.calls] == [
        ("collective_rpc", TAKE_METHOD, b"e0"), ("collective_rpc", TAKE_METHOD, b"e1")]
    from vllm_patches.routing_capture import discard_routing_async

    asyncio.run(discard_routing_async(client, ["a"]))
    assert {c[1] for c in client.calls[2:]} == {DISCARD_METHOD}


# ---- start-up: stages learn the model's layers; layouts refused on every rank ---------------


class Router:
    pass


class FusedTopKRouter(Router):
    def set_capture_fn(self, fn):
        self.capture_fn = fn


class MoERunner:  # vLLM's class name
    def __init__(self, naive=False):
        self.router = FusedTopKRouter()
        self.do_naive_dispatch_combine = naive
        self._quant_method = SimpleNamespace()


def _runner(parallel, rank=0):
    config = SimpleNamespace(parallel_config=SimpleNamespace(rank=rank, **parallel),
                             compilation_config=SimpleNamespace(cudagraph_mode=None,
                                                                max_cudagraph_capture_size=0),
                             scheduler_config=SimpleNamespace(max_num_seqs=4))
    return SimpleNamespace(vllm_config=config, get_model=lambda: None, max_num_tokens=8,
                           device=CPU)


def _layers(ids, naive=False):
    return [(MoELayerInfo(i, NUM_EXPERTS, TOP_K, "FusedTopKRouter"), MoERunner(naive))
            for i in ids]


def _stages(monkeypatch, held_by_stage, this_stage, naive_stage=None):
    """Run attach_engine_steering as stage `this_stage` with the other stages' answers."""
    written = []
    monkeypatch.setattr(worker_hooks, "_write_engine_info", lambda r, info: written.append(info))
    monkeypatch.setattr(worker_hooks, "_moe_layers",
                        lambda model: _layers(held_by_stage[this_stage],
                                              naive=naive_stage == this_stage))

    def gather(parallel, local):
        stages = []
        for n, held in enumerate(held_by_stage):
            if n == this_stage:
                stages.append(local)
                continue
            layers = _layers(held, naive=naive_stage == n)
            stages.append({"layers": [vars(i).copy() for i, _ in layers],
                           "refusal": worker_hooks._layout_refusal(layers, parallel)
                           if layers else None, "reason": None})
        return stages

    monkeypatch.setattr(worker_hooks, "_gather_stages", gather)
    return written


def test_every_stage_steers_its_layers_against_the_models(monkeypatch):
    parallel = {"pipeline_parallel_size": 2}
    for stage in (0, 1):
        written = _stages(monkeypatch, STAGES, stage)
        steering = worker_hooks.attach_engine_steering(_runner(parallel))
        assert steering.table.moe_layers == STAGES[stage]
        assert steering.table.model_layers == MODEL_LAYERS
        assert written[-1]["moe_layers"] == MODEL_LAYERS
        assert written[-1]["stage_layers"] == STAGES


def test_a_stage_without_moe_layers_starts_and_the_model_stays_steerable(monkeypatch):
    held = [[], MODEL_LAYERS]  # e.g. DeepSeek's dense first layers on stage 0
    written = _stages(monkeypatch, held, 0)
    assert worker_hooks.attach_engine_steering(_runner({"pipeline_parallel_size": 2})) is None
    assert written == [{"steerable": True, "reason": None, "moe_layers": MODEL_LAYERS,
                        "num_experts": NUM_EXPERTS, "top_k": TOP_K,
                        "routers": ["FusedTopKRouter"], "stage_layers": held}]


@pytest.mark.parametrize("this_stage", [0, 1])
def test_a_layout_refused_on_one_stage_is_refused_on_every_stage(monkeypatch, this_stage):
    _stages(monkeypatch, STAGES, this_stage, naive_stage=1)
    with pytest.raises(worker_hooks.UnsupportedLayoutError, match="naive dispatch") as info:
        worker_hooks.attach_engine_steering(_runner({"pipeline_parallel_size": 2}))
    assert "MoE layer 4 routes the tokens of every data-parallel rank" in str(info.value)


def test_a_mode_is_refused_on_a_stage_without_moe_layers(monkeypatch):
    _stages(monkeypatch, [[], MODEL_LAYERS], 0)
    parallel = {"pipeline_parallel_size": 2, "prefill_context_parallel_size": 2}
    with pytest.raises(worker_hooks.UnsupportedLayoutError, match="prefill context parallel"):
        worker_hooks.attach_engine_steering(_runner(parallel))


def test_prefill_context_parallel_is_a_batch_splitting_mode():
    assert worker_hooks.batch_splitting_mode(SimpleNamespace()) is None
    named = worker_hooks.batch_splitting_mode(SimpleNamespace(prefill_context_parallel_size=2))
    assert "--prefill-context-parallel-size" in named


def test_gathered_rows_are_named_and_modular_kernels_pass():
    assert worker_hooks.gathered_rows_layer(_layers([1, 2])) is None
    assert "MoE layer 2" in worker_hooks.gathered_rows_layer(
        _layers([1]) + _layers([2], naive=True))


def test_the_installed_vllm_has_what_the_layout_checks_read():
    """`do_naive_dispatch_combine`, the pipeline group and the parallel switches exist (else the
    checks would silently see every layout as fine)."""
    from vllm.config import ParallelConfig
    from vllm.distributed.parallel_state import get_pp_group  # noqa: F401
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner as Runner

    assert isinstance(Runner.__dict__["do_naive_dispatch_combine"], property)
    config = ParallelConfig()
    assert config.prefill_context_parallel_size == 1 and config.pipeline_parallel_size == 1


def test_ray_workers_get_the_worker_settings_and_not_the_server_key(monkeypatch):
    monkeypatch.setenv(vllm_compat.RAY_COPY_ENV, "MY_VAR, STEERMOE_CAPTURE_KEEP")
    vllm_compat.share_settings_with_ray_workers()
    vllm_compat.share_settings_with_ray_workers()  # idempotent
    names = vllm_compat.os.environ[vllm_compat.RAY_COPY_ENV].split(",")
    assert names[:2] == ["MY_VAR", "STEERMOE_CAPTURE_KEEP"] and len(names) == len(set(names))
    assert {vllm_compat.RUNTIME_DIR_ENV, "STEERMOE_CAPTURE_TTL_S"} <= set(names)
    assert "STEERMOE_SERVER_KEY" not in names and "STEERMOE_PROFILE_DIR" not in names
