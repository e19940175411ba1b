"""Worker hooks (each worker process of an engine): find the MoE layers of the loaded model,
check that steering can follow them, attach each layer's steering by its router kind
(`vllm_patches.routers`), and drive the engine's `EngineSteering` around every step.

vLLM 0.26 and 0.32: the MoE layer is `MoERunner` (`router`, `moe_config`, `layer_id`,
`layer_name`), registered for vLLM's custom ops under `layer_name`; `Worker.model_runner` is a
`GPUModelRunner` (the CPU runner subclasses it) with `_prepare_inputs(scheduler_output,
num_scheduled_tokens, ...)`, `execute_model`, `input_batch`, `requests`, `max_num_tokens`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from vllm_patches import routers
from vllm_patches.engine_steering import EngineSteering, MoELayerInfo
from vllm_patches.guard_decisions import GUARD_METHOD
from vllm_patches.routing_capture import DISCARD_METHOD, TAKE_METHOD, take_answer
from vllm_patches.vllm_compat import engine_info_path
from vllm_patches.vllm_compat.layer_lookup import STEERING_ATTR

logger = logging.getLogger("steermoe")


def _moe_layers(model: Any) -> list[tuple[MoELayerInfo, Any]]:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    found = []
    for module in model.modules():
        if isinstance(module, MoERunner):
            config = module.moe_config
            info = MoELayerInfo(
                layer=int(module.layer_id),
                num_experts=int(config.num_logical_experts),
                top_k=int(config.experts_per_token),
                router=type(module.router).__name__,
            )
            found.append((info, module))
    return found


def _uses_cuda_graphs(runner: Any) -> bool:
    mode = getattr(runner.vllm_config.compilation_config, "cudagraph_mode", None)
    return runner.device.type == "cuda" and mode is not None and getattr(mode, "name", "") != "NONE"


def _unsteerable_reason(layers: list[tuple[MoELayerInfo, Any]], runner: Any) -> str | None:
    if not layers:
        return "it has no vLLM fused-MoE layers"
    return _held_layers_reason(layers, runner) or _model_layers_reason([i for i, _ in layers])


def _held_layers_reason(layers: list[tuple[MoELayerInfo, Any]], runner: Any) -> str | None:
    """Why the MoE layers this worker holds cannot be steered (None if they can): a layer
    whose router no kind of the registry matches, or a kind CUDA graphs cannot replay."""
    kinds = [routers.kind_for_layer(module) for _, module in layers]
    if any(kind is not None and kind.correction_bias for kind in kinds) and _uses_cuda_graphs(
            runner):
        return ("its routers select experts with a correction bias (DeepSeek-V3 family), which "
                "steermoe steers exactly only without CUDA graphs: start vLLM with --enforce-eager")
    for (info, module), kind in zip(layers, kinds, strict=True):
        if type(module).__name__ != "MoERunner":
            return (f"layer {info.layer} runs {type(module).__name__}, whose routing is "
                    "computed outside the router (Transformers backend)")
        if kind is None:
            return f"layer {info.layer} uses router {info.router}, which steermoe does not edit"
    return None


def _model_layers_reason(infos: list[MoELayerInfo]) -> str | None:
    """Why the model's MoE layers (of every pipeline stage) cannot be steered together."""
    if not infos:
        return "it has no vLLM fused-MoE layers"
    shapes = {(info.num_experts, info.top_k) for info in infos}
    if len(shapes) > 1:
        return f"its MoE layers differ in experts/top-k: {sorted(shapes)}"
    if len({info.layer for info in infos}) != len(infos):
        return "two MoE layers share one decoder-layer index"
    return None


def batch_splitting_mode(parallel_config: Any) -> str | None:
    """A vLLM mode that runs one step's tokens as several batches (or splits them across ranks
    before the MoE layers), which the per-token profile index does not follow; None if off."""
    if getattr(parallel_config, "enable_dbo", False):
        return "dual-batch overlap (--enable-dbo)"
    if int(getattr(parallel_config, "ubatch_size", 1) or 1) > 1:
        return "micro-batching (ubatch_size > 1)"
    if getattr(parallel_config, "use_sequence_parallel_moe", False):
        return "sequence-parallel MoE (expert parallel with TP > 1 and DP > 1)"
    if int(getattr(parallel_config, "prefill_context_parallel_size", 1) or 1) > 1:
        return ("prefill context parallel (--prefill-context-parallel-size > 1), which "
                "partitions a step's tokens across ranks")
    return None


