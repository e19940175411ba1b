"""Which steering a request may have: locked endpoints, client-selectable profiles, operator flags.

Answers with 403 (not allowed), 404 (unknown profile) or 400; whether the chosen steering fits
the served model is checked afterwards, when it is resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from expert_profiles.composition import SEPARATOR, composed_name, split_names
from expert_profiles.echo import clip
from expert_profiles.guard import GuardFile
from expert_profiles.request_steering import (
    CAPTURE_KEY,
    GUARD_KEY,
    INLINE_KEY,
    PROFILE_KEY,
    STRENGTH_KEY,
    ProfileCache,
    RequestedSteering,
    SteeringRequestError,
)
from expert_profiles.schema import SteeringProfile
from server.config import LOWERS_SAFETY_TAG, ServerConfig, endpoint_guard
from server.errors import SteeringHTTPError

COMPOSED_LABEL = "composed"


@dataclass(frozen=True)
class SteeringDecision:
    """The steering a request runs with, and the served name it came through."""

    endpoint: str | None
    locked: bool = False
    profile: str | None = None
    inline: dict[str, Any] | None = None
    capture: bool = False
    # The request's `steering_strength` (None: full strength).
    strength: float | None = None
    # A guard: steering with its profile only if the guard fires on the prompt.
    guard: str | None = None
    # The profiles as the policy read them (one, or the parts of a composition `A+B`, or a
    # guard's profile): resolution uses these objects, never a later read. Empty: not read yet
    # (locked endpoints).
    loaded: tuple[SteeringProfile, ...] = field(default=(), compare=False, repr=False)
    loaded_guard: GuardFile | None = field(default=None, compare=False, repr=False)

    @property
    def steered(self) -> bool:
        return self.profile is not None or self.inline is not None or self.guard is not None

    @property
    def label(self) -> str:
        """The profile label of metrics: `profile`'s name, `composed` for a composition (its
        names are in the audit line: one label per combination would let clients mint label
        series), `guard:NAME`, `inline` or `none`."""
        if self.guard is not None:
            return f"guard:{self.guard}"
        if self.profile is not None:
            return COMPOSED_LABEL if SEPARATOR in self.profile else self.profile
        return "inline" if self.inline is not None else "none"


def as_http_error(exc: SteeringRequestError, param: str | None = PROFILE_KEY) -> SteeringHTTPError:
    return SteeringHTTPError(exc.status, str(exc), param=param)


class SteeringPolicy:
    """The operator's rules, applied to one request at a time."""

    def __init__(self, config: ServerConfig, profiles: ProfileCache):
        self.config = config
        self.profiles = profiles

    def profile(self, name: str) -> SteeringProfile:
        """The stored profile `name`; SteeringHTTPError 404 (or 400/500) otherwise."""
        try:
            return self.profiles.get(name)
        except SteeringRequestError as exc:
            raise as_http_error(exc) from None

    def client_may_select(self, profile: SteeringProfile) -> bool:
        if self.config.client_profiles is None:
            return LOWERS_SAFETY_TAG not in profile.tags
        return profile.name in self.config.client_profiles

    def client_may_read(self, profile: SteeringProfile) -> bool:
        """Clients see the profiles they may select and those behind locked endpoints."""
        return self.client_may_select(profile) or bool(self.endpoints_of(profile.name))

    def endpoints_of(self, profile_name: str) -> list[str]:
        """The locked endpoints that run the profile, alone, composed, as a client add-on or
        as their guard's profile."""
        config = self.config
        return [alias for alias, locked in config.endpoints.items()
                if profile_name in self._locked_profiles(locked)
                or profile_name in config.endpoint_client_profiles.get(alias, ())]

    def _locked_profiles(self, locked: str) -> tuple[str, ...]:
        guard = endpoint_guard(locked)
        if guard is None:
            return split_names(locked)
        try:
            return (self.profiles.get_guard(guard).profile,)
        except SteeringRequestError:
            return ()

    def load_guard(self, name: str) -> tuple[GuardFile, SteeringProfile]:
        """Guard `name` and the profile it triggers; SteeringHTTPError (404, 400, 500)."""
        try:
            guard = self.profiles.get_guard(name)
            return guard, self.profiles.get(guard.profile)
        except SteeringRequestError as exc:
            raise as_http_error(exc, GUARD_KEY) from None

    def load_profiles(self, composed: str) -> tuple[SteeringProfile, ...]:
        """The stored profiles of a profile name or composition `A+B`; SteeringHTTPError as
        `profile` for each (400 for a composition that cannot be one)."""
        try:
            return self.profiles.get_all(composed)
        except SteeringRequestError as exc:
            raise as_http_error(exc) from None

    def decide(self, model: str | None, requested: RequestedSteering) -> SteeringDecision:
        """The steering to apply for a request to served name `model`."""
        endpoint = model or self.config.default_name
        locked_profile = self.config.endpoints.get(model) if model else None
        if requested.capture and not self.config.allow_routing_capture:
            raise SteeringHTTPError(
                403, "routing capture is not enabled on this server "
                "(the operator starts it with --allow-routing-capture)", param=CAPTURE_KEY,
            )
        if locked_profile is not None and endpoint_guard(locked_profile) is not None:
            if requested.mentions_steering or requested.strength is not None:
                raise SteeringHTTPError(
                    403, f"endpoint {endpoint!r} always runs guard "
                    f"{endpoint_guard(locked_profile)!r}; a request cannot change its steering",
                    param=GUARD_KEY)
            return SteeringDecision(endpoint, locked=True, guard=endpoint_guard(locked_profile),
                                    capture=requested.capture)
        if locked_profile is not None:
            if requested.strength is not None:
                raise SteeringHTTPError(
                    403, f"endpoint {endpoint!r} always runs steering profile "
                    f"{locked_profile!r} at full strength; steering_strength is not accepted "
                    "here", param=STRENGTH_KEY)
            return self._locked(endpoint, locked_profile, requested)
        if requested.inline is not None:
            if not self.config.allow_inline_steering:
                raise SteeringHTTPError(
                    403, "inline steering is not enabled on this server (the operator "
                    "starts it with --allow-inline-steering); select a steering_profile",
                    param=INLINE_KEY,
                )
            return SteeringDecision(endpoint, inline=requested.inline, capture=requested.capture,
                                    strength=requested.strength)
        if requested.guard is not None:
            guard, profile = self.load_guard(requested.guard)
            if not self.client_may_select(profile):
                raise SteeringHTTPError(
                    403, f"guard {requested.guard!r} steers with profile {profile.name!r}, which "
                    "is not available to clients on this server", param=GUARD_KEY)
            return SteeringDecision(endpoint, guard=requested.guard, capture=requested.capture,
                                    strength=requested.strength, loaded=(profile,),
                                    loaded_guard=guard)
        if requested.profile is None:
            return SteeringDecision(endpoint, capture=requested.capture)
        profiles = self.load_profiles(requested.profile)
        for profile in profiles:
            if not self.client_may_select(profile):
                raise SteeringHTTPError(
                    403, f"steering profile {profile.name!r} is not available to clients on "
                    "this server", param=PROFILE_KEY,
                )
        return SteeringDecision(endpoint, profile=composed_name([p.name for p in profiles]),
                                capture=requested.capture, strength=requested.strength,
                                loaded=profiles)

    def _locked(self, endpoint: str | None, profile: str,
                requested: RequestedSteering) -> SteeringDecision:
        """A locked endpoint runs its profile (or composition); a request may add the profiles
        the operator allows there (`--endpoint-client-profiles`), nothing else."""
        if requested.inline is not None or requested.guard is not None:
            raise SteeringHTTPError(
                403, f"endpoint {endpoint!r} always runs steering profile {profile!r}; "
                f"{'inline steering' if requested.inline is not None else 'a guard'} is not "
                "accepted here", param=INLINE_KEY if requested.inline is not None else GUARD_KEY,
            )
        locked = split_names(profile)
        names = set(locked)
        if requested.profile_given:
            added = [] if requested.profile is None else [
                name for name in split_names(requested.profile) if name not in locked]
            allowed = self.config.endpoint_client_profiles.get(endpoint or "", ())
            refused = requested.profile is None or any(name not in allowed for name in added)
            if refused:
                action = ("turn steering off" if requested.profile is None
                          else f"select profile '{clip(requested.profile)}'")
                may_add = (f" (it may add {', '.join(repr(name) for name in allowed)})"
                           if allowed else "")
                raise SteeringHTTPError(
                    403, f"endpoint {endpoint!r} always runs steering profile {profile!r}; a "
                    f"request cannot {action} on it{may_add}", param=PROFILE_KEY,
                )
            names.update(added)
        return SteeringDecision(endpoint, locked=True, profile=composed_name(names),
                                capture=requested.capture)
