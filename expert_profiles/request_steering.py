"""What a request asks for, resolved into the expert sets the engine applies.

Runs where requests enter vLLM (the front-end process). A request selects steering through
`SamplingParams.extra_args`:

- `{"steering_profile": NAME}`: a profile from the directory in `STEERMOE_PROFILE_DIR`;
- `{"steering": {"activate": {LAYER: [EXPERT, ...]}, "deactivate": {...}, "eps": 0.01}}`:
  inline expert sets;
- `{"steering_guard": NAME}`: the guard `PROFILE_DIR/guards/NAME.json` (`guard_spec`): the
  prompt runs unsteered, and the request's later tokens get the guard's profile if the guard
  fires on the prompt's routing;
- `{"steering_strength": 0.5}`: with any of those, scale the steering (0 to 1; graded
  steering, `vllm_patches.steering_math`);
- `{"capture_routing": True}`: record the request's routing (see `routing_capture`).

Through vLLM's OpenAI server these travel in `vllm_xargs`, which carries only strings and
numbers: there `steering` may be its JSON text and `capture_routing` may be 1 or 0.
`parse_steering_fields` reads these fields with one set of rules, for the steering layer (a request
body's top level and its `vllm_xargs`) and for the front end (`extra_args`) alike.
The keys the front end writes (`RESERVED_KEYS`) are dropped from what a client sends, and the
request keys are replaced by the resolved steering: the engine never sees a request key.

Under `steermoe serve` (`SERVER_KEY_ENV` set), the steering layer marks the steering it
authorised with an HMAC (`steering_mark`) and the front end refuses request keys without a
valid mark: whatever reaches vLLM past the steering layer cannot steer.

Resolution checks the profile (read through `ProfileStore.get_cached`) against the served model
and writes the resolved sets into `extra_args[RESOLVED_KEY]`, so the engine needs no profile
files and a profile edited later only affects requests that arrive later. No vLLM import here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from expert_profiles.composition import (
    CompositionConflictError,
    CompositionError,
    compose,
    composed_name,
    split_names,
)
from expert_profiles.directory import ProfileFileError
from expert_profiles.echo import clip
from expert_profiles.guard import (
    GuardFile,
    GuardFileError,
    GuardNotFoundError,
)
from expert_profiles.guard_spec import GuardSpec
from expert_profiles.model_shape import ModelShape
from expert_profiles.schema import (
    ExpertSteering,
    ProfileMismatchError,
    SteeringProfile,
    describe_validation_error,
    is_profile_name,
)
from expert_profiles.store import ProfileNotFoundError, ProfileStore

PROFILE_KEY = "steering_profile"
INLINE_KEY = "steering"
CAPTURE_KEY = "capture_routing"
STRENGTH_KEY = "steering_strength"
GUARD_KEY = "steering_guard"
RESOLVED_KEY = "steermoe"
CAPTURE_ID_KEY = "steermoe_capture_id"
GUARD_ID_KEY = "steermoe_guard_id"
AUTH_KEY = "steermoe_auth"
PROFILE_DIR_ENV = "STEERMOE_PROFILE_DIR"
SERVER_KEY_ENV = "STEERMOE_SERVER_KEY"
EPS_ENV = "STEERMOE_EPS"
DEFAULT_EPS = 0.01
# What a client may send, and what only this package writes.
REQUEST_KEYS = (PROFILE_KEY, INLINE_KEY, GUARD_KEY, STRENGTH_KEY, CAPTURE_KEY)
RESERVED_KEYS = (RESOLVED_KEY, CAPTURE_ID_KEY, GUARD_ID_KEY, AUTH_KEY)
MARKED_KEYS = (RESOLVED_KEY, *REQUEST_KEYS)


def default_eps() -> float:
    """The engine-wide eps (`STEERMOE_EPS`, default 0.01)."""
    value = float(os.environ.get(EPS_ENV, DEFAULT_EPS))
    if not 0 < value <= 100:
        raise ValueError(f"{EPS_ENV} must be in (0, 100], got {value}")
    return value


class SteeringRequestError(ValueError):
    """A request's steering cannot be served; `status` is the HTTP status that fits, `param`
    the request field at fault where one is (`parse_steering_fields` sets it)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_steering",
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


