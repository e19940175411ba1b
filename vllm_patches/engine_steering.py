"""Worker-side steering of one engine: the table, the recorder, and what each MoE layer calls.

`vllm_compat.worker_hooks` builds one `EngineSteering` per model runner after the model is
loaded, attaches a `LayerSteering` to every MoE layer (how: its router kind, `routers`), and
calls `forget` (finished and newly scheduled request ids), then `prepare_step` /
`finish_step` around each forward pass with plain data (request ids, token counts,
positions). Nothing a request carries makes these raise: a request whose steering or capture
cannot be used runs without it, with an error logged. No vLLM import here. All state is this
engine's: the ops find it again by layer name (`steering_ops`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from expert_profiles.echo import clip
from expert_profiles.request_steering import (
    CAPTURE_ID_KEY,
    CAPTURE_KEY,
    INLINE_KEY,
    PROFILE_KEY,
    RESOLVED_KEY,
    ResolvedSteering,
)
from vllm_patches import steering_ops
from vllm_patches.routing_capture import RoutingRecorder
from vllm_patches.steering_table import SteeringTable, StepPlan

logger = logging.getLogger("steermoe")

ExtraArgsOf = Callable[[str], dict[str, Any] | None]


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
        self.eps = table.eps
        self.record = recorder.buffer[recorder.moe_layers.index(layer)]
        # Routes steered rows again (correction-bias routers: routers.sigmoid_bias_grouped).
        self.rerouter: Callable[..., None] | None = None

    def steer(self, router_logits: torch.Tensor) -> torch.Tensor:
        if _idle(self.flags.steering_active, router_logits):
            return router_logits
        torch.ops.steermoe.steer_router_logits_(
            router_logits, self.token_profiles, self.masks, self.eps, self.layer_name
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

    def prepare_step(
        self,
        req_ids: Sequence[str],
        num_tokens: np.ndarray,
        first_positions: np.ndarray,
        extra_args_of: ExtraArgsOf,
    ) -> None:
        """Before the forward pass: per-token steering and what to record."""
        plan = StepPlan(list(req_ids), num_tokens, first_positions)

        def lookup(req_id: str) -> ResolvedSteering | None:
            return steering_of(extra_args_of(req_id), req_id)

        self.table.prepare_step(plan, lookup)
        entries = []
        start = 0
        for req_id, count, first in zip(plan.req_ids, num_tokens, first_positions, strict=True):
            capture_id = self._capture_id(req_id, extra_args_of)
            if capture_id is not None and count > 0:
                entries.append((capture_id, start, int(count), int(first)))
            start += int(count)
        self.recorder.plan_step(entries)
        self.flags.steering_active = self.table.steering_active
        self.flags.recording = self.recorder.recording

    def finish_step(self) -> None:
        """After the forward pass: collect recorded routing (per request, never raises for
        one request's record)."""
        try:
            self.recorder.collect_step()
        finally:
            self.flags.steering_active = False
            self.flags.recording = False

    def describe(self) -> dict[str, Any]:
        """What steering is checked against: the model's MoE layers, experts, top-k."""
        return {
            "moe_layers": list(self.model_layers),
            "num_experts": self.layers[0].num_experts,
            "top_k": self.layers[0].top_k,
            "routers": sorted({info.router for info in self.layers}),
        }
