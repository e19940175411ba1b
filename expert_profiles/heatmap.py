"""A layer x expert picture of RD = p1 - p2, with a profile's chosen experts marked (PNG).

Red = more active on side 1, blue = more active on side 2 (a diverging colormap centred at 0,
symmetric limits); grey cells are layers without statistics (dense layers). Activated experts
are circled, deactivated ones crossed. Drawn with matplotlib's Agg canvas: no display needed and
no global backend change.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from expert_profiles.atomic_files import write_atomic
from expert_profiles.expert_stats import ExpertStats

ExpertSets = dict[int, list[int]]


def _points(sets: ExpertSets) -> tuple[list[int], list[int]]:
    xs, ys = [], []
    for layer, experts in sets.items():
        for expert in experts:
            xs.append(expert)
            ys.append(layer)
    return xs, ys


def symmetric_limit(values: np.ndarray) -> float:
    """The colour scale runs from -limit to +limit (0 in the middle): the largest |RD|."""
    finite = np.abs(values[np.isfinite(values)])
    return max(float(finite.max()) if finite.size else 0.0, 1e-6)


def render_heatmap_png(stats: ExpertStats, *, num_layers: int, num_experts: int,
                       activate: ExpertSets | None = None, deactivate: ExpertSets | None = None,
                       title: str = "") -> bytes:
    """The heatmap as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    grid = np.ma.masked_invalid(stats.rd_grid(num_layers, num_experts))
    limit = symmetric_limit(grid.filled(np.nan))
    width = min(24.0, max(6.0, 2.5 + 0.12 * num_experts))
    height = min(18.0, max(3.5, 1.8 + 0.22 * num_layers))
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.set_facecolor("#d0d0d0")
    cmap = _colormap()
    image = axes.imshow(grid, aspect="auto", interpolation="nearest", origin="upper", cmap=cmap,
                        norm=TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit))
    marker_size = max(14.0, min(80.0, 4000.0 / max(num_experts, num_layers)))
    xs, ys = _points(activate or {})
    if xs:
        axes.scatter(xs, ys, s=marker_size, facecolors="none", edgecolors="black",
                     linewidths=1.5, label=f"activated ({len(xs)})")
    xs, ys = _points(deactivate or {})
    if xs:
        axes.scatter(xs, ys, s=marker_size, marker="x", c="black", linewidths=1.2,
                     label=f"deactivated ({len(xs)})")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_title(title or "RD = p1 - p2 per expert")
    figure.colorbar(image, ax=axes, label="RD = p1 - p2 (side 1 minus side 2)")
    if activate or deactivate:
        figure.legend(loc="lower center", ncol=2, fontsize="small", frameon=False)
        figure.tight_layout(rect=(0.0, 0.06, 1.0, 1.0))
    else:
        figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _colormap():
    from matplotlib import colormaps

    return colormaps["RdBu_r"].with_extremes(bad="#d0d0d0")


def write_heatmap(path: str | Path, stats: ExpertStats, **kwargs) -> Path:
    """Render (see `render_heatmap_png`) and write atomically to `path`."""
    return write_atomic(Path(path), render_heatmap_png(stats, **kwargs))