class UnknownProfileError(SteeringRequestError):
    def __init__(self, message: str):
        super().__init__(message, status=404, code="profile_not_found")


class UnknownGuardError(SteeringRequestError):
    def __init__(self, message: str):
        super().__init__(message, status=404, code="guard_not_found")


class ModelNotSteerableError(SteeringRequestError):
    def __init__(self, message: str):
        super().__init__(message, status=400, code="model_not_steerable")


@dataclass(frozen=True)
class ResolvedSteering:
    """Expert sets (and graded biases, strength) ready for the engine, with a digest that
    names them."""

    label: str
    digest: str
    activate: dict[int, list[int]]
    deactivate: dict[int, list[int]]
    eps: float
    bias: dict[int, dict[int, float]] = field(default_factory=dict)
    strength: float = 1.0
    # Set: this steering applies only once the guard fires on the prompt (`guard_spec`).
    guard: GuardSpec | None = None

    def to_extra_args(self) -> dict[str, Any]:
        data = {
            "label": self.label,
            "digest": self.digest,
            "activate": {str(k): v for k, v in self.activate.items()},
            "deactivate": {str(k): v for k, v in self.deactivate.items()},
            "eps": self.eps,
        }
        if self.bias:
            data["bias"] = {str(layer): {str(e): v for e, v in row.items()}
                            for layer, row in self.bias.items()}
        if self.strength != 1.0:
            data["strength"] = self.strength
        if self.guard is not None:
            data["guard"] = self.guard.to_wire()
        return data

    @classmethod
    def from_extra_args(cls, data: dict[str, Any]) -> ResolvedSteering:
        bias = data.get("bias") or {}
        return cls(
            label=str(data["label"]),
            digest=str(data["digest"]),
            activate={int(k): list(v) for k, v in data["activate"].items()},
            deactivate={int(k): list(v) for k, v in data["deactivate"].items()},
            eps=float(data["eps"]),
            bias={int(layer): {int(e): float(v) for e, v in row.items()}
                  for layer, row in bias.items()},
            strength=float(data.get("strength", 1.0)),
            guard=GuardSpec.from_wire(data["guard"]) if data.get("guard") is not None else None,
        )


def guarded(steering: ResolvedSteering, guard: GuardSpec) -> ResolvedSteering:
    """`steering` applied only when `guard` fires; the digest names both."""
    tag = f"{steering.digest}|guard:{guard.digest}".encode()
    return replace(steering, guard=guard, label=f"guard:{guard.name}",
                   digest=hashlib.sha256(tag).hexdigest()[:16])


def scaled(steering: ResolvedSteering, strength: float | None) -> ResolvedSteering:
    """`steering` at `strength` (None or 1: unchanged, same digest); the digest names both."""
    if strength is None or strength == 1.0:
        return steering
    tag = f"{steering.digest}@{float(strength)!r}".encode()
    return replace(steering, strength=float(strength),
                   digest=hashlib.sha256(tag).hexdigest()[:16])


@dataclass(frozen=True)
class RequestedSteering:
    """What a request asked for; `profile_given` is true even for an explicit null."""

    profile: str | None = None
    profile_given: bool = False
    inline: dict[str, Any] | None = None
    capture: bool = False
    strength: float | None = None
    guard: str | None = None

    @property
    def asks_for_steering(self) -> bool:
        return self.profile is not None or self.inline is not None or self.guard is not None

    @property
    def mentions_steering(self) -> bool:
        """Whether the request said anything about steering (even `steering_profile: null`)."""
        return self.profile_given or self.inline is not None or self.guard is not None


