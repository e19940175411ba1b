"""Turning a selection into a profile and saving it with its statistics and heatmap."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from expert_profiles.expert_stats import ExpertStats
from expert_profiles.model_shape import ModelShape
from expert_profiles.schema import ProfileModel, SteeringProfile
from expert_profiles.selection import GRADED_RULE, Selection, graded_bias
from expert_profiles.store import ProfileExistsError, ProfileStore

logger = logging.getLogger(__name__)


class EmptySelectionError(ValueError):
    """A selection with no expert in it, which no profile can hold."""


def profile_from_selection(name: str, shape: ModelShape, selection: Selection, *,
                           description: str = "", source: dict[str, Any] | None = None,
                           tags: list[str] | None = None,
                           eps: float | None = None,
                           graded: tuple[ExpertStats, float] | None = None) -> SteeringProfile:
    """A validated profile activating and deactivating the selected experts, or, with
    `graded=(stats, scale)`, biasing them by scale * RD (`selection.graded_bias`).

    Raises EmptySelectionError when nothing was selected (a profile must select experts)."""
    if selection.counts() == (0, 0):
        raise EmptySelectionError(
            f"no experts selected for profile {name!r}: asked to activate "
            f"{selection.activate_requested} and deactivate {selection.deactivate_requested}; "
            f"{selection.activate_available} experts lean towards the target side and "
            f"{selection.deactivate_available} away from it. A profile must select at least "
            "one expert: ask for more, or use pairs whose sides differ more."
        )
    summary: dict[str, Any] = dict(selection.summary())
    sets: dict[str, Any] = {"activate": selection.activate, "deactivate": selection.deactivate}
    if graded is not None:
        stats, scale = graded
        sets = {"bias": graded_bias(stats, selection, scale)}
        summary.update(rule=GRADED_RULE, graded_scale=scale)
    return SteeringProfile(
        name=name,
        model=ProfileModel(**shape.to_dict()),
        **sets,
        eps=eps,
        description=description,
        tags=list(tags or []),
        source={**(source or {}), "selection": summary},
    )


def save_with_stats(store: ProfileStore, profile: SteeringProfile, stats: ExpertStats, *,
                    overwrite: bool, heatmap: bool = True) -> list[Path]:
    """Write statistics, heatmap, then the profile (last, so a visible profile is complete)."""
    if not overwrite and store.exists(profile.name):
        raise ProfileExistsError(
            f"profile {profile.name!r} already exists in {store.directory} "
            "(overwrite it explicitly)", name=profile.name, directory=store.directory
        )
    written = [store.put_stats(profile.name, stats)]
    if heatmap:
        from expert_profiles.heatmap import write_heatmap

        written.append(write_heatmap(
            store.heatmap_path(profile.name), stats,
            num_layers=profile.model.num_layers, num_experts=profile.model.num_experts,
            activate=profile.activate, deactivate=profile.deactivate,
            title=f"{profile.name}: RD = p1 - p2",
        ))
    written.append(store.put(profile, overwrite=overwrite))
    activated = sum(map(len, profile.activate.values()))
    deactivated = sum(map(len, profile.deactivate.values()))
    logger.info("steermoe: wrote profile %s (%d activated, %d deactivated) to %s",
                profile.name, activated, deactivated, store.directory)
    return written
