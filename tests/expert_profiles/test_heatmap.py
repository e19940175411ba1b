"""`expert_profiles.heatmap`: a PNG of RD per layer and expert, centred at 0, with marks."""

from __future__ import annotations

import io

import numpy as np

from expert_profiles.expert_stats import ExpertStats
from expert_profiles.heatmap import render_heatmap_png, symmetric_limit, write_heatmap

PNG = b"\x89PNG\r\n\x1a\n"


def stats_with_signs() -> ExpertStats:
    # Layers 1 and 3 (layers 0 and 2 have no MoE block); RD +0.5 / -0.5 / small.
    a1 = np.array([[10, 0, 5, 5], [5, 5, 10, 0]])
    a2 = np.array([[0, 10, 5, 4], [5, 5, 0, 10]])
    return ExpertStats.from_counts([1, 3], a1, a2, 20, 20)


def pixels(png: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(png), format="png")[..., :3]


def test_png_with_red_blue_and_grey_cells():
    image = pixels(render_heatmap_png(stats_with_signs(), num_layers=4, num_experts=4))
    red = image[..., 0] > image[..., 2] + 0.25
    blue = image[..., 2] > image[..., 0] + 0.25
    grey = (np.abs(image - 0.816).max(axis=-1) < 0.02)  # #d0d0d0: layers without statistics
    assert red.sum() > 500 and blue.sum() > 500 and grey.sum() > 500


def test_scale_is_symmetric_around_zero():
    assert symmetric_limit(np.array([[0.1, 0.3], [np.nan, -0.05]])) == 0.3
    assert symmetric_limit(np.array([[-0.4, 0.2]])) == 0.4
    assert symmetric_limit(np.array([[np.nan, 0.0]])) > 0  # a flat table still draws


def test_marks_change_the_picture_and_file_is_written(tmp_path):
    stats = stats_with_signs()
    plain = render_heatmap_png(stats, num_layers=4, num_experts=4)
    marked = render_heatmap_png(stats, num_layers=4, num_experts=4, activate={1: [0]},
                                deactivate={3: [3]}, title="t")
    assert plain.startswith(PNG) and marked.startswith(PNG) and plain != marked
    path = write_heatmap(tmp_path / "x.png", stats, num_layers=4, num_experts=4)
    assert path.read_bytes().startswith(PNG)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_large_model_renders():
    rng = np.random.default_rng(0)
    a1 = rng.integers(0, 50, (48, 128))
    a2 = rng.integers(0, 50, (48, 128))
    stats = ExpertStats.from_counts(list(range(48)), a1, a2, 50, 50)
    png = render_heatmap_png(stats, num_layers=48, num_experts=128,
                             activate={0: [1, 2]}, deactivate={47: list(range(100))})
    assert png.startswith(PNG)
