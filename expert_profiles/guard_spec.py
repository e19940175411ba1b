"""A guard as the engine runs it: the scoring part of a guard file, carried with a request.

A guarded request (`steering_guard: NAME`, or a locked endpoint `NAME=guard:GUARD`) resolves to
the steering of the guard's profile plus a `GuardSpec`. The engine runs the prompt unsteered,
counts the prompt's routing as the guard's feature (`guard.prefill_share`), scores it after
the last prompt token and, when the score reaches the threshold, steers the request's later
tokens with the profile (`vllm_patches.engine_steering`). Everything the engine needs travels
with the request, so workers read no guard files. No vLLM import here.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from expert_profiles.guard import GuardFile, prefill_share, sigmoid


@dataclass(frozen=True)
class GuardSpec:
    """Name, MoE layers, weights [layer][expert], intercept and threshold of one guard."""

    name: str
    moe_layers: tuple[int, ...]
    weights: tuple[tuple[float, ...], ...]
    intercept: float
    threshold: float

    @classmethod
    def from_guard(cls, guard: GuardFile) -> GuardSpec:
        return cls(guard.name, tuple(guard.moe_layers),
                   tuple(tuple(float(w) for w in row) for row in guard.weights),
                   float(guard.intercept), float(guard.threshold))

    @property
    def digest(self) -> str:
        """A stable hash of what decides (layers, weights, intercept, threshold)."""
        blob = json.dumps([list(self.moe_layers), self.weights, self.intercept, self.threshold],
                          separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def score(self, counts: np.ndarray, tokens: int) -> float:
        """The guard's probability for a prompt whose `tokens` counted tokens routed as
        `counts` [MoE layer, expert] (the feature of `guard.prefill_share`)."""
        share = prefill_share(counts, tokens)
        weights = np.asarray(self.weights, dtype=np.float64)
        if share.shape != weights.shape:
            raise ValueError(f"counts have shape {share.shape}, the guard wants {weights.shape}")
        return sigmoid(float(np.sum(weights * share)) + self.intercept)

    def fires(self, score: float) -> bool:
        return score >= self.threshold

    def problem(self, moe_layers: list[int], num_experts: int) -> str | None:
        """Why an engine with these MoE layers cannot run this guard; None if it can."""
        if list(self.moe_layers) != list(moe_layers):
            return f"guard {self.name!r} scores MoE layers {list(self.moe_layers)[:8]}, the " \
                   f"engine has {list(moe_layers)[:8]}"
        if any(len(row) != num_experts for row in self.weights):
            return f"guard {self.name!r} does not have {num_experts} weights per layer"
        values = [self.intercept, self.threshold, *(w for row in self.weights for w in row)]
        if not all(isinstance(v, float) and math.isfinite(v) for v in values) \
                or not 0.0 < self.threshold < 1.0:
            return f"guard {self.name!r} has a value that is not finite or a bad threshold"
        return None

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "moe_layers": list(self.moe_layers),
                "weights": [list(row) for row in self.weights], "intercept": self.intercept,
                "threshold": self.threshold}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> GuardSpec:
        return cls(str(data["name"]), tuple(int(layer) for layer in data["moe_layers"]),
                   tuple(tuple(float(w) for w in row) for row in data["weights"]),
                   float(data["intercept"]), float(data["threshold"]))
