"""Choosing the experts to switch on and off from a statistics table (the SteerMoE rule).

With RD = p1 - p2 per (layer, expert) and the direction's sign s (+1 for `1to2`, -1 for
`2to1`), score = s * RD:

1. Rank all rows by |RD|, largest first; equal |RD| are ordered by layer, then expert.
2. ACTIVATE: take the first N rows of that ranking with score > 0. Walking them in rank order,
   an expert is activated unless its layer already activates top_k experts; such an expert is
   dropped, not replaced, so a profile may activate fewer than N.
3. DEACTIVATE: take the first M rows with score < 0. An expert is deactivated unless its layer
   already deactivates num_experts - top_k experts (at least top_k must remain); such an expert
   is dropped, not replaced.
4. Rows with score 0 are never chosen; if fewer than N (M) rows qualify, all of them are used.

Graded (`graded_bias`): the same experts, each given a bias instead of a switch,
+scale * |RD| for those the rule activates and -scale * |RD| for those it deactivates, clipped
to +-`MAX_BIAS` (rule `steermoe-rd-graded/1`): the experts that separate the sides most are
pushed hardest, and a request's `steering_strength` scales them all.

`1to2` activates the experts side 1 uses more and deactivates those side 2 uses more: it steers
toward side 1's behaviour. `2to1` swaps the sides (the published tables' "Reverse").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from expert_profiles.expert_stats import ExpertStats
from expert_profiles.schema import MAX_BIAS

Direction = Literal["1to2", "2to1"]
DIRECTIONS: tuple[Direction, ...] = ("1to2", "2to1")
RULE = "steermoe-rd/1"
GRADED_RULE = "steermoe-rd-graded/1"


@dataclass
class Selection:
    """Chosen experts per layer, with what was asked and what the per-layer caps dropped."""

    activate: dict[int, list[int]] = field(default_factory=dict)
    deactivate: dict[int, list[int]] = field(default_factory=dict)
    activate_requested: int = 0
    deactivate_requested: int = 0
    activate_dropped: int = 0
    deactivate_dropped: int = 0
    activate_available: int = 0
    deactivate_available: int = 0

    def counts(self) -> tuple[int, int]:
        return (sum(map(len, self.activate.values())), sum(map(len, self.deactivate.values())))

    def summary(self) -> dict[str, int | str]:
        activated, deactivated = self.counts()
        return {
            "rule": RULE,
            "activate_requested": self.activate_requested,
            "activated": activated,
            "activate_dropped_by_top_k": self.activate_dropped,
            "deactivate_requested": self.deactivate_requested,
            "deactivated": deactivated,
            "deactivate_dropped_by_layer_cap": self.deactivate_dropped,
        }


def graded_bias(stats: ExpertStats, selection: Selection,
                scale: float) -> dict[int, dict[int, float]]:
    """The selection as biases: +scale*|RD| for activated, -scale*|RD| for deactivated experts
    (clipped to +-MAX_BIAS; rounded to 6 decimals so profiles stay readable)."""
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"the graded scale must be a positive number, got {scale}")
    rd = {(int(layer), int(expert)): abs(float(value))
          for layer, expert, value in zip(stats.layer, stats.expert, stats.rd, strict=True)}
    bias: dict[int, dict[int, float]] = {}
    for sign, sets in ((1.0, selection.activate), (-1.0, selection.deactivate)):
        for layer, experts in sets.items():
            for expert in experts:
                value = round(sign * min(scale * rd[(layer, expert)], MAX_BIAS), 6)
                if value:
                    bias.setdefault(layer, {})[expert] = value
    return {layer: dict(sorted(row.items())) for layer, row in sorted(bias.items())}


def ranking(stats: ExpertStats) -> np.ndarray:
    """Row indices by |RD| descending, then layer, then expert."""
    return np.lexsort((stats.expert, stats.layer, -np.abs(stats.rd)))


def select_experts(stats: ExpertStats, *, activate: int, deactivate: int,
                   direction: Direction, top_k: int, num_experts: int) -> Selection:
    """Apply the rule of this module's docstring."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if activate < 0 or deactivate < 0:
        raise ValueError("the numbers of experts to activate and deactivate must be >= 0")
    sign = 1.0 if direction == "1to2" else -1.0
    order = ranking(stats)
    score = sign * stats.rd[order]
    positive = order[score > 0]
    negative = order[score < 0]
    result = Selection(activate_requested=activate, deactivate_requested=deactivate,
                       activate_available=len(positive), deactivate_available=len(negative))
    result.activate, result.activate_dropped = _capped(stats, positive[:activate], top_k)
    result.deactivate, result.deactivate_dropped = _capped(
        stats, negative[:deactivate], num_experts - top_k
    )
    return result


def _capped(stats: ExpertStats, rows: np.ndarray, per_layer: int) -> tuple[
    dict[int, list[int]], int
]:
    chosen: dict[int, list[int]] = {}
    dropped = 0
    for row in rows:
        layer, expert = int(stats.layer[row]), int(stats.expert[row])
        experts = chosen.setdefault(layer, [])
        if len(experts) >= per_layer:
            dropped += 1
            continue
        experts.append(expert)
    return {layer: sorted(e) for layer, e in sorted(chosen.items()) if e}, dropped