def parse_steering_fields(fields: Mapping[str, Any]) -> RequestedSteering:
    """The steering that one mapping of request fields asks for: a request body's fields or
    `SamplingParams.extra_args`; other keys are ignored.

    - `steering_profile`: a profile name, several as `A+B` or a list (`composition`; read as
      the sorted names joined by '+'), or null for none (noted in `profile_given`: on a locked
      endpoint or a Responses continuation, null asks for no steering);
    - `steering`: an object, or its JSON text (the `vllm_xargs` form); null for none;
    - `steering_guard`: a guard name (not with `steering_profile` or `steering`);
    - `steering_strength`: a number in [0, 1], only with one of those;
    - `capture_routing`: true or false, or 1 or 0 (the `vllm_xargs` form);
    - not both `steering_profile` and `steering`.

    Raises SteeringRequestError (400) whose `param` names the field at fault.
    """
    profile = fields.get(PROFILE_KEY)
    if profile is not None:
        if not isinstance(profile, (str, list)):
            raise SteeringRequestError(
                f"{PROFILE_KEY!r} must be a string (a profile name, or names joined by '+') "
                "or a list of profile names",
                param=PROFILE_KEY)
        try:
            profile = composed_name(split_names(profile))
        except CompositionError as exc:
            raise SteeringRequestError(str(exc), param=PROFILE_KEY) from None
    requested = RequestedSteering(
        profile=profile,
        profile_given=PROFILE_KEY in fields,
        inline=_inline_field(fields.get(INLINE_KEY)),
        capture=_capture_field(fields[CAPTURE_KEY]) if CAPTURE_KEY in fields else False,
        strength=_strength_field(fields.get(STRENGTH_KEY)),
        guard=_guard_field(fields.get(GUARD_KEY)),
    )
    if requested.profile is not None and requested.inline is not None:
        raise SteeringRequestError(
            f"give either {PROFILE_KEY!r} or {INLINE_KEY!r}, not both", param=INLINE_KEY
        )
    if requested.guard is not None and (requested.profile is not None
                                        or requested.inline is not None):
        raise SteeringRequestError(
            f"{GUARD_KEY!r} steers with its own profile: give it without {PROFILE_KEY!r} or "
            f"{INLINE_KEY!r}", param=GUARD_KEY)
    if requested.strength is not None and not requested.asks_for_steering:
        raise SteeringRequestError(
            f"{STRENGTH_KEY!r} scales steering: give it with {PROFILE_KEY!r}, {INLINE_KEY!r} "
            f"or {GUARD_KEY!r}",
            param=STRENGTH_KEY)
    return requested


def _guard_field(value: Any) -> str | None:
    if value is None:
        return None
    if not is_profile_name(value):
        raise SteeringRequestError(f"{GUARD_KEY!r} must be a guard name", param=GUARD_KEY)
    return value


def _strength_field(value: Any) -> float | None:
    if value is None:
        return None
    # The range first: a huge int compares exactly, while float() would overflow.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        number = float(value)
        if math.isfinite(number):
            return number
    raise SteeringRequestError(f"{STRENGTH_KEY!r} must be a number from 0 to 1",
                               param=STRENGTH_KEY)


