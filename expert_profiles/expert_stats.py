"""Per-expert activation statistics of paired data: the table a profile is selected from.

One row per (MoE layer, expert). For the target tokens of side 1 and side 2 of the pairs:
A1, A2 = how often the expert was among the top-k; N1, N2 = how many target tokens there were;
D1 = N1 - A1 and D2 = N2 - A2 = how often it was not; p1 = A1 / N1 and p2 = A2 / N2 = the
activation rates; RD = p1 - p2 (the risk difference; positive = more active on side 1).

Stored as CSV (`NAME.stats.csv` beside the profile) with the columns
`layer,expert,A1,D1,A2,D2,N1,N2,p1,p2,RD`. Reading recomputes the rates from the counts.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = ("layer", "expert", "A1", "D1", "A2", "D2", "N1", "N2", "p1", "p2", "RD")
_COUNT_COLUMNS = ("layer", "expert", "A1", "D1", "A2", "D2", "N1", "N2")


class StatsFormatError(ValueError):
    """A statistics table that cannot be read, with the reason."""


def _rate(hits: np.ndarray, total: np.ndarray) -> np.ndarray:
    out = np.zeros(hits.shape, dtype=np.float64)
    np.divide(hits, total, out=out, where=total > 0)
    return out


@dataclass(frozen=True, eq=False)
class ExpertStats:
    """Rows of the statistics table, as parallel integer arrays."""

    layer: np.ndarray
    expert: np.ndarray
    a1: np.ndarray
    a2: np.ndarray
    n1: np.ndarray
    n2: np.ndarray

    def __post_init__(self) -> None:
        lengths = {len(getattr(self, name)) for name in ("layer", "expert", "a1", "a2", "n1", "n2")}
        if len(lengths) != 1:
            raise StatsFormatError("statistics columns differ in length")
        if (self.a1 < 0).any() or (self.a2 < 0).any():
            raise StatsFormatError("negative activation count")
        if (self.a1 > self.n1).any() or (self.a2 > self.n2).any():
            raise StatsFormatError("an activation count exceeds its token count")
        keys = self.layer.astype(np.int64) * (int(self.expert.max(initial=0)) + 1) + self.expert
        if len(np.unique(keys)) != len(keys):
            raise StatsFormatError("a (layer, expert) row is listed twice")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertStats):
            return NotImplemented
        return all(np.array_equal(getattr(self, name), getattr(other, name))
                   for name in ("layer", "expert", "a1", "a2", "n1", "n2"))

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_counts(cls, moe_layers: Sequence[int], a1: np.ndarray, a2: np.ndarray,
                    n1: int, n2: int) -> ExpertStats:
        """From [moe layer, expert] activation counts and the target token totals."""
        a1 = np.asarray(a1, dtype=np.int64)
        a2 = np.asarray(a2, dtype=np.int64)
        num_layers, num_experts = a1.shape
        if a2.shape != a1.shape or len(moe_layers) != num_layers:
            raise StatsFormatError("count arrays do not match the MoE layers")
        layer = np.repeat(np.asarray(moe_layers, dtype=np.int64), num_experts)
        expert = np.tile(np.arange(num_experts, dtype=np.int64), num_layers)
        rows = len(layer)
        return cls(layer, expert, a1.ravel(), a2.ravel(), np.full(rows, n1, dtype=np.int64),
                   np.full(rows, n2, dtype=np.int64))

    @property
    def d1(self) -> np.ndarray:
        return self.n1 - self.a1

    @property
    def d2(self) -> np.ndarray:
        return self.n2 - self.a2

    @property
    def p1(self) -> np.ndarray:
        return _rate(self.a1, self.n1)

    @property
    def p2(self) -> np.ndarray:
        return _rate(self.a2, self.n2)

    @property
    def rd(self) -> np.ndarray:
        return self.p1 - self.p2

    def __len__(self) -> int:
        return len(self.layer)

    def rd_grid(self, num_layers: int, num_experts: int) -> np.ndarray:
        """RD as a [num_layers, num_experts] array; NaN where the table has no row."""
        grid = np.full((num_layers, num_experts), np.nan)
        grid[self.layer, self.expert] = self.rd
        return grid

    def to_csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        p1, p2, rd = self.p1, self.p2, self.rd
        for i in range(len(self)):
            writer.writerow([
                int(self.layer[i]), int(self.expert[i]), int(self.a1[i]), int(self.d1[i]),
                int(self.a2[i]), int(self.d2[i]), int(self.n1[i]), int(self.n2[i]),
                repr(float(p1[i])), repr(float(p2[i])), repr(float(rd[i])),
            ])
        return buffer.getvalue()

    @classmethod
    def from_csv_text(cls, text: str) -> ExpertStats:
        reader = csv.DictReader(io.StringIO(text))
        missing = [c for c in _COUNT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise StatsFormatError(f"statistics table lacks columns {missing}")
        columns: dict[str, list[int]] = {c: [] for c in _COUNT_COLUMNS}
        for line, row in enumerate(reader, start=2):
            for column in _COUNT_COLUMNS:
                try:
                    columns[column].append(int(row[column]))
                except (TypeError, ValueError):
                    raise StatsFormatError(
                        f"line {line}: {column} is not an integer: {row[column]!r}"
                    ) from None
        arrays = {c: np.asarray(v, dtype=np.int64) for c, v in columns.items()}
        if ((arrays["A1"] + arrays["D1"] != arrays["N1"]).any()
                or (arrays["A2"] + arrays["D2"] != arrays["N2"]).any()):
            raise StatsFormatError("A + D differs from N in some row")
        return cls(arrays["layer"], arrays["expert"], arrays["A1"], arrays["A2"], arrays["N1"],
                   arrays["N2"])

    @classmethod
    def read(cls, path: str | Path) -> ExpertStats:
        path = Path(path)
        try:
            return cls.from_csv_text(path.read_text(encoding="utf-8"))
        except StatsFormatError as exc:
            raise StatsFormatError(f"{path.name}: {exc}") from None
