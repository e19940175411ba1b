"""A guard as the engine runs it: the scoring part of a guard file, carried with a request.

A guarded request (`steering_guard: NAME`, or a locked endpoint `NAME=guard:GUARD`) resolves to
the steering of the guard's profile plus a `GuardSpec`. The engine runs the prompt unsteered,
counts the prompt's routing as the guard's feature (`guard.prefill_share`), scores it after
the last prompt token and, when the score reaches the threshold, steers the request's later
tokens with the profile (`vllm_patches.engine_steering`). Everything the engine needs travels
with the request, so workers read no guard files. No vLLM import here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from expert_profiles.guard import GuardFile, guard_logit, sigmoid

# The most weights a guard carried by a request may have (a 1 MiB guard file holds fewer).
MAX_WEIGHTS = 1 << 20


@dataclass(frozen=True, eq=False)
class GuardSpec:
    """Name, MoE layers, weights [layer, expert], intercept and threshold of one guard.

    Requests carry the weights as little-endian float64 bytes in base64 (`to_wire`): about a
    third of their JSON text, and read back without a Python float per weight."""

    name: str
    moe_layers: tuple[int, ...]
    weights: np.ndarray
    intercept: float
    threshold: float

    def __post_init__(self) -> None:
        weights = np.array(self.weights, dtype=np.float64)
        weights.flags.writeable = False
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "moe_layers", tuple(int(layer) for layer in self.moe_layers))

    @classmethod
    def from_guard(cls, guard: GuardFile) -> GuardSpec:
        return cls(guard.name, tuple(guard.moe_layers), guard.weight_array,
                   float(guard.intercept), float(guard.threshold))

    @cached_property
    def digest(self) -> str:
        """A stable hash of what decides (layers, weights, intercept, threshold)."""
        head = json.dumps([list(self.moe_layers), list(self.weights.shape), self.intercept,
                           self.threshold], separators=(",", ":")).encode()
        return hashlib.sha256(head + self.weights.astype("<f8").tobytes()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GuardSpec):
            return NotImplemented
        return self.name == other.name and self.digest == other.digest

    def __hash__(self) -> int:
        return hash((self.name, self.digest))

    def score(self, counts: np.ndarray, tokens: int) -> float:
        """The guard's probability for a prompt whose `tokens` counted tokens routed as
        `counts` [MoE layer, expert] (the feature of `guard.prefill_share`)."""
        return sigmoid(guard_logit(self.weights, self.intercept, counts, tokens))

    def fires(self, score: float) -> bool:
        return score >= self.threshold

    def problem(self, moe_layers: list[int], num_experts: int) -> str | None:
        """Why an engine with these MoE layers cannot run this guard; None if it can."""
        if list(self.moe_layers) != list(moe_layers):
            return f"guard {self.name!r} scores MoE layers {list(self.moe_layers)[:8]}, the " \
                   f"engine has {list(moe_layers)[:8]}"
        if self.weights.shape != (len(moe_layers), num_experts):
            return f"guard {self.name!r} does not have {num_experts} weights per MoE layer"
        finite = bool(np.isfinite(self.weights).all()) and math.isfinite(self.intercept)
        if not finite or not 0.0 < self.threshold < 1.0:
            return f"guard {self.name!r} has a value that is not finite or a bad threshold"
        return None

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "moe_layers": list(self.moe_layers),
                "shape": list(self.weights.shape),
                "weights": base64.b64encode(self.weights.astype("<f8").tobytes()).decode("ascii"),
                "intercept": self.intercept, "threshold": self.threshold}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> GuardSpec:
        rows, cols = (int(n) for n in data["shape"])
        if not (rows > 0 and cols > 0 and rows * cols <= MAX_WEIGHTS):
            raise ValueError("guard weights of a bad shape")
        raw = base64.b64decode(str(data["weights"]), validate=True)
        if len(raw) != rows * cols * 8:
            raise ValueError("guard weights do not fill their shape")
        weights = np.frombuffer(raw, dtype="<f8").reshape(rows, cols)
        return cls(str(data["name"]), tuple(int(layer) for layer in data["moe_layers"]),
                   weights, float(data["intercept"]), float(data["threshold"]))
