"""Worker-side steering of one engine: the table, the recorder, and what each MoE layer calls.

`vllm_compat.worker_hooks` builds one `EngineSteering` per model runner after the model is
loaded, attaches a `LayerSteering` to every MoE layer (how: its router kind, `routers`), and
calls `forget` (finished and newly scheduled request ids), then `prepare_step` /
`finish_step` around each forward pass with plain data (request ids, token counts,
positions, prompt lengths). Guarded requests (`guard_spec`) run unsteered while their prompt is
computed; their prompt's routing is counted from the capture buffer, and after the last prompt
token the guard's score decides whether the request's later tokens are steered
(`guard_decisions`). Nothing a request carries makes these raise: a request whose steering or
capture cannot be used runs without it, with an error logged. No vLLM import here. All state is this
engine's: the ops find it again by layer name (`steering_ops`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from expert_profiles.echo import clip
from expert_profiles.guard import count_routed_experts
from expert_profiles.guard_spec import GuardSpec
from expert_profiles.request_steering import (
    CAPTURE_ID_KEY,
    CAPTURE_KEY,
    GUARD_ID_KEY,
    INLINE_KEY,
    PROFILE_KEY,
    RESOLVED_KEY,
    ResolvedSteering,
)
from vllm_patches import steering_ops
from vllm_patches.guard_decisions import GuardDecisions
from vllm_patches.routing_capture import RoutingRecorder
from vllm_patches.steering_table import SteeringTable, StepPlan

logger = logging.getLogger("steermoe")

ExtraArgsOf = Callable[[str], dict[str, Any] | None]
PromptLenOf = Callable[[str], int]


def _failed(guard: GuardSpec) -> dict[str, Any]:
    """The decision of a guard that could not decide: its profile applies (fail closed)."""
    return {"guard": guard.name, "fired": None, "score": None,
            "error": "the guard could not decide; its profile applies"}


@dataclass
class _Guarded:
    """A guarded request while its prompt is computed: its prompt routing counted so far."""

    guard: GuardSpec
    steering: ResolvedSteering  # applied once the guard fires (without the guard)
    prompt_len: int
    counts: np.ndarray
    decision_id: str  # the id its decision is kept under (the caller's request id)
    tokens: int = 0
    counted_until: int = 0  # prompt positions below this are counted (preemption recomputes)


@dataclass
class MoELayerInfo:
    """One MoE layer as the engine built it."""

    layer: int
    num_experts: int
    top_k: int
    router: str


def _idle(active: bool, tensor: torch.Tensor) -> bool:
    """True when the op would do nothing and skipping the call cannot be baked into a graph.

    Inside torch.compile tracing (vLLM's CPU path) the op is always emitted and decides at run
    time; while a CUDA graph is captured the kernel must be in the graph.
    """
    if active or torch.compiler.is_compiling():
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


DEFAULT_LAYER_NAME = "model.layers.{layer}.mlp.experts"


class LayerSteering:
    """Attached to one MoE layer: edits its router logits and records its routing.

    The registered ops it calls find it again by `layer_name` (the name vLLM registers the MoE
    layer under for its own custom ops), and read the step flags of its engine (`flags`) and,
    for correction-bias routers, the layer's `rerouter` there.
    """

    def __init__(self, table: SteeringTable, recorder: RoutingRecorder, layer: int,
                 flags: steering_ops.StepFlags, layer_name: str | None = None):
        self.layer = layer
        self.layer_name = layer_name or DEFAULT_LAYER_NAME.format(layer=layer)
        self.flags = flags
        self.token_profiles = table.token_profiles
        self.masks = table.layer_masks(layer)
        self.bias = table.layer_bias(layer)
        self.eps = table.eps
        self.strength = table.strength
        self.record = recorder.buffer[recorder.moe_layers.index(layer)]
        # Routes steered rows again (correction-bias routers: routers.sigmoid_bias_grouped).
        self.rerouter: Callable[..., None] | None = None

    def steer(self, router_logits: torch.Tensor) -> torch.Tensor:
        if _idle(self.flags.steering_active, router_logits):
            return router_logits
        torch.ops.steermoe.steer_router_logits_(
            router_logits, self.token_profiles, self.masks, self.eps, self.bias, self.strength,
            self.layer_name
        )
        return router_logits

    def capture(self, topk_ids: torch.Tensor) -> None:
        if _idle(self.flags.recording, topk_ids):
            return
        torch.ops.steermoe.record_routing_(self.record, topk_ids, self.layer_name)

    def reroute(self, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                hidden_states: torch.Tensor, router_logits: torch.Tensor) -> None:
        if _idle(self.flags.steering_active, router_logits):
            return
        torch.ops.steermoe.reroute_steered_(
            topk_weights, topk_ids, hidden_states, router_logits, self.layer_name
        )


def steering_of(extra_args: dict[str, Any] | None, req_id: str = "?") -> ResolvedSteering | None:
    """The resolved steering a front end attached to a request, if any. Never raises.

    Unresolved steering keys (the plugin is not loaded where requests are submitted) or
    resolved data that does not parse mean not steered, with an error logged.
    """
    if not isinstance(extra_args, dict) or not extra_args:
        return None
    data = extra_args.get(RESOLVED_KEY)
    if data is None:
        if PROFILE_KEY in extra_args or INLINE_KEY in extra_args:
            logger.error(
                "steermoe: request '%s' runs unsteered: its steering reached the engine "
                "without being resolved; the steermoe plugin must be loaded where requests are "
                "submitted", clip(req_id),
            )
        return None
    try:
        return ResolvedSteering.from_extra_args(data)
    except Exception as exc:
        logger.error("steermoe: request '%s' runs unsteered: malformed resolved steering (%s)",
                     clip(req_id), clip(f"{type(exc).__name__}: {exc}", 200))
        return None


def capture_id_of(req_id: str, extra_args: dict[str, Any] | None) -> str | None:
    if not isinstance(extra_args, dict) or not extra_args.get(CAPTURE_KEY):
        return None
    return str(extra_args.get(CAPTURE_ID_KEY, req_id))


class EngineSteering:
    """Steering state of one model runner.

    `layers` are the MoE layers this worker holds; `model_layers` every MoE layer of the model
    (all pipeline stages; default: `layers`). Steering is checked against the model's layers
    and written for the held ones; routing is recorded for the held ones (the caller merges the
    stages' records: `routing_capture.fetch_routing`).

    Per-request state lives from a request's first scheduled step until `forget` names it.
    """

    def __init__(self, layers: Sequence[MoELayerInfo], max_tokens: int, max_slots: int,
                 device: torch.device, clock: Callable[[], float] = time.monotonic, *,
                 model_layers: Sequence[int] | None = None):
        self.layers = list(layers)
        layer_ids = [info.layer for info in self.layers]
        self.model_layers = sorted(set(model_layers if model_layers is not None else layer_ids))
        num_experts = self.layers[0].num_experts
        top_k = self.layers[0].top_k
        self.table = SteeringTable(layer_ids, num_experts, max_tokens, max_slots, device,
                                   top_k=top_k, model_layers=self.model_layers)
        self.recorder = RoutingRecorder(layer_ids, top_k, max_tokens, device, clock=clock)
        # What the ops read on the host for this engine's step (set by prepare_step).
        self.flags = steering_ops.StepFlags()
        self._capture_ids: dict[str, str | None] = {}
        self._capture_owner: dict[str, str] = {}
        # Guarded requests: undecided (prompt being computed), and decided (what they run).
        self._guarded: dict[str, _Guarded] = {}
        self._decided: dict[str, ResolvedSteering | None] = {}
        # Decided guarded requests whose prompt stays unsteered if it is computed again.
        self._steer_from: dict[str, int] = {}
        self._guard_step: list[tuple[str, int, int, int]] = []
        self.guard_decisions = GuardDecisions()

    def layer_hook(self, layer: int, layer_name: str | None = None) -> LayerSteering:
        """The steering of MoE layer `layer`, registered in vLLM under `layer_name`."""
        return LayerSteering(self.table, self.recorder, layer, self.flags, layer_name)

    def forget(self, req_ids: Iterable[str]) -> None:
        """Drop all per-request state of `req_ids`: finished requests, and newly scheduled
        ones (so a reused request id starts fresh: its own steering, a fresh routing record).

        Call at the start of each step, before `prepare_step`. Records of finished requests
        stay in the recorder until taken, discarded or dropped.
        """
        ids = list(req_ids)
        self.table.forget(ids)
        for req_id in ids:
            self._guarded.pop(req_id, None)
            self._decided.pop(req_id, None)
            self._steer_from.pop(req_id, None)
            capture_id = self._capture_ids.pop(req_id, None)
            if capture_id is not None and self._capture_owner.get(capture_id) == req_id:
                del self._capture_owner[capture_id]

    def _capture_id(self, req_id: str, extra_args_of: ExtraArgsOf) -> str | None:
        """The capture id of a request, decided on its first step; never raises."""
        if req_id in self._capture_ids:
            return self._capture_ids[req_id]
        try:
            capture_id = capture_id_of(req_id, extra_args_of(req_id))
        except Exception as exc:
            logger.error("steermoe: request '%s' records no routing (%s)",
                         clip(req_id), clip(f"{type(exc).__name__}: {exc}", 200))
            capture_id = None
        if capture_id is not None:
            owner = self._capture_owner.get(capture_id)
            if owner is not None and owner != req_id:
                logger.error("steermoe: request '%s' records no routing: running request '%s' "
                             "already records under capture id '%s'", clip(req_id), clip(owner),
                             clip(capture_id))
                capture_id = None
            else:
                self._capture_owner[capture_id] = req_id
                self.recorder.forget([capture_id])  # a new request never extends an old record
        self._capture_ids[req_id] = capture_id
        return capture_id

    def _guard_problem(self, guard: GuardSpec) -> str | None:
        if [info.layer for info in self.layers] != list(self.model_layers):
            return "guards need every MoE layer in one worker (no pipeline parallelism)"
        return guard.problem(list(self.model_layers), self.layers[0].num_experts)

    def _steering(self, req_id: str, extra_args_of: ExtraArgsOf,
                  prompt_len_of: PromptLenOf | None) -> ResolvedSteering | None:
        """What a request runs with now: a guarded request is unsteered until its guard has
        decided, then the guard's steering if it fired. A guard that cannot run or fails
        applies its steering (fail closed). Never raises."""
        if req_id in self._decided:
            return self._decided[req_id]
        args = extra_args_of(req_id)
        steering = steering_of(args, req_id)
        if steering is None or steering.guard is None:
            return steering
        guard = steering.guard
        if req_id not in self._guarded:
            try:
                problem = self._guard_problem(guard)
                prompt_len = int(prompt_len_of(req_id)) if prompt_len_of is not None else 0
            except Exception as exc:
                problem, prompt_len = f"{type(exc).__name__}: {exc}", 0
            if problem is None and prompt_len <= 0:
                problem = "the prompt length is unknown here"
            decision_id = str((args or {}).get(GUARD_ID_KEY, req_id))
            if problem is not None:
                logger.error("steermoe: the guard of request '%s' cannot run in this engine "
                             "(%s); its profile applies", clip(req_id), clip(problem, 200))
                self._decided[req_id] = replace(steering, guard=None)
                self.guard_decisions.put(decision_id, _failed(guard))
                return self._decided[req_id]
            counts = np.zeros((len(self.layers), self.layers[0].num_experts), dtype=np.int64)
            self._guarded[req_id] = _Guarded(guard, replace(steering, guard=None), prompt_len,
                                             counts, decision_id)
        return None

    def prepare_step(
        self,
        req_ids: Sequence[str],
        num_tokens: np.ndarray,
        first_positions: np.ndarray,
        extra_args_of: ExtraArgsOf,
        prompt_len_of: PromptLenOf | None = None,
    ) -> None:
        """Before the forward pass: per-token steering and what to record."""
        plan = StepPlan(list(req_ids), num_tokens, first_positions)
        self.table.prepare_step(plan, lambda r: self._steering(r, extra_args_of, prompt_len_of),
                                self._steer_from)
        entries = []
        self._guard_step = []
        start = 0
        for req_id, count, first in zip(plan.req_ids, num_tokens, first_positions, strict=True):
            capture_id = self._capture_id(req_id, extra_args_of)
            if capture_id is not None and count > 0:
                entries.append((capture_id, start, int(count), int(first)))
            guarded = self._guarded.get(req_id)
            if guarded is not None:  # count each prompt position once (preemption recomputes)
                low = max(int(first), guarded.counted_until)
                high = min(int(first) + int(count), guarded.prompt_len)
                if high > low:
                    self._guard_step.append((req_id, start + low - int(first), high - low, high))
            start += int(count)
        self.recorder.plan_step(entries)
        self.flags.steering_active = self.table.steering_active
        self.flags.graded = self.table.graded_active
        self.flags.recording = self.recorder.recording or bool(self._guard_step)

    def _count_guarded(self) -> None:
        """After the forward pass: add this step's prompt routing of guarded requests; decide
        those whose prompt is complete (their next steps resolve again: `table.forget`)."""
        step, self._guard_step = self._guard_step, []
        total = max(start + count for _, start, count, _ in step)
        # [tokens, layers, k], as a routing capture holds them
        ids = self.recorder.buffer[:, :total].cpu().numpy().transpose(1, 0, 2)
        num_experts = self.layers[0].num_experts
        for req_id, start, count, until in step:
            guarded = self._guarded.get(req_id)
            if guarded is None:
                continue
            try:
                guarded.counts += count_routed_experts(ids, start, start + count, num_experts)
                guarded.tokens += count
                guarded.counted_until = until
                if until >= guarded.prompt_len:
                    score = guarded.guard.score(guarded.counts, guarded.tokens)
                    fired = guarded.guard.fires(score)
                    self._decide(req_id, guarded, guarded.steering if fired else None,
                                 {"guard": guarded.guard.name, "fired": fired,
                                  "score": round(score, 6), "prompt_tokens": guarded.tokens})
            except Exception as exc:  # one request's guard must not fail the step
                logger.error("steermoe: the guard of request '%s' failed; its profile applies "
                             "(%s)", clip(req_id), clip(f"{type(exc).__name__}: {exc}", 200))
                self._decide(req_id, guarded, guarded.steering, _failed(guarded.guard))

    def _decide(self, req_id: str, guarded: _Guarded, steering: ResolvedSteering | None,
                decision: dict[str, Any]) -> None:
        self._guarded.pop(req_id, None)
        self._decided[req_id] = steering
        if steering is not None:
            self._steer_from[req_id] = guarded.prompt_len
        self.table.forget([req_id])
        self.guard_decisions.put(guarded.decision_id, decision)

    def finish_step(self) -> None:
        """After the forward pass: collect recorded routing (per request, never raises for
        one request's record)."""
        try:
            if self._guard_step:
                self._count_guarded()
            self.recorder.collect_step()
        finally:
            self.flags.steering_active = False
            self.flags.graded = False
            self.flags.recording = False

    def describe(self) -> dict[str, Any]:
        """What steering is checked against: the model's MoE layers, experts, top-k."""
        return {
            "moe_layers": list(self.model_layers),
            "num_experts": self.layers[0].num_experts,
            "top_k": self.layers[0].top_k,
            "routers": sorted({info.router for info in self.layers}),
        }
