"""`expert_profiles.selection` (the expert-choice rule) and `expert_stats` (the table)."""

from __future__ import annotations

import numpy as np
import pytest

from expert_profiles.expert_stats import ExpertStats, StatsFormatError
from expert_profiles.selection import ranking, select_experts


def table(rows: list[tuple[int, int, int, int]], n1: int = 10, n2: int = 10) -> ExpertStats:
    """Rows of (layer, expert, A1, A2) with fixed token totals."""
    layer, expert, a1, a2 = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    full = np.ones(len(rows), dtype=np.int64)
    return ExpertStats(layer, expert, a1, a2, full * n1, full * n2)


# RD (n1 = n2 = 10): (0,0) +0.5, (0,1) +0.4, (0,2) +0.3, (1,0) -0.6, (1,1) -0.2, (1,2) 0,
# (2,0) +0.4 (ties with (0,1)), (2,1) -0.4
ROWS = [(0, 0, 6, 1), (0, 1, 5, 1), (0, 2, 4, 1), (1, 0, 1, 7), (1, 1, 2, 4), (1, 2, 3, 3),
        (2, 0, 5, 1), (2, 1, 1, 5)]


def test_rates_and_rd():
    stats = table(ROWS)
    assert stats.p1[0] == pytest.approx(0.6) and stats.p2[0] == pytest.approx(0.1)
    assert stats.rd[3] == pytest.approx(-0.6)
    assert list(stats.d1) == [4, 5, 6, 9, 8, 7, 5, 9]


def test_ranking_orders_by_abs_rd_then_layer_then_expert():
    stats = table(ROWS)
    order = [(int(stats.layer[i]), int(stats.expert[i])) for i in ranking(stats)]
    assert order == [(1, 0), (0, 0), (0, 1), (2, 0), (2, 1), (0, 2), (1, 1), (1, 2)]


def test_activate_and_deactivate_by_rank():
    chosen = select_experts(table(ROWS), activate=3, deactivate=2, direction="1to2", top_k=2,
                            num_experts=3)
    assert chosen.activate == {0: [0, 1], 2: [0]}
    assert chosen.deactivate == {1: [0], 2: [1]}
    assert chosen.counts() == (3, 2)


def test_top_k_cap_drops_instead_of_replacing():
    chosen = select_experts(table(ROWS), activate=3, deactivate=0, direction="1to2", top_k=1,
                            num_experts=3)
    # Candidates (0,0), (0,1), (2,0): (0,1) exceeds layer 0's cap of 1 and is dropped.
    assert chosen.activate == {0: [0], 2: [0]}
    assert chosen.activate_dropped == 1
    assert chosen.summary()["activate_dropped_by_top_k"] == 1


def test_deactivation_keeps_top_k_experts():
    rows = [(0, e, 0, 5 + e) for e in range(4)]
    chosen = select_experts(table(rows), activate=0, deactivate=4, direction="1to2", top_k=2,
                            num_experts=4)
    assert chosen.deactivate == {0: [2, 3]}
    assert chosen.deactivate_dropped == 2


def test_direction_2to1_swaps_the_sides():
    forward = select_experts(table(ROWS), activate=2, deactivate=2, direction="1to2", top_k=2,
                             num_experts=4)
    reverse = select_experts(table(ROWS), activate=2, deactivate=2, direction="2to1", top_k=2,
                             num_experts=4)
    assert reverse.activate == {1: [0], 2: [1]}
    assert reverse.deactivate == {0: [0, 1]}
    assert reverse.activate != forward.activate


def test_zero_rd_is_never_chosen_and_shortfalls_are_reported():
    chosen = select_experts(table(ROWS), activate=10, deactivate=10, direction="1to2", top_k=3,
                            num_experts=6)
    everything = {(layer, e) for layer, es in {**chosen.activate}.items() for e in es}
    everything |= {(layer, e) for layer, es in chosen.deactivate.items() for e in es}
    assert (1, 2) not in everything
    assert chosen.activate_available == 4 and chosen.deactivate_available == 3
    assert chosen.counts() == (4, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="direction"):
        select_experts(table(ROWS), activate=1, deactivate=1, direction="up", top_k=2,
                       num_experts=3)
    with pytest.raises(ValueError, match=">= 0"):
        select_experts(table(ROWS), activate=-1, deactivate=1, direction="1to2", top_k=2,
                       num_experts=3)


# ---- the table -------------------------------------------------------------------------------


def test_from_counts_and_csv_roundtrip():
    a1 = np.array([[3, 0, 1], [2, 2, 0]])
    a2 = np.array([[0, 1, 1], [1, 0, 1]])
    stats = ExpertStats.from_counts([1, 3], a1, a2, n1=5, n2=2)
    assert list(stats.layer) == [1, 1, 1, 3, 3, 3]
    assert list(stats.expert) == [0, 1, 2, 0, 1, 2]
    text = stats.to_csv_text()
    assert text.splitlines()[0] == "layer,expert,A1,D1,A2,D2,N1,N2,p1,p2,RD"
    assert text.splitlines()[1].startswith("1,0,3,2,0,2,5,2,0.6,0.0,0.6")
    assert ExpertStats.from_csv_text(text) == stats
    grid = stats.rd_grid(4, 3)
    assert np.isnan(grid[0]).all() and np.isnan(grid[2]).all()
    assert grid[3, 1] == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("layer,expert,A1\n0,0,1\n", "lacks columns"),
        ("layer,expert,A1,D1,A2,D2,N1,N2\n0,0,x,1,1,1,2,2\n", "A1 is not an integer"),
        ("layer,expert,A1,D1,A2,D2,N1,N2\n0,0,1,0,1,1,2,2\n", "A \\+ D differs from N"),
        ("layer,expert,A1,D1,A2,D2,N1,N2\n0,0,1,1,1,1,2,2\n0,0,1,1,1,1,2,2\n", "listed twice"),
        ("layer,expert,A1,D1,A2,D2,N1,N2\n0,0,-1,3,1,1,2,2\n", "negative"),
    ],
)
def test_bad_tables(text, message):
    with pytest.raises(StatsFormatError, match=message):
        ExpertStats.from_csv_text(text)


def test_graded_bias_weights_the_selected_experts_by_rd():
    from expert_profiles.model_shape import ModelShape
    from expert_profiles.profile_outputs import profile_from_selection
    from expert_profiles.schema import MAX_BIAS
    from expert_profiles.selection import GRADED_RULE, graded_bias

    stats = table([(0, 1, 9, 1), (0, 2, 1, 9), (1, 3, 6, 2), (1, 4, 5, 5)])
    selection = select_experts(stats, activate=2, deactivate=1, direction="1to2", top_k=2,
                               num_experts=8)
    assert graded_bias(stats, selection, 10.0) == {0: {1: 8.0, 2: -8.0}, 1: {3: 4.0}}
    assert graded_bias(stats, selection, 1000.0)[0][1] == MAX_BIAS
    with pytest.raises(ValueError, match="positive"):
        graded_bias(stats, selection, 0.0)
    shape = ModelShape("Qwen3MoeForCausalLM", 2, 8, 2, (0, 1))
    profile = profile_from_selection("graded", shape, selection, graded=(stats, 10.0))
    assert not profile.activate and not profile.deactivate
    assert profile.bias == {0: {1: 8.0, 2: -8.0}, 1: {3: 4.0}}
    assert profile.source["selection"]["rule"] == GRADED_RULE
