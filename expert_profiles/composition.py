"""Several profiles applied as one: `steering_profile: ["safety", "concise"]` or `"a+b"`.

The rules, which make a composition independent of the order its profiles are named in (so it is
named by its sorted names, `concise+safety`):

- per layer, the activated experts are the union of the profiles' activated experts, and the
  deactivated experts the union of their deactivated experts;
- an expert that one profile activates and another deactivates in the same layer is a conflict,
  refused (`CompositionConflictError`) with the profiles, the layer and the experts named;
- graded biases add up per expert (clipped to +-`MAX_BIAS`); an expert that any of the profiles
  switches on or off in a layer takes no bias there (a switch wins over a bias);
- eps is the largest eps of the profiles (a profile without one counts as the server default);
- the union must fit the served model like a single profile does (at most top-k activated and at
  least top-k left undeactivated per layer); the caller checks that (`check_shape`);
- at most `MAX_COMPOSED` profiles, each named once.

A single profile is not a composition: it resolves exactly as before, with the same digest.
"""

from __future__ import annotations

from collections.abc import Sequence

from expert_profiles.echo import clip
from expert_profiles.schema import MAX_BIAS, ExpertSteering, SteeringProfile, is_profile_name

SEPARATOR = "+"
MAX_COMPOSED = 8


class CompositionError(ValueError):
    """A list of profile names that cannot be composed (syntax, count, repeats)."""


class CompositionConflictError(ValueError):
    """Profiles that disagree about an expert."""


def split_names(value: str | Sequence[str]) -> tuple[str, ...]:
    """The sorted profile names of `NAME`, `A+B` or a list of names; CompositionError if a name
    is not a profile name, is given twice, or there are none or more than MAX_COMPOSED."""
    if isinstance(value, str):
        parts: Sequence[object] = value.split(SEPARATOR)
    elif isinstance(value, (list, tuple)):
        parts = [part for item in value
                 for part in (item.split(SEPARATOR) if isinstance(item, str) else [item])]
    else:
        raise CompositionError("a profile name or a list of profile names is expected")
    if not parts:
        raise CompositionError("the list of profiles is empty")
    if len(parts) > MAX_COMPOSED:
        raise CompositionError(f"at most {MAX_COMPOSED} profiles can be composed, "
                               f"got {len(parts)}")
    bad = [part for part in parts if not is_profile_name(part)]  # also any non-string
    if bad:
        raise CompositionError(f"invalid steering profile name '{clip(bad[0])}'")
    names = [str(part) for part in parts]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CompositionError(f"profile {repeated[0]!r} is named twice")
    return tuple(sorted(names))


def composed_name(names: Sequence[str]) -> str:
    """The name of a composition (sorted names joined by '+'); a single name is itself."""
    return SEPARATOR.join(sorted(names))


def compose(profiles: Sequence[SteeringProfile], default_eps: float) -> ExpertSteering:
    """The union of the profiles' expert sets; eps the largest of theirs, a profile without
    one counting as `default_eps` (None if no profile gives one: the default applies).

    Raises CompositionConflictError when one profile activates what another deactivates."""
    activate: dict[int, set[int]] = {}
    deactivate: dict[int, set[int]] = {}
    activated_by: dict[tuple[int, int], str] = {}
    for profile in profiles:
        for layer, experts in profile.activate.items():
            activate.setdefault(layer, set()).update(experts)
            for expert in experts:
                activated_by.setdefault((layer, expert), profile.name)
        for layer, experts in profile.deactivate.items():
            deactivate.setdefault(layer, set()).update(experts)
    for profile in profiles:
        for layer, experts in sorted(profile.deactivate.items()):
            clash = sorted(set(experts) & activate.get(layer, set()))
            if clash:
                other = activated_by[(layer, clash[0])]
                raise CompositionConflictError(
                    f"profiles {other!r} and {profile.name!r} conflict: layer {layer} experts "
                    f"{clash} are activated by {other!r} and deactivated by {profile.name!r}"
                )
    bias: dict[int, dict[int, float]] = {}
    for profile in profiles:
        for layer, row in profile.bias.items():
            switched = activate.get(layer, set()) | deactivate.get(layer, set())
            for expert, value in row.items():
                if expert not in switched:
                    total = bias.setdefault(layer, {}).get(expert, 0.0) + value
                    bias[layer][expert] = max(-MAX_BIAS, min(MAX_BIAS, total))
    bias = {layer: row for layer, row in bias.items() if any(row.values())}
    if not activate and not deactivate and not bias:
        names = ", ".join(repr(p.name) for p in profiles)
        raise CompositionConflictError(f"profiles {names} cancel out: their biases sum to zero "
                                       "and no expert is left to steer")
    any_eps = any(p.eps is not None for p in profiles)
    eps = max(p.eps if p.eps is not None else default_eps for p in profiles) if any_eps else None
    return ExpertSteering(
        activate={layer: sorted(experts) for layer, experts in activate.items()},
        deactivate={layer: sorted(experts) for layer, experts in deactivate.items()},
        bias=bias,
        eps=eps,
    )
