"""Per-engine steering state: a mask table and a per-token profile index, allocated once.

The shape of the problem is LoRA's: each step turns "which steering does each scheduled
request use" into a per-token index in a buffer whose address never changes (so CUDA-graph
replay and compiled graphs read the current step's values), and the routing op only reads
indices. Slot 0 of the table is "not steered"; tokens past the step's real tokens (padding)
always read 0.

Assumption the reader must know: the table holds at most `max_slots - 1` distinct steerings at
once; `max_slots` is sized from the engine's max number of running requests, so every request
in a batch always finds a slot. No vLLM import here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_patches.request_steering import ResolvedSteering

NOT_STEERED = 0


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
    """Masks [moe_layers, slots, experts] int8, eps [slots] and token_profiles [max_tokens]."""

    def __init__(
        self,
        moe_layers: Sequence[int],
        num_experts: int,
        max_tokens: int,
        max_slots: int,
        device: torch.device,
    ):
        self.moe_layers = list(moe_layers)
        self.layer_index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.num_experts = num_experts
        self.max_slots = max_slots
        self.device = device
        self.masks = torch.zeros(
            (len(self.moe_layers), max_slots, num_experts), dtype=torch.int8, device=device
        )
        self.eps = torch.zeros(max_slots, dtype=torch.float32, device=device)
        self.token_profiles = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._staging = torch.zeros(max_tokens, dtype=torch.int32, pin_memory=pin)
        self._slot_of_digest: dict[str, int] = {}
        self._digest_of_slot: dict[int, str] = {}
        self._steering_of_request: dict[str, ResolvedSteering | None] = {}
        self._written_until = 0
        self.steering_active = False

    # ---- slots -------------------------------------------------------------------------

    def _write_slot(self, slot: int, steering: ResolvedSteering) -> None:
        mask = torch.zeros((len(self.moe_layers), self.num_experts), dtype=torch.int8)
        for value, sets in ((1, steering.activate), (-1, steering.deactivate)):
            for layer, experts in sets.items():
                index = self.layer_index.get(layer)
                if index is None:
                    raise ValueError(
                        f"steering names decoder layer {layer}, which has no MoE block "
                        f"in this engine (MoE layers: {self.moe_layers})"
                    )
                mask[index, experts] = value
        self.masks[:, slot].copy_(mask.to(self.device))
        self.eps[slot] = steering.eps

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

        A slot is only reused when no request scheduled in this step uses it.
        """
        if steering is None:
            return NOT_STEERED
        slot = self._slot_of_digest.get(steering.digest)
        if slot is None:
            slot = self._free_slot(scheduled)
            self._write_slot(slot, steering)
            self._slot_of_digest[steering.digest] = slot
            self._digest_of_slot[slot] = steering.digest
        return slot

    # ---- steps -------------------------------------------------------------------------

    def prepare_step(
        self,
        plan: StepPlan,
        steering_of: Callable[[str], ResolvedSteering | None],
        live_requests: Collection[str],
    ) -> None:
        """Fill token_profiles for this step; tokens past the step's tokens read 0."""
        slots = []
        for req_id in plan.req_ids:
            if req_id in self._steering_of_request:
                steering = self._steering_of_request[req_id]
            else:
                steering = self._steering_of_request[req_id] = steering_of(req_id)
            slots.append(self.slot_for(steering, plan.req_ids))
        if len(self._steering_of_request) > 2 * max(len(live_requests), 64):
            self._steering_of_request = {
                r: s for r, s in self._steering_of_request.items() if r in live_requests
            }
        total = plan.total_tokens
        self.steering_active = any(slots)
        if not self.steering_active and self._written_until == 0:
            return
        staging = self._staging.numpy()
        end = max(total, self._written_until)
        if self.steering_active:
            staging[:total] = np.repeat(np.asarray(slots, dtype=np.int32), plan.num_tokens)
        else:
            staging[:total] = 0
        staging[total:end] = 0
        self.token_profiles[:end].copy_(self._staging[:end], non_blocking=True)
        self._written_until = total if self.steering_active else 0

    def layer_masks(self, layer: int) -> torch.Tensor:
        """The [slots, experts] mask table of one decoder layer."""
        return self.masks[self.layer_index[layer]]