def gathered_rows_layer(layers: list[tuple[MoELayerInfo, Any]]) -> str | None:
    """A held MoE layer whose router sees the rows of other ranks too, named; None if none.

    With data parallelism, vLLM dispatches tokens to the expert ranks after routing (inside
    the fused-MoE kernel: every all-to-all backend), so the router of each rank sees its own
    batch. Only quantization methods without vLLM's modular kernel gather the hidden states and
    router logits of all data-parallel ranks before routing (`MoERunner._maybe_dispatch`, naive
    dispatch): the steering edit, applied before that gather, stays exact, but the router then
    routes rows the per-token index and the routing capture do not describe.
    """
    for info, module in layers:
        try:
            naive = bool(getattr(module, "do_naive_dispatch_combine", False))
        except Exception:  # an internal that changed: treat as not gathering
            naive = False
        if naive:
            method = type(getattr(module, "_quant_method", None)).__name__
            return (f"MoE layer {info.layer} routes the tokens of every data-parallel rank "
                    f"together (vLLM's naive dispatch before routing, used by {method})")
    return None


class UnsupportedLayoutError(RuntimeError):
    """The engine splits its steps in a way steering cannot follow exactly."""


def _pipeline_size(parallel_config: Any) -> int:
    return int(getattr(parallel_config, "pipeline_parallel_size", 1) or 1)


def _gather_stages(parallel_config: Any, local: dict[str, Any]) -> list[dict[str, Any]]:
    """`local` of every pipeline stage, in stage order (all-gathered over vLLM's pipeline group
    on its CPU process group, so it works across nodes); [local] without pipeline parallelism.

    Every worker calls this once from `load_model` (all workers load together)."""
    if _pipeline_size(parallel_config) <= 1:
        return [local]
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_pp_group

    group = get_pp_group()
    gathered: list[Any] = [None] * group.world_size
    dist.all_gather_object(gathered, local, group=group.cpu_group)
    return gathered


def _layout_refusal(layers: list[tuple[MoELayerInfo, Any]], parallel_config: Any) -> str | None:
    mode = batch_splitting_mode(parallel_config)
    if mode is not None:
        return f"{mode}: the per-token steering index assumes one flat batch per step"
    gathered = gathered_rows_layer(layers)
    if gathered is not None:
        return (f"this layout: {gathered}. Use a quantization method vLLM runs through its "
                "modular fused-MoE kernel, or data parallel size 1")
    return None


def attach_engine_steering(runner: Any) -> EngineSteering | None:
    """Find the MoE layers of a loaded model runner and attach steering to them.

    Under pipeline parallelism every stage finds the MoE layers it holds; the stages exchange
    them (`_gather_stages`) so that each checks steering against the model's MoE layers and
    writes its own. Raises UnsupportedLayoutError for an MoE model in a layout steering cannot
    follow exactly (the engine does not start): a mode that splits a step
    (`batch_splitting_mode`), or routers that see other ranks' rows (`gathered_rows_layer`).
    """
    layers = _moe_layers(runner.get_model())
    parallel = getattr(runner.vllm_config, "parallel_config", None)
    refusal = _layout_refusal(layers, parallel) if layers else None
    local = {
        "layers": [vars(info).copy() for info, _ in layers],
        "refusal": refusal,
        "reason": _held_layers_reason(layers, runner) if layers and not refusal else None,
    }
    stages = _gather_stages(parallel, local)
    stage_infos = [[MoELayerInfo(**item) for item in stage["layers"]] for stage in stages]
    model_infos = sorted((info for infos in stage_infos for info in infos),
                         key=lambda info: info.layer)
    refusal = next((stage["refusal"] for stage in stages if stage["refusal"]), None)
    if model_infos and refusal is None:
        refusal = _layout_refusal([], parallel)  # a stage without MoE layers checks the mode
    if model_infos and refusal is not None:
        from vllm_patches.plugin import DISABLE_ENV

        raise UnsupportedLayoutError(
            f"steermoe cannot steer exactly under {refusal}. Turn that off, or set "
            f"{DISABLE_ENV}=1 to serve without steering."
        )
    reason = next((stage["reason"] for stage in stages if stage["reason"]), None)
    reason = reason or _model_layers_reason(model_infos)
    info: dict[str, Any] = {"steerable": reason is None, "reason": reason}
    steering = None
    if reason is None:
        info.update({
            "moe_layers": [i.layer for i in model_infos],
            "num_experts": model_infos[0].num_experts,
            "top_k": model_infos[0].top_k,
            "routers": sorted({i.router for i in model_infos}),
            "stage_layers": [[i.layer for i in infos] for infos in stage_infos],
        })
    if reason is None and layers:
        config = runner.vllm_config
        max_tokens = max(
            int(runner.max_num_tokens),
            int(getattr(config.compilation_config, "max_cudagraph_capture_size", 0) or 0),
        )
        max_slots = int(config.scheduler_config.max_num_seqs) + 1
        steering = EngineSteering([i for i, _ in layers], max_tokens, max_slots, runner.device,
                                  model_layers=info["moe_layers"])
        fused = []
        for layer_info, module in layers:
            hook = steering.layer_hook(layer_info.layer, getattr(module, "layer_name", None))
            setattr(module, STEERING_ATTR, hook)
            module.router.set_capture_fn(hook.capture)
            if routers.kind_for_layer(module).attach(module, hook, steering):
                fused.append(layer_info.layer)
        info["fused_routing_layers"] = fused
        logger.info("steermoe: steering %d of the model's %d MoE layers here (%s)", len(layers),
                    len(model_infos), info["routers"])
    elif reason is None:
        logger.info("steermoe: this pipeline stage holds none of the model's %d MoE layers",
                    len(model_infos))
    else:
        logger.warning("steermoe: steering disabled for this model: %s", reason)
    setattr(runner, STEERING_ATTR, steering)
    _write_engine_info(runner, info)
    return steering


