"""`/v1/steering/...`: profiles for clients to read, and for an admin to change.

    GET    /v1/steering/profiles           profiles a client may use (all, with the admin token)
    GET    /v1/steering/profiles/{name}    one profile, with its expert sets
    PUT    /v1/steering/profiles/{name}    create or replace (admin); checked against the model
    DELETE /v1/steering/profiles/{name}    delete (admin)
    POST   /v1/steering/profiles:reload    re-validate the directory (admin)
    GET    /v1/steering/endpoints          served names, locked profiles and what is allowed

Every change goes through `ProfileStore` (atomic writes); requests see it on their next lookup.

Routing (`route`): the table above is a Starlette `Router` (`ROUTER`), one `Route` per path and
method, named by its metric operation, with the handler as endpoint. A path no route matches is
404; a `{name}` that is not a profile name (`is_profile_name`: it rules out `/`, `..`, NUL,
non-ASCII and names over 64 characters) is 400 before anything else is looked at; another
method on a known path is 405 with an `Allow` header. `{name}` takes the rest of the path
(slashes and newlines too), so that such a name is refused as a name. Paths and methods are
matched exactly (HTTP methods are case-sensitive; Starlette would also match a path with one
more trailing newline, and answer HEAD where GET is served). HEAD and OPTIONS are not served
(405, `Allow` lists only the methods above): nothing here needs them, and answering fewer
methods leaves less to probe. The router is only matched, never run as an ASGI app: the
steering layer reads the body (under its size limit) and answers every error in OpenAI's shape.

Everything a client sent that appears in an answer (a method, a path, a name) goes through
`server.errors.clip`; no answer names a filesystem path (store errors are logged instead).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from starlette.routing import Match, Route, Router

from expert_profiles.request_steering import SteeringRequestError
from expert_profiles.schema import (
    ProfileMismatchError,
    SteeringProfile,
    describe_validation_error,
    is_profile_name,
)
from expert_profiles.store import ProfileNotFoundError
from server.config import locked_card
from server.context import SteeringContext
from server.errors import SteeringHTTPError, clip
from server.metrics import ADMIN_OPERATIONS
from server.request_body import too_deep

logger = logging.getLogger("steermoe.server")

PREFIX = "/v1/steering"
PROFILES = f"{PREFIX}/profiles"
RELOAD = f"{PROFILES}:reload"
ENDPOINTS = f"{PREFIX}/endpoints"

# Operation labels (`operation_of`): exactly `server.metrics.ADMIN_OPERATIONS`.
OP_LIST, OP_GET, OP_PUT, OP_DELETE = "list", "get", "put", "delete"
OP_RELOAD, OP_ENDPOINTS, OP_OTHER = "reload", "endpoints", "other"
READ_OPERATIONS = frozenset({OP_LIST, OP_GET, OP_ENDPOINTS})  # clients (API key if set)
WRITE_OPERATIONS = frozenset({OP_PUT, OP_DELETE, OP_RELOAD})  # admin token
if READ_OPERATIONS | WRITE_OPERATIONS | {OP_OTHER} != set(ADMIN_OPERATIONS):
    raise ImportError("server.profiles_api operations differ from metrics.ADMIN_OPERATIONS")

# A PUT body nests at most this deep (a profile needs 3; `source` may add up to 32).
MAX_BODY_DEPTH = 40
# Longest composite detail (validation problems, model mismatches) put in an answer, so that
# every answer stays under 300 characters.
MAX_DETAIL = 240

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s'\",;()<>]+")


@dataclass
class APIResponse:
    status: int
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AdminRequest:
    """What a handler gets: the profile name of the path (if it has one), headers and body."""

    name: str | None
    headers: dict[str, str]
    body: bytes

    @property
    def profile_name(self) -> str:
        """The `{name}` of the path (for the routes that have one)."""
        if self.name is None:
            raise TypeError("a route without {name} reached a profile handler")
        return self.name


def bearer_token(headers: dict[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _same_secret(given: str, expected: str) -> bool:
    given_hash = hashlib.sha256(given.encode()).digest()
    return secrets.compare_digest(given_hash, hashlib.sha256(expected.encode()).digest())


def quoted(value: object) -> str:
    """`'value'`, clipped: client input as it may appear in a message."""
    return f"'{clip(value)}'"


def without_paths(text: str) -> str:
    """`text` with every absolute filesystem path cut to its last part (`/a/b/x.json` ->
    `x.json`), for messages that may name files."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group().rstrip("/").rsplit("/", 1)[-1] or "/", text)


