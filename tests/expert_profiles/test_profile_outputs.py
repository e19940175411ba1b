"""Turning a selection into a profile: an empty selection is refused with a clear reason."""

from __future__ import annotations

import pytest

from expert_profiles.model_shape import ModelShape
from expert_profiles.profile_outputs import EmptySelectionError, profile_from_selection
from expert_profiles.selection import Selection

SHAPE = ModelShape("OlmoeForCausalLM", 4, 8, 2, moe_layers=(0, 1, 2, 3))


def test_an_empty_selection_names_what_was_asked_and_available():
    empty = Selection(activate_requested=3, deactivate_requested=0, activate_available=0)
    with pytest.raises(EmptySelectionError) as info:
        profile_from_selection("words", SHAPE, empty)
    message = str(info.value)
    assert "no experts selected for profile 'words'" in message
    assert "asked to activate 3 and deactivate 0" in message
    assert "0 experts lean towards the target side" in message


def test_a_one_sided_selection_makes_a_profile():
    selection = Selection(activate={1: [3]}, activate_requested=1, activate_available=1)
    profile = profile_from_selection("words", SHAPE, selection)
    assert profile.activate == {1: [3]} and profile.deactivate == {}
