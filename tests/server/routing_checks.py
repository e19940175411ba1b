"""Checking a response's captured routing against the steering it was given."""

from __future__ import annotations

from typing import Any

ExpertSets = dict[int, list[int]]


def computed_rows(routing: dict[str, Any]) -> list[list[list[int]]]:
    """Rows of positions the engine computed (prefix-cache hits hold -1)."""
    rows = [row for row in routing["expert_ids"] if all(e >= 0 for layer in row for e in layer)]
    assert rows, "the routing record has no computed rows"
    return rows


def follows(routing: dict[str, Any], activate: ExpertSets, deactivate: ExpertSets) -> bool:
    """Every computed row holds each activated expert and no deactivated one."""
    layers = routing["moe_layers"]
    named = set(activate) | set(deactivate)
    assert named <= set(layers), f"layers {sorted(named - set(layers))} are not in the record"
    for row in computed_rows(routing):
        for column, layer in enumerate(layers):
            chosen = set(row[column])
            if not set(activate.get(layer, [])) <= chosen:
                return False
            if chosen & set(deactivate.get(layer, [])):
                return False
    return True


def assert_follows(routing: dict[str, Any] | None, activate: ExpertSets,
                   deactivate: ExpertSets) -> None:
    assert routing is not None, "no routing in the response"
    assert follows(routing, activate, deactivate), routing
