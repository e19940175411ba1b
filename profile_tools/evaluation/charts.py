"""What every chart of `steermoe eval` shares: matplotlib without a display, and the finish."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish(figure: Any, axes: Any, path: Path, title: str) -> Path:
    """Rates with 95% Wilson intervals on the y axis, the title, the legend beside the plot;
    written to `path` and closed."""
    axes.set_ylabel("rate (95% Wilson CI)")
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    pyplot().close(figure)
    return path