def _inline_field(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # also too deep, or a number too long
            value = None
    if not isinstance(value, dict):
        raise SteeringRequestError(
            f"{INLINE_KEY!r} must be an object (or its JSON text)", param=INLINE_KEY
        )
    return value


def _capture_field(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise SteeringRequestError(f"{CAPTURE_KEY!r} must be true or false", param=CAPTURE_KEY)


def inline_to_wire(inline: dict[str, Any]) -> str:
    """Inline expert sets as the JSON text `vllm_xargs` can carry (read back by
    `parse_steering_fields`)."""
    return json.dumps(inline, separators=(",", ":"), sort_keys=True)


class ProfileCache:
    """The profiles of one directory as requests name them: `ProfileStore.get_cached` (a file
    is parsed again only when it changed), its errors as SteeringRequestError: an invalid name
    400, an unknown profile 404, a file that cannot be used 500."""

    def __init__(self, directory: str | Path | None):
        self.store = ProfileStore(directory) if directory else None

    @property
    def directory(self) -> Path | None:
        return None if self.store is None else self.store.directory

    def get(self, name: Any) -> SteeringProfile:
        """The profile called `name`; raises UnknownProfileError or SteeringRequestError."""
        if not is_profile_name(name):
            raise SteeringRequestError(f"invalid steering profile name '{clip(name)}'")
        if self.store is None:
            raise UnknownProfileError(
                f"unknown steering profile {name!r}: no profile directory is configured "
                f"(set {PROFILE_DIR_ENV})"
            )
        try:
            return self.store.get_cached(name)
        except ProfileNotFoundError:
            raise UnknownProfileError(f"unknown steering profile {name!r}") from None
        except ProfileFileError as exc:
            raise SteeringRequestError(
                f"steering profile {name!r} cannot be used: {exc}", status=500,
                code="profile_invalid",
            ) from None


    def get_guard(self, name: Any) -> GuardFile:
        """The guard `name` (`PROFILE_DIR/guards/NAME.json`); 400 for an invalid name, 404 for
        an unknown guard, 500 for a file that cannot be used. Re-read when the file changed."""
        if not is_profile_name(name):
            raise SteeringRequestError(f"invalid guard name '{clip(name)}'", param=GUARD_KEY)
        if self.store is None:
            raise UnknownGuardError(f"unknown guard {name!r}: no profile directory is "
                                    f"configured (set {PROFILE_DIR_ENV})")
        try:
            return self.store.get_guard_cached(name)
        except GuardNotFoundError:
            raise UnknownGuardError(f"unknown guard {name!r}") from None
        except GuardFileError as exc:
            raise SteeringRequestError(f"{exc}", status=500, code="guard_invalid") from None

    def get_all(self, names: str) -> tuple[SteeringProfile, ...]:
        """The profiles of a profile name or a composition `A+B` (`get` for each)."""
        try:
            return tuple(self.get(name) for name in split_names(names))
        except CompositionError as exc:
            raise SteeringRequestError(str(exc)) from None


def resolve_request(
    extra_args: Mapping[str, Any] | None,
    shape: ModelShape | None,
    profiles: ProfileCache,
    eps: float,
    steerable_reason: str | None = None,
) -> ResolvedSteering | None:
    """Resolve a request's steering; None if it asks for none. Raises SteeringRequestError."""
    requested = parse_steering_fields(extra_args or {})
    if not requested.asks_for_steering:
        return None
    shape = require_steerable(shape, steerable_reason)
    if requested.guard is not None:
        resolved = resolve_guard(profiles, requested.guard, shape, eps)
    elif requested.profile is not None:
        resolved = resolve_profiles(profiles.get_all(requested.profile), shape, eps)
    else:
        assert requested.inline is not None
        resolved = resolve_inline(requested.inline, shape, eps)
    return scaled(resolved, requested.strength)


def require_steerable(shape: ModelShape | None, reason: str | None) -> ModelShape:
    """The served shape; ModelNotSteerableError if the served model cannot be steered."""
    if reason is not None:
        raise ModelNotSteerableError(reason)
    if shape is None:
        raise ModelNotSteerableError("the served model has no Mixture-of-Experts layers to steer")
    return shape


def resolve_profile(profile: Any, shape: ModelShape, eps: float) -> ResolvedSteering:
    """The expert sets of a loaded profile, checked against the served shape.

    Takes the profile object (not its name) so that whoever checked it (the policy) and what
    runs are the same version of the file."""
    try:
        profile.check_model(shape)
    except ProfileMismatchError as exc:
        raise SteeringRequestError(str(exc), status=409, code="profile_model_mismatch") from None
    return _resolved(profile, f"profile:{profile.name}", eps)


def resolve_profiles(profiles: Sequence[SteeringProfile], shape: ModelShape,
                     eps: float) -> ResolvedSteering:
    """One profile (`resolve_profile`) or a composition of several (`composition`), checked
    against the served shape: 409 `profile_model_mismatch` if a profile is for another model,
    409 `steering_conflict` if the profiles disagree or their union does not fit the model."""
    if len(profiles) == 1:
        return resolve_profile(profiles[0], shape, eps)
    for profile in profiles:
        try:
            profile.check_model(shape)
        except ProfileMismatchError as exc:
            raise SteeringRequestError(f"steering profile {profile.name!r}: {exc}", status=409,
                                       code="profile_model_mismatch") from None
    name = composed_name([profile.name for profile in profiles])
    try:
        sets = compose(profiles, eps)
        sets.check_shape(shape)
    except (CompositionConflictError, ProfileMismatchError) as exc:
        raise SteeringRequestError(f"steering profiles {name!r} cannot be composed: {exc}",
                                   status=409, code="steering_conflict") from None
    return _resolved(sets, f"profile:{name}", eps)


def resolve_guard(profiles: ProfileCache, name: str, shape: ModelShape,
                  eps: float) -> ResolvedSteering:
    """The guard `name` with the steering of its profile, checked against the served shape:
    409 `profile_model_mismatch` if the guard or its profile is for another model."""
    guard = profiles.get_guard(name)
    return resolve_guard_file(guard, profiles.get(guard.profile), shape, eps)


def resolve_guard_file(guard: GuardFile, profile: SteeringProfile, shape: ModelShape,
                       eps: float) -> ResolvedSteering:
    """A loaded guard with its loaded profile (`resolve_guard`, for callers that read them
    once already), checked against the served shape."""
    try:
        guard.check_model(shape)
    except ProfileMismatchError as exc:
        raise SteeringRequestError(str(exc), status=409, code="profile_model_mismatch") from None
    return guarded(resolve_profile(profile, shape, eps), GuardSpec.from_guard(guard))


def resolve_inline(inline: dict[str, Any], shape: ModelShape, eps: float) -> ResolvedSteering:
    """Inline expert sets, validated and checked against the served shape."""
    try:
        sets = ExpertSteering.model_validate(inline)
    except ValidationError as exc:
        problems = describe_validation_error(exc, INLINE_KEY)
        raise SteeringRequestError(f"invalid inline steering: {problems}") from None
    try:
        sets.check_shape(shape)
    except ProfileMismatchError as exc:
        raise SteeringRequestError(f"invalid inline steering: {exc}") from None
    return _resolved(sets, "inline", eps)


def _resolved(sets: ExpertSteering, label: str, eps: float) -> ResolvedSteering:
    return ResolvedSteering(
        label=label,
        digest=sets.digest(eps),
        activate=dict(sets.activate),
        deactivate=dict(sets.deactivate),
        eps=sets.eps if sets.eps is not None else eps,
        bias={layer: dict(row) for layer, row in sets.bias.items()},
    )


def resolved_to_wire(steering: ResolvedSteering) -> str:
    """Resolved steering as the JSON text `vllm_xargs` can carry (strings and numbers only)."""
    return json.dumps(steering.to_extra_args(), separators=(",", ":"), sort_keys=True)


def resolved_from_wire(text: Any) -> ResolvedSteering:
    """The inverse of `resolved_to_wire`; SteeringRequestError for anything else."""
    try:
        data = json.loads(text) if isinstance(text, str) else None
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return ResolvedSteering.from_extra_args(data)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError):
        raise SteeringRequestError("malformed resolved steering") from None


def wants_capture(extra_args: Mapping[str, Any] | None) -> bool:
    """Whether a request asks for its routing (`parse_steering_fields`'s rules)."""
    return parse_steering_fields(extra_args or {}).capture


def salted(cache_salt: str | None, digest: str | None) -> str | None:
    """The prefix-cache salt vLLM gets: KV blocks are shared only by equal steering.

    Every salt a client gives is hashed together with the steering digest (None: unsteered),
    so no client salt can equal the salt of steering it did not get, even knowing the digest.
    An unsteered request without a salt keeps none (it shares blocks with stock requests).
    """
    if digest is None and cache_salt is None:
        return None
    text = json.dumps([cache_salt, digest], separators=(",", ":"))
    return "steermoe:" + hashlib.sha256(text.encode()).hexdigest()


def steering_mark(key: bytes, extra_args: dict[str, Any]) -> str:
    """The HMAC the steering layer attaches to the steering it authorised (the resolved expert
    sets it sends, and any request key)."""
    fields = [extra_args.get(name) for name in MARKED_KEYS]
    text = json.dumps(fields, separators=(",", ":"), sort_keys=True, default=str)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def server_key() -> bytes | None:
    """The per-server secret that marks authorised steering (None outside `steermoe serve`)."""
    value = os.environ.get(SERVER_KEY_ENV, "")
    return value.encode() if value else None


def check_mark(key: bytes, extra_args: dict[str, Any]) -> None:
    """Refuse request keys that the steering layer of this server did not authorise."""
    given = extra_args.get(AUTH_KEY)
    if not isinstance(given, str) or not hmac.compare_digest(given, steering_mark(key, extra_args)):
        raise SteeringRequestError(
            "steering fields are accepted only through the steering layer of this server",
            status=403, code="steering_not_authorised",
        )
