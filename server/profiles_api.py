"""`/v1/steering/...`: profiles for clients to read, and for an admin to change.

    GET    /v1/steering/profiles           profiles a client may use (all, with the admin token)
    GET    /v1/steering/profiles/{name}    one profile, with its expert sets
    PUT    /v1/steering/profiles/{name}    create or replace (admin); checked against the model
    DELETE /v1/steering/profiles/{name}    delete (admin)
    POST   /v1/steering/profiles:reload    re-validate the directory (admin)
    GET    /v1/steering/endpoints          served names, locked profiles and what is allowed

Every change goes through `ProfileStore` (atomic writes); requests see it on their next lookup.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from expert_profiles.schema import ProfileMismatchError, SteeringProfile, describe_validation_error
from expert_profiles.store import ProfileNotFoundError
from server.context import SteeringContext
from server.errors import SteeringHTTPError
from vllm_patches.request_steering import SteeringRequestError

PREFIX = "/v1/steering"
PROFILES = f"{PREFIX}/profiles"
RELOAD = f"{PROFILES}:reload"
ENDPOINTS = f"{PREFIX}/endpoints"


@dataclass
class APIResponse:
    status: int
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)


def bearer_token(headers: dict[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _same_secret(given: str, expected: str) -> bool:
    given_hash = hashlib.sha256(given.encode()).digest()
    return secrets.compare_digest(given_hash, hashlib.sha256(expected.encode()).digest())


class ProfilesAPI:
    """Handles the `/v1/steering` paths for one `SteeringContext`."""

    def __init__(self, context: SteeringContext):
        self.context = context

    # ---- access -----------------------------------------------------------------------------

    def is_admin(self, headers: dict[str, str]) -> bool:
        token = bearer_token(headers)
        expected = self.context.admin_token
        return bool(token and expected and _same_secret(token, expected))

    def require_admin(self, headers: dict[str, str]) -> None:
        if self.context.admin_token is None:
            raise SteeringHTTPError(
                403, "the profile admin API is disabled: start the server with --admin-token "
                "or STEERMOE_ADMIN_TOKEN to enable it",
            )
        if bearer_token(headers) is None:
            raise SteeringHTTPError(401, "this operation needs the admin bearer token",
                                    headers={"www-authenticate": "Bearer"})
        if not self.is_admin(headers):
            raise SteeringHTTPError(401, "invalid admin token",
                                    headers={"www-authenticate": "Bearer"})

    def require_client(self, headers: dict[str, str], api_keys: list[str]) -> None:
        if not api_keys or self.is_admin(headers):
            return
        token = bearer_token(headers)
        if token is None or not any(_same_secret(token, key) for key in api_keys):
            raise SteeringHTTPError(401, "Unauthorized", headers={"www-authenticate": "Bearer"})

    # ---- dispatch ---------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes,
               api_keys: list[str]) -> APIResponse:
        if path == PROFILES:
            self._allow(method, "GET")
            self.require_client(headers, api_keys)
            return self.list_profiles(admin=self.is_admin(headers))
        if path == RELOAD:
            self._allow(method, "POST")
            self.require_admin(headers)
            return self.reload()
        if path == ENDPOINTS:
            self._allow(method, "GET")
            self.require_client(headers, api_keys)
            return self.endpoints()
        if path.startswith(f"{PROFILES}/") and "/" not in path[len(PROFILES) + 1:]:
            name = path[len(PROFILES) + 1:]
            self._allow(method, "GET", "PUT", "DELETE")
            if method == "GET":
                self.require_client(headers, api_keys)
                return self.get_profile(name, admin=self.is_admin(headers))
            self.require_admin(headers)
            if method == "PUT":
                return self.put_profile(name, body)
            return self.delete_profile(name)
        raise SteeringHTTPError(404, f"no such steering API path: {path}")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise SteeringHTTPError(405, f"method {method} is not allowed here; use "
                                    f"{' or '.join(allowed)}",
                                    headers={"allow": ", ".join(allowed)})

    # ---- reading ----------------------------------------------------------------------------

    def describe(self, profile: SteeringProfile) -> dict[str, Any]:
        policy = self.context.policy
        eps = self.context.served_eps()
        return {
            "id": profile.name,
            "object": "steering_profile",
            "description": profile.description,
            "tags": list(profile.tags),
            "model": profile.model.model_dump(),
            "digest": profile.digest(eps) if eps is not None else None,
            "client_selectable": policy.client_may_select(profile),
            "endpoints": policy.endpoints_of(profile.name),
        }

    def list_profiles(self, admin: bool) -> APIResponse:
        profiles, errors = self.context.scan_profiles()
        policy = self.context.policy
        visible = [p for p in profiles.values() if admin or policy.client_may_read(p)]
        payload: dict[str, Any] = {"object": "list", "data": [self.describe(p) for p in visible]}
        if admin:
            payload["errors"] = errors
        return APIResponse(200, payload)

    def get_profile(self, name: str, admin: bool) -> APIResponse:
        try:
            profile = self.context.profiles.get(name)
        except SteeringRequestError as exc:
            if exc.status == 500 and not admin:
                raise SteeringHTTPError(404, f"unknown steering profile {name!r}") from None
            raise SteeringHTTPError(exc.status, str(exc)) from None
        if not admin and not self.context.policy.client_may_read(profile):
            raise SteeringHTTPError(404, f"unknown steering profile {name!r}")
        data = self.describe(profile)
        data["profile"] = profile.model_dump(mode="json", exclude_none=True)
        return APIResponse(200, data)

    def endpoints(self) -> APIResponse:
        config = self.context.config
        data = [{"id": name, "object": "steering_endpoint", "profile": None, "locked": False}
                for name in config.base_names]
        data += [{"id": alias, "object": "steering_endpoint", "profile": profile, "locked": True}
                 for alias, profile in config.endpoints.items()]
        return APIResponse(200, {
            "object": "list",
            "data": data,
            "inline_steering": config.allow_inline_steering,
            "routing_capture": config.allow_routing_capture,
        })

    # ---- changing ---------------------------------------------------------------------------

    def _store(self):
        store = self.context.store
        if store is None:
            raise SteeringHTTPError(409, "the server has no profile directory (--profiles)")
        return store

    def put_profile(self, name: str, body: bytes) -> APIResponse:
        store = self._store()
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SteeringHTTPError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SteeringHTTPError(400, "the request body must be a steering profile object")
        data.setdefault("name", name)
        if data["name"] != name:
            raise SteeringHTTPError(
                400, f"the profile is named {data['name']!r} but the path names {name!r}",
                param="name",
            )
        try:
            profile = SteeringProfile.model_validate(data)
        except ValidationError as exc:
            problems = describe_validation_error(exc, "profile")
            raise SteeringHTTPError(400, f"invalid steering profile: {problems}") from None
        shape, reason = self.context.served_shape()
        if shape is None or reason is not None:
            raise SteeringHTTPError(409, reason or "the served model cannot be steered")
        try:
            profile.check_model(shape)
        except ProfileMismatchError as exc:
            raise SteeringHTTPError(409, str(exc)) from None
        created = not store.exists(name)
        store.put(profile, overwrite=True)
        self.context.scan_profiles()
        data = self.describe(profile)
        data["profile"] = profile.model_dump(mode="json", exclude_none=True)
        return APIResponse(201 if created else 200, data)

    def delete_profile(self, name: str) -> APIResponse:
        store = self._store()
        endpoints = self.context.policy.endpoints_of(name)
        if endpoints:
            raise SteeringHTTPError(
                409, f"profile {name!r} is locked to endpoint(s) {', '.join(endpoints)}; "
                "it cannot be deleted while the server runs",
            )
        try:
            store.delete(name)
        except ProfileNotFoundError:
            raise SteeringHTTPError(404, f"unknown steering profile {name!r}") from None
        except ValueError as exc:
            raise SteeringHTTPError(400, str(exc)) from None
        self.context.scan_profiles()
        return APIResponse(200, {"id": name, "object": "steering_profile", "deleted": True})

    def reload(self) -> APIResponse:
        profiles, errors = self.context.scan_profiles()
        return APIResponse(200, {
            "object": "steering_profile_scan",
            "loaded": sorted(profiles),
            "errors": errors,
        })
