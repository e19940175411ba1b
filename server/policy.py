"""Which steering a request may have: locked endpoints, client-selectable profiles, operator flags.

Answers with 403 (not allowed), 404 (unknown profile) or 400; whether the chosen steering fits
the served model is checked afterwards, when it is resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from expert_profiles.request_steering import (
    CAPTURE_KEY,
    INLINE_KEY,
    PROFILE_KEY,
    ProfileCache,
    SteeringRequestError,
)
from expert_profiles.schema import SteeringProfile
from server.config import LOWERS_SAFETY_TAG, ServerConfig
from server.errors import SteeringHTTPError, clip
from server.request_body import RequestedSteering


@dataclass(frozen=True)
class SteeringDecision:
    """The steering a request runs with, and the served name it came through."""

    endpoint: str | None
    locked: bool = False
    profile: str | None = None
    inline: dict[str, Any] | None = None
    capture: bool = False
    # The profile as the policy read it: resolution uses this object, never a later read.
    loaded: SteeringProfile | None = field(default=None, compare=False, repr=False)

    @property
    def steered(self) -> bool:
        return self.profile is not None or self.inline is not None

    @property
    def label(self) -> str:
        """`profile`'s name, `inline` or `none` (the profile label of metrics)."""
        if self.profile is not None:
            return self.profile
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
        return self.client_may_select(profile) or profile.name in self.config.endpoints.values()

    def endpoints_of(self, profile_name: str) -> list[str]:
        return [alias for alias, name in self.config.endpoints.items() if name == profile_name]

    def decide(self, model: str | None, requested: RequestedSteering) -> SteeringDecision:
        """The steering to apply for a request to served name `model`."""
        endpoint = model or self.config.default_name
        locked_profile = self.config.endpoints.get(model) if model else None
        if requested.capture and not self.config.allow_routing_capture:
            raise SteeringHTTPError(
                403, "routing capture is not enabled on this server "
                "(the operator starts it with --allow-routing-capture)", param=CAPTURE_KEY,
            )
        if locked_profile is not None:
            return self._locked(endpoint, locked_profile, requested)
        if requested.inline is not None:
            if not self.config.allow_inline_steering:
                raise SteeringHTTPError(
                    403, "inline steering is not enabled on this server (the operator "
                    "starts it with --allow-inline-steering); select a steering_profile",
                    param=INLINE_KEY,
                )
            return SteeringDecision(endpoint, inline=requested.inline, capture=requested.capture)
        if requested.profile is None:
            return SteeringDecision(endpoint, capture=requested.capture)
        profile = self.profile(requested.profile)
        if not self.client_may_select(profile):
            raise SteeringHTTPError(
                403, f"steering profile {profile.name!r} is not available to clients on this "
                "server", param=PROFILE_KEY,
            )
        return SteeringDecision(endpoint, profile=profile.name, capture=requested.capture,
                                loaded=profile)

    def _locked(self, endpoint: str | None, profile: str,
                requested: RequestedSteering) -> SteeringDecision:
        if requested.inline is not None:
            raise SteeringHTTPError(
                403, f"endpoint {endpoint!r} always runs steering profile {profile!r}; "
                "inline steering is not accepted here", param=INLINE_KEY,
            )
        if requested.profile_given and requested.profile != profile:
            action = ("turn steering off" if requested.profile is None
                      else f"select profile '{clip(requested.profile)}'")
            raise SteeringHTTPError(
                403, f"endpoint {endpoint!r} always runs steering profile {profile!r}; a "
                f"request cannot {action} on it", param=PROFILE_KEY,
            )
        return SteeringDecision(endpoint, locked=True, profile=profile, capture=requested.capture)
