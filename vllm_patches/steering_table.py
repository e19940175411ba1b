"""Per-engine steering state: a mask table and a per-token profile index, allocated once.

The shape of the problem is LoRA's: each step turns "which steering does each scheduled
request use" into a per-token index in a buffer whose address never changes (so CUDA-graph
replay and compiled graphs read the current step's values), and the routing op only reads
indices. Slot 0 of the table is "not steered"; tokens past the step's real tokens (padding)
always read 0.

Assumption the reader must know: the table holds at most `max_slots - 1` distinct steerings at
once; `max_slots` is sized from the engine's max number of running requests, so every request
in a batch always finds a slot. Per-request state lives until `forget` (vLLM's request
lifecycle, driven by `vllm_compat`). No vLLM import here.

Under pipeline parallelism a table holds only the MoE layers of its stage (`moe_layers`) but
checks steering against every MoE layer of the model (`model_layers`): a steering that names a
layer of another stage is valid here, and this stage writes only its own layers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from expert_profiles.echo import clip
from expert_profiles.request_steering import ResolvedSteering
from expert_profiles.schema import MAX_BIAS, MAX_EPS

logger = logging.getLogger("steermoe")

NOT_STEERED = 0


def _show(value: Any) -> str:
    """A value in a problem message: short and printable; never raises."""
    try:
        return clip(repr(value), 40)
    except Exception:  # e.g. an int too large for repr
        return f"<{type(value).__name__}>"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _sets_problem(kind: str, sets: Any, held: set[int], num_experts: int) -> str | None:
    if not isinstance(sets, dict):
        return f"{kind} is not a mapping of layer to experts"
    for layer, experts in sets.items():
        if not _is_int(layer) or layer not in held:
            return f"{kind}: layer {_show(layer)} is not a MoE layer of this engine"
        if not isinstance(experts, (list, tuple)) or not all(_is_int(e) for e in experts):
            return f"{kind}: layer {layer}: experts must be a list of integers"
        bad = [int(e) for e in experts if not 0 <= e < num_experts]
        if bad:
            return f"{kind}: layer {layer}: experts {_show(bad[:8])} are not in [0, {num_experts})"
    return None


def applicable_problem(steering: ResolvedSteering, moe_layers: Sequence[int], num_experts: int,
                       top_k: int) -> str | None:
    """Why `steering` cannot be applied by an engine with these MoE layers; None if it can.

    `moe_layers` are the MoE layers of the whole model (every pipeline stage's), as decoder-layer
    indices: the front end and every worker pass the same list, so what passes in the front
    end passes in each stage, which then writes the layers it holds.

    Pure and never raises, so the front end can refuse a request before admitting it, and the
    worker checks again before writing a slot (a last line of defence: there a failing request
    runs unsteered). Conditions: every layer is a MoE layer of the model, experts are ints in
    [0, num_experts), at most top_k experts activated and at least top_k left not deactivated
    per layer, no expert both activated and deactivated, eps finite in (0, MAX_EPS].
    """
    if not isinstance(steering, ResolvedSteering):
        return f"not resolved steering: {type(steering).__name__}"
    if not isinstance(steering.digest, str) or not steering.digest:
        return "digest must be a non-empty string"
    eps = steering.eps
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps <= MAX_EPS \
            or not math.isfinite(eps):
        return f"eps must be a finite number in (0, {MAX_EPS:g}], got {_show(eps)}"
    held = set(moe_layers)
    for kind, sets in (("activate", steering.activate), ("deactivate", steering.deactivate)):
        problem = _sets_problem(kind, sets, held, num_experts)
        if problem is not None:
            return problem
    for layer, experts in steering.activate.items():
        if len(set(experts)) > top_k:
            return (f"activate: layer {layer} activates {len(set(experts))} experts, more than "
                    f"top-k ({top_k})")
        both = set(experts) & set(steering.deactivate.get(layer, ()))
        if both:
            return f"layer {layer}: experts {sorted(both)[:8]} are both activated and deactivated"
    for layer, experts in steering.deactivate.items():
        if num_experts - len(set(experts)) < top_k:
            return (f"deactivate: layer {layer} leaves {num_experts - len(set(experts))} of "
                    f"{num_experts} experts, fewer than top-k ({top_k})")
    return _graded_problem(steering, held, num_experts)


def _is_number(value: Any, low: float, high: float) -> bool:
    # The range first: a huge int compares exactly, while isfinite() would overflow.
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and low <= value <= high and math.isfinite(value)


def _graded_problem(steering: ResolvedSteering, held: set[int], num_experts: int) -> str | None:
    """Why the graded part (bias, strength) cannot be applied; None if it can."""
    if not _is_number(steering.strength, 0.0, 1.0):
        return f"strength must be a number in [0, 1], got {_show(steering.strength)}"
    if not isinstance(steering.bias, dict):
        return "bias is not a mapping of layer to {expert: value}"
    for layer, row in steering.bias.items():
        if not _is_int(layer) or layer not in held:
            return f"bias: layer {_show(layer)} is not a MoE layer of this engine"
        if not isinstance(row, dict):
            return f"bias: layer {layer}: not a mapping of expert to value"
        for expert, value in row.items():
            if not _is_int(expert) or not 0 <= expert < num_experts:
                return f"bias: layer {layer}: expert {_show(expert)} is not in [0, {num_experts})"
            if not _is_number(value, -MAX_BIAS, MAX_BIAS):
                return f"bias: layer {layer}: expert {expert}: {_show(value)} is not in " \
                       f"[-{MAX_BIAS:g}, {MAX_BIAS:g}]"
        switched = set(steering.activate.get(layer, ())) | set(steering.deactivate.get(layer, ()))
        both = sorted(switched & set(row))
        if both:
            return f"layer {layer}: experts {both[:8]} are switched and biased"
    return None


@dataclass
class StepPlan:
    """The scheduled requests of one step, in batch order."""

    req_ids: list[str]
    num_tokens: np.ndarray
    first_positions: np.ndarray

    @property
    def total_tokens(self) -> int:
        return int(self.num_tokens.sum())


class SteeringTable:
    """Masks [moe_layers, slots, experts] int8, graded bias [moe_layers, slots, experts] float32,
    eps and strength [slots] float32, and token_profiles [max_tokens].

    `moe_layers`: the MoE layers this worker holds (its pipeline stage's); `model_layers`: every
    MoE layer of the model (default: `moe_layers`), against which steering is checked.
    """

    def __init__(
        self,
        moe_layers: Sequence[int],
        num_experts: int,
        max_tokens: int,
        max_slots: int,
        device: torch.device,
        *,
        top_k: int,
        model_layers: Sequence[int] | None = None,
    ):
        self.moe_layers = list(moe_layers)
        self.model_layers = sorted(set(model_layers if model_layers is not None else moe_layers))
        missing = sorted(set(self.moe_layers) - set(self.model_layers))
        if missing:
            raise ValueError(f"held MoE layers {missing} are not among the model's MoE layers")
        self.layer_index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.num_experts = num_experts
        self.top_k = top_k
        self.max_slots = max_slots
        self.device = device
        self.masks = torch.zeros(
            (len(self.moe_layers), max_slots, num_experts), dtype=torch.int8, device=device
        )
        self.bias = torch.zeros(
            (len(self.moe_layers), max_slots, num_experts), dtype=torch.float32, device=device
        )
        self.eps = torch.zeros(max_slots, dtype=torch.float32, device=device)
        self.strength = torch.ones(max_slots, dtype=torch.float32, device=device)
        self.token_profiles = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._staging = torch.zeros(max_tokens, dtype=torch.int32, pin_memory=pin)
        self._slot_of_digest: dict[str, int] = {}
        self._digest_of_slot: dict[int, str] = {}
        self._steering_of_request: dict[str, ResolvedSteering | None] = {}
        self._written_until = 0
        self.steering_active = False
        self._graded_slots: set[int] = set()
        # Some request of the current step has graded steering (bias, or strength < 1).
        self.graded_active = False

    def problem(self, steering: ResolvedSteering) -> str | None:
        """`applicable_problem` for this engine (checked against the model's MoE layers)."""
        return applicable_problem(steering, self.model_layers, self.num_experts, self.top_k)

    # ---- slots -------------------------------------------------------------------------

    def _write_slot(self, slot: int, steering: ResolvedSteering) -> None:
        mask = torch.zeros((len(self.moe_layers), self.num_experts), dtype=torch.int8)
        for value, sets in ((1, steering.activate), (-1, steering.deactivate)):
            for layer, experts in sets.items():
                row = self.layer_index.get(layer)
                if row is not None:  # a layer of another pipeline stage: written there
                    mask[row, [int(e) for e in experts]] = value
        bias = torch.zeros((len(self.moe_layers), self.num_experts), dtype=torch.float32)
        for layer, values in steering.bias.items():
            row = self.layer_index.get(layer)
            if row is not None:
                for expert, value in values.items():
                    bias[row, int(expert)] = float(value)
        self.masks[:, slot].copy_(mask.to(self.device))
        self.bias[:, slot].copy_(bias.to(self.device))
        self.eps[slot] = float(steering.eps)
        self.strength[slot] = float(steering.strength)
        if steering.bias or steering.strength != 1.0:
            self._graded_slots.add(slot)
        else:
            self._graded_slots.discard(slot)

    def _free_slot(self, scheduled: Collection[str]) -> int:
        used = {NOT_STEERED}
        for req_id in scheduled:
            steering = self._steering_of_request.get(req_id)
            if steering is not None and steering.digest in self._slot_of_digest:
                used.add(self._slot_of_digest[steering.digest])
        for slot in range(1, self.max_slots):
            if slot not in self._digest_of_slot:
                return slot
        for slot in range(1, self.max_slots):
            if slot not in used:
                del self._slot_of_digest[self._digest_of_slot.pop(slot)]
                return slot
        raise RuntimeError(
            f"steermoe: all {self.max_slots - 1} steering slots are in use in one step"
        )

    def slot_for(self, steering: ResolvedSteering | None, scheduled: Collection[str]) -> int:
        """The slot holding `steering`, writing it into a free slot if needed.

        A slot is only reused when no request in `scheduled` (whose steerings must already be
        resolved) uses it. Raises ValueError for steering this engine cannot apply.
        """
        if steering is None:
            return NOT_STEERED
        slot = self._slot_of_digest.get(steering.digest)
        if slot is None:
            problem = self.problem(steering)
            if problem is not None:
                raise ValueError(f"steermoe: steering cannot be applied: {problem}")
            slot = self._free_slot(scheduled)
            self._write_slot(slot, steering)
            self._slot_of_digest[steering.digest] = slot
            self._digest_of_slot[slot] = steering.digest
        return slot

    # ---- requests ----------------------------------------------------------------------

    def _resolve(
        self, req_id: str, steering_of: Callable[[str], ResolvedSteering | None]
    ) -> ResolvedSteering | None:
        """A request's steering, looked up and checked once; never raises (unsteered then)."""
        if req_id in self._steering_of_request:
            return self._steering_of_request[req_id]
        try:
            steering = steering_of(req_id)
            problem = None if steering is None else self.problem(steering)
        except Exception as exc:  # anything a request carries must not fail the step
            steering, problem = None, f"{type(exc).__name__}: {exc}"
        if problem is not None:
            logger.error("steermoe: request '%s' runs unsteered: its steering cannot be applied "
                         "in this engine (%s)", clip(req_id), clip(problem, 200))
            steering = None
        self._steering_of_request[req_id] = steering
        return steering

    def forget(self, req_ids: Iterable[str]) -> None:
        """Drop what is known of these requests (finished, or new under a reused id)."""
        for req_id in req_ids:
            self._steering_of_request.pop(req_id, None)

    # ---- steps -------------------------------------------------------------------------

    def prepare_step(
        self, plan: StepPlan, steering_of: Callable[[str], ResolvedSteering | None],
        steer_from: dict[str, int] | None = None,
    ) -> None:
        """Fill token_profiles for this step; tokens past the step's tokens read 0.

        `steering_of` is asked once per request (until `forget`); a request whose steering
        is malformed or cannot be applied here runs unsteered, with an error logged.
        `steer_from`: requests whose tokens before a position stay unsteered (a guarded
        request's prompt, recomputed after preemption, is computed as it was the first time).
        """
        steerings = [self._resolve(req_id, steering_of) for req_id in plan.req_ids]
        # Every scheduled request is resolved first, so no slot in use this step is reused.
        slots = [self.slot_for(steering, plan.req_ids) for steering in steerings]
        total = plan.total_tokens
        self.steering_active = any(slots)
        self.graded_active = not self._graded_slots.isdisjoint(slots)
        if not self.steering_active and self._written_until == 0:
            return
        staging = self._staging.numpy()
        end = max(total, self._written_until)
        if self.steering_active:
            staging[:total] = np.repeat(np.asarray(slots, dtype=np.int32), plan.num_tokens)
            if steer_from:
                self._unsteer_before(staging, plan, steer_from)
        else:
            staging[:total] = 0
        staging[total:end] = 0
        self.token_profiles[:end].copy_(self._staging[:end], non_blocking=True)
        self._written_until = total if self.steering_active else 0

    @staticmethod
    def _unsteer_before(staging: np.ndarray, plan: StepPlan, steer_from: dict[str, int]) -> None:
        start = 0
        for req_id, count, first in zip(plan.req_ids, plan.num_tokens, plan.first_positions,
                                        strict=True):
            position = steer_from.get(req_id)
            if position is not None and first < position:
                staging[start:start + min(int(count), position - int(first))] = NOT_STEERED
            start += int(count)

    def layer_masks(self, layer: int) -> torch.Tensor:
        """The [slots, experts] mask table of one decoder layer."""
        return self.masks[self.layer_index[layer]]

    def layer_bias(self, layer: int) -> torch.Tensor:
        """The [slots, experts] graded-bias table of one decoder layer."""
        return self.bias[self.layer_index[layer]]