def _write_engine_info(runner: Any, info: dict[str, Any]) -> None:
    rank = getattr(getattr(runner, "vllm_config", None), "parallel_config", None)
    if rank is not None and getattr(rank, "rank", 0) != 0:
        return
    path = engine_info_path(runner.vllm_config)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def _prompt_len(request: Any) -> int:
    """A scheduled request's prompt length (`CachedRequestState`, vLLM 0.26 through 0.32)."""
    length = getattr(request, "num_prompt_tokens", None)
    if length is None:
        length = len(request.prompt_token_ids or ())
    return int(length)


def install_worker_hooks() -> None:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    original_load = Worker.load_model
    original_prepare = GPUModelRunner._prepare_inputs
    original_execute = GPUModelRunner.execute_model
    original_dispatch = MoERunner._maybe_dispatch

    def load_model(self, *args, **kwargs):
        result = original_load(self, *args, **kwargs)
        attach_engine_steering(self.model_runner)
        return result

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        steering = getattr(self, STEERING_ATTR, None)
        if steering is not None:
            num_reqs = len(num_scheduled_tokens)
            requests = self.requests
            # Per-request state dies with the request; a new request never inherits the state
            # of an earlier one with the same id.
            steering.forget([*scheduler_output.finished_req_ids,
                             *(new.req_id for new in scheduler_output.scheduled_new_reqs)])
            steering.prepare_step(
                req_ids=self.input_batch.req_ids[:num_reqs],
                num_tokens=num_scheduled_tokens,
                first_positions=self.input_batch.num_computed_tokens_cpu[:num_reqs],
                extra_args_of=lambda r: requests[r].sampling_params.extra_args
                if requests[r].sampling_params is not None else None,
                prompt_len_of=lambda r: _prompt_len(requests[r]),
            )
        return result

    def execute_model(self, *args, **kwargs):
        try:
            return original_execute(self, *args, **kwargs)
        finally:
            steering = getattr(self, STEERING_ATTR, None)
            if steering is not None:
                steering.finish_step()

    def _maybe_dispatch(self, hidden_states, router_logits):
        hook = getattr(self, STEERING_ATTR, None)
        if hook is not None:
            router_logits = hook.steer(router_logits)
        return original_dispatch(self, hidden_states, router_logits)

    def steermoe_take_routing(self, capture_ids):
        steering = getattr(self.model_runner, STEERING_ATTR, None)
        return take_answer(None if steering is None else steering.recorder, capture_ids)

    def steermoe_take_guard_decisions(self, req_ids):
        steering = getattr(self.model_runner, STEERING_ATTR, None)
        return {} if steering is None else steering.guard_decisions.take(list(req_ids))

    def steermoe_discard_routing(self, capture_ids):
        steering = getattr(self.model_runner, STEERING_ATTR, None)
        if steering is not None:
            steering.recorder.discard(capture_ids)

    Worker.load_model = load_model
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.execute_model = execute_model
    MoERunner._maybe_dispatch = _maybe_dispatch
    setattr(Worker, TAKE_METHOD, steermoe_take_routing)
    setattr(Worker, DISCARD_METHOD, steermoe_discard_routing)
    setattr(Worker, GUARD_METHOD, steermoe_take_guard_decisions)