def parse_json_body(body: bytes) -> Any:
    """A PUT body as JSON; SteeringHTTPError 400 for anything that is not plain JSON (bad
    syntax or encoding, NaN/Infinity, integers too long to convert, nesting too deep)."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(body, parse_constant=refuse_constant)
    except RecursionError:
        raise _not_json("nested too deeply") from None
    except json.JSONDecodeError as exc:  # says where, never echoes the input
        raise _not_json(clip(str(exc))) from None
    except UnicodeDecodeError:
        raise _not_json("not UTF-8 text") from None
    except ValueError as exc:  # an integer over Python's digit limit, NaN or Infinity
        logger.debug("steermoe: PUT body refused: %s", exc)
        reason = "a number has too many digits" if "digits" in str(exc) else clip(str(exc))
        raise _not_json(reason) from None
    if too_deep(data, MAX_BODY_DEPTH):
        raise SteeringHTTPError(
            400, f"the request body nests more than {MAX_BODY_DEPTH} levels deep"
        )
    return data


def _not_json(reason: str) -> SteeringHTTPError:
    return SteeringHTTPError(400, f"the request body is not valid JSON: {reason}")


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
                403, "the profile admin API is disabled: start the server with "
                "--admin-token-file or STEERMOE_ADMIN_TOKEN to enable it",
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

    # ---- routing ----------------------------------------------------------------------------

    @classmethod
    def route(cls, method: str, path: str) -> tuple[str, str | None]:
        """(operation, profile name or None) of a request, or SteeringHTTPError: 404 for an
        unknown path, 400 for a path whose name is not a profile name, 405 (with `Allow`) for
        another method. Needs neither the headers nor the body, so a caller may use it before
        reading the body."""
        found, name = _resolve(method, path)
        return found.name, name

    @classmethod
    def operation_of(cls, method: str, path: str) -> str:
        """The metric label of a request: one of `server.metrics.ADMIN_OPERATIONS` ("list",
        "get", "put", "delete", "reload", "endpoints", or "other" for anything `route`
        refuses), whatever method and path a client sends."""
        try:
            return cls.route(method, path)[0]
        except SteeringHTTPError:
            return OP_OTHER

    # ---- dispatch ---------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes,
               api_keys: list[str]) -> APIResponse:
        """Answer one request; raises SteeringHTTPError for every refusal."""
        found, name = _resolve(method, path)
        if found.name in WRITE_OPERATIONS:
            self.require_admin(headers)
        else:
            self.require_client(headers, api_keys)
        return found.endpoint(self, AdminRequest(name, headers, body))

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

    def _scan(self) -> tuple[dict[str, SteeringProfile], dict[str, str]]:
        """The directory scan, its errors keyed and worded without filesystem paths."""
        profiles, errors = self.context.scan_profiles()
        return profiles, {without_paths(key): without_paths(message)
                          for key, message in errors.items()}

    def list_profiles(self, request: AdminRequest) -> APIResponse:
        admin = self.is_admin(request.headers)
        profiles, errors = self._scan()
        policy = self.context.policy
        visible = [p for p in profiles.values() if admin or policy.client_may_read(p)]
        payload: dict[str, Any] = {"object": "list", "data": [self.describe(p) for p in visible]}
        if admin:
            payload["errors"] = errors
        return APIResponse(200, payload)

    def get_profile(self, request: AdminRequest) -> APIResponse:
        name, admin = request.profile_name, self.is_admin(request.headers)
        try:
            profile = self.context.profiles.get(name)
        except SteeringRequestError as exc:
            if exc.status == 500 and not admin:
                raise SteeringHTTPError(404, f"unknown steering profile {quoted(name)}") \
                    from None
            raise SteeringHTTPError(exc.status, clip(without_paths(str(exc)), MAX_DETAIL)) \
                from None
        if not admin and not self.context.policy.client_may_read(profile):
            raise SteeringHTTPError(404, f"unknown steering profile {quoted(name)}")
        data = self.describe(profile)
        data["profile"] = profile.model_dump(mode="json", exclude_none=True)
        return APIResponse(200, data)

    def endpoints(self, request: AdminRequest) -> APIResponse:
        config = self.context.config
        data = [{"id": name, "object": "steering_endpoint", "profile": None, "locked": False}
                for name in config.base_names]
        data += [{"id": alias, "object": "steering_endpoint", **locked_card(profile),
                  "client_profiles": list(config.endpoint_client_profiles.get(alias, ()))}
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

    def put_profile(self, request: AdminRequest) -> APIResponse:
        name, body = request.profile_name, request.body
        if not is_profile_name(name):
            raise SteeringHTTPError(400, f"invalid steering profile name {quoted(name)}")
        store = self._store()
        data = parse_json_body(body)
        if not isinstance(data, dict):
            raise SteeringHTTPError(400, "the request body must be a steering profile object")
        data.setdefault("name", name)
        if data["name"] != name:
            raise SteeringHTTPError(
                400, f"the profile is named {quoted(data['name'])} but the path names "
                f"{quoted(name)}", param="name",
            )
        try:
            profile = SteeringProfile.model_validate(data)
        except ValidationError as exc:
            problems = clip(describe_validation_error(exc, "profile"), MAX_DETAIL)
            raise SteeringHTTPError(400, f"invalid steering profile: {problems}") from None
        except RecursionError:
            raise SteeringHTTPError(400, "invalid steering profile: nested too deeply") from None
        shape, reason = self.context.served_shape()
        if shape is None or reason is not None:
            raise SteeringHTTPError(409, reason or "the served model cannot be steered")
        try:
            profile.check_model(shape)
        except ProfileMismatchError as exc:
            raise SteeringHTTPError(409, clip(str(exc), MAX_DETAIL)) from None
        try:
            created = not store.exists(name)
            store.put(profile, overwrite=True)
        except OSError as exc:
            logger.error("steermoe: cannot write profile %s: %s", name, exc)
            raise SteeringHTTPError(500, f"cannot write profile {quoted(name)}") from None
        self.context.scan_profiles()
        data = self.describe(profile)
        data["profile"] = profile.model_dump(mode="json", exclude_none=True)
        return APIResponse(201 if created else 200, data)

    def delete_profile(self, request: AdminRequest) -> APIResponse:
        name = request.profile_name
        if not is_profile_name(name):
            raise SteeringHTTPError(400, f"invalid steering profile name {quoted(name)}")
        store = self._store()
        endpoints = self.context.policy.endpoints_of(name)
        if endpoints:
            raise SteeringHTTPError(
                409, f"profile {quoted(name)} is locked to endpoint(s) {', '.join(endpoints)}; "
                "it cannot be deleted while the server runs",
            )
        try:
            store.delete(name)
        except ProfileNotFoundError:
            raise SteeringHTTPError(404, f"unknown steering profile {quoted(name)}") from None
        except OSError as exc:
            logger.error("steermoe: cannot delete profile %s: %s", name, exc)
            raise SteeringHTTPError(500, f"cannot delete profile {quoted(name)}") from None
        except ValueError:
            raise SteeringHTTPError(400, f"invalid steering profile name {quoted(name)}") \
                from None
        self.context.scan_profiles()
        return APIResponse(200, {"id": name, "object": "steering_profile", "deleted": True})

    def reload(self, request: AdminRequest) -> APIResponse:
        profiles, errors = self._scan()
        return APIResponse(200, {
            "object": "steering_profile_scan",
            "loaded": sorted(profiles),
            "errors": errors,
        })


# ---- the routes -----------------------------------------------------------------------------


class AdminRoute(Route):
    """A Starlette `Route` for exactly one method, matched on the whole path.

    Starlette anchors a route's pattern with `$`, which also matches before a final newline,
    and serves HEAD wherever GET is; neither holds here."""

    def __init__(self, path: str, method: str, handler: Callable[..., APIResponse],
                 operation: str):
        super().__init__(path, handler, methods=[method], name=operation)
        self.methods = {method}
        self.path_regex = re.compile(self.path_regex.pattern.removesuffix("$") + r"\Z",
                                     re.DOTALL)


# `{name:path}`: the rest of the path, whatever it holds (checked by `_resolve`).
_PROFILE = f"{PROFILES}/{{name:path}}"
ROUTER = Router(routes=[
    AdminRoute(PROFILES, "GET", ProfilesAPI.list_profiles, OP_LIST),
    AdminRoute(RELOAD, "POST", ProfilesAPI.reload, OP_RELOAD),
    AdminRoute(ENDPOINTS, "GET", ProfilesAPI.endpoints, OP_ENDPOINTS),
    AdminRoute(_PROFILE, "GET", ProfilesAPI.get_profile, OP_GET),
    AdminRoute(_PROFILE, "PUT", ProfilesAPI.put_profile, OP_PUT),
    AdminRoute(_PROFILE, "DELETE", ProfilesAPI.delete_profile, OP_DELETE),
])
if {route.name for route in ROUTER.routes} != READ_OPERATIONS | WRITE_OPERATIONS:
    raise ImportError("server.profiles_api routes differ from its operations")


def _resolve(method: str, path: str) -> tuple[AdminRoute, str | None]:
    """The route of a request and the profile name in its path, or SteeringHTTPError (404,
    then 400 for a bad name, then 405 with `Allow`; see `ProfilesAPI.route`)."""
    scope = {"type": "http", "method": method, "path": path}
    allowed: list[str] = []
    found, params = None, None
    for candidate in ROUTER.routes:
        match, child = candidate.matches(scope)
        if match is Match.NONE:
            continue
        params = child["path_params"]
        if match is Match.FULL:
            found = candidate
            break
        allowed += candidate.methods
    if params is None:
        raise SteeringHTTPError(404, f"no such steering API path: {quoted(path)}")
    name = params.get("name")
    if name is not None and not is_profile_name(name):
        raise SteeringHTTPError(
            400, f"invalid steering profile name {quoted(name)}: use 1-64 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit",
        )
    if found is None:
        raise SteeringHTTPError(
            405, f"method {quoted(method)} is not allowed here; use {' or '.join(allowed)}",
            headers={"allow": ", ".join(allowed)},
        )
    return found, name
