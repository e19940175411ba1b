"""The steering server's state in one API server process: config, profiles, policy, metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from expert_profiles import request_steering as rs
from expert_profiles.model_shape import ModelShape
from expert_profiles.schema import SteeringProfile
from server import vllm_server_compat as compat
from server.audit import audit_logger
from server.config import ServerConfig, admin_token_from_env
from server.errors import SteeringHTTPError
from server.metrics import SteeringMetrics, steering_metrics
from server.policy import SteeringDecision, SteeringPolicy, as_http_error
from server.responses_state import ResponseSteeringStore


class ServedModel(Protocol):
    """What the steering layer needs from the plugin's front end (`FrontendSteering`)."""

    eps: float

    def served_shape(self) -> tuple[ModelShape | None, str | None]: ...


class SteeringContext:
    """Everything requests are checked against; one per middleware instance."""

    def __init__(self, config: ServerConfig, admin_token: str | None = None,
                 served_model: Callable[[], ServedModel | None] = compat.frontend_steering,
                 metrics: SteeringMetrics | None = None):
        self.config = config
        self.admin_token = admin_token
        # The profile directory, read through one store (and its cache): by requests, with
        # statuses (`profiles`), and by the admin API (`store`; None without a directory).
        self.profiles = rs.ProfileCache(config.profiles_dir)
        self.store = self.profiles.store
        self.policy = SteeringPolicy(config, self.profiles)
        self.metrics = metrics or steering_metrics()
        self.audit = audit_logger(config.audit_log)
        # The steering of stored Responses-API responses (this process's).
        self.responses = ResponseSteeringStore()
        self._served_model = served_model
        self._scan: tuple[Any, dict[str, SteeringProfile], dict[str, str]] | None = None

    @classmethod
    def from_env(cls) -> SteeringContext:
        return cls(ServerConfig.from_env(), admin_token_from_env())

    def served_model(self) -> ServedModel:
        model = self._served_model()
        if model is None:
            raise SteeringHTTPError(
                503, "steering is not available: the steermoe plugin is not loaded in this "
                "server, or the engine is still starting",
            )
        return model

    def served_eps(self) -> float | None:
        model = self._served_model()
        return None if model is None else model.eps

    def served_shape(self) -> tuple[ModelShape | None, str | None]:
        return self.served_model().served_shape()

    def resolve(self, decision: SteeringDecision) -> rs.ResolvedSteering | None:
        """Check the decided steering against the served model; SteeringHTTPError if it fails.

        A profile (each part of a composition) is read once per request: the copy the policy
        checked (or, for a locked endpoint, read here), and its resolved expert sets are what
        the engine runs."""
        if not decision.steered:
            return None
        model = self.served_model()
        shape, reason = model.served_shape()
        param = (rs.GUARD_KEY if decision.guard is not None else
                 rs.PROFILE_KEY if decision.profile is not None else rs.INLINE_KEY)
        try:
            shape = rs.require_steerable(shape, reason)
            if decision.guard is not None and decision.loaded_guard is not None:
                resolved = rs.resolve_guard_file(decision.loaded_guard, decision.loaded[0],
                                                 shape, model.eps)
            elif decision.guard is not None:  # a locked endpoint's guard: read here, once
                resolved = rs.resolve_guard(self.profiles, decision.guard, shape, model.eps)
            elif decision.profile is not None:
                profiles = decision.loaded or self.policy.load_profiles(decision.profile)
                resolved = rs.resolve_profiles(profiles, shape, model.eps)
            else:
                assert decision.inline is not None
                resolved = rs.resolve_inline(decision.inline, shape, model.eps)
            return rs.scaled(resolved, decision.strength)
        except rs.SteeringRequestError as exc:
            raise as_http_error(exc, param) from None

    def scan_profiles(self) -> tuple[dict[str, SteeringProfile], dict[str, str]]:
        """(valid profiles, errors by file) of the directory; updates the profile gauges.

        Re-validates only when a profile file or the served shape changed since the last scan.
        """
        if self.store is None:
            return {}, {}
        model = self._served_model()
        shape = model.served_shape()[0] if model is not None else None
        key = (self.store.signature(), shape)
        if self._scan is None or self._scan[0] != key:
            profiles, errors = self.store.validate_all(shape)
            self._scan = (key, profiles, errors)
            self.metrics.set_profile_counts(len(profiles), len(errors))
        return self._scan[1], self._scan[2]
