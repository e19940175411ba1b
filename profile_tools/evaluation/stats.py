"""Rates with Wilson score intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    hits: int
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return {"rate": self.value, "ci95": [self.low, self.high], "hits": self.hits,
                "n": self.total}

    def __str__(self) -> str:
        if not self.total:
            return "n/a"
        return f"{self.value:.1%} [{self.low:.1%}, {self.high:.1%}] ({self.hits}/{self.total})"


def wilson(hits: int, total: int, z: float = 1.959964) -> Rate:
    """Wilson score interval (95% by default) of hits out of total."""
    if total <= 0:
        return Rate(0, 0, float("nan"), float("nan"))
    p = hits / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # clamped so rounding never puts the point outside its own interval
    return Rate(hits, total, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))
