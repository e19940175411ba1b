"""What the operator chose for the steering server, passed to the API server as JSON in the env.

`steermoe serve` writes the config to `STEERMOE_SERVER_CONFIG`; the middleware reads it in the
API server process (or processes). The admin token travels separately in
`STEERMOE_ADMIN_TOKEN` so the config can be logged; the operator gives it in that variable or
in a file (`--admin-token-file`, read by `read_admin_token_file`), never on the command line,
where every user of the machine could read it in the process list. Without
`STEERMOE_SERVER_CONFIG` (plain `vllm serve --middleware ...`), defaults apply and the profile
directory is `STEERMOE_PROFILE_DIR`.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import asdict, dataclass, field
from typing import Any

from expert_profiles.composition import CompositionError, composed_name, split_names
from expert_profiles.request_steering import PROFILE_DIR_ENV
from expert_profiles.schema import is_profile_name

logger = logging.getLogger("steermoe.serve")

CONFIG_ENV = "STEERMOE_SERVER_CONFIG"
ADMIN_TOKEN_ENV = "STEERMOE_ADMIN_TOKEN"
MAX_ADMIN_TOKEN_FILE_BYTES = 4096
LOWERS_SAFETY_TAG = "lowers-safety"
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
NO_PROFILES = "none"


class ConfigError(ValueError):
    """An operator option that cannot be served."""


@dataclass(frozen=True)
class ServerConfig:
    """What the steering layer runs with: the steering options (each described once, in
    `server.serve_options.SteeringOptions`) checked and resolved, plus the served names of the
    unlocked model. Everything but the admin token."""

    profiles_dir: str | None = None
    # locked served name -> its profile, or composition `A+B` (sorted names)
    endpoints: dict[str, str] = field(default_factory=dict)
    # locked served name -> the profiles a client may add there (--endpoint-client-profiles)
    endpoint_client_profiles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The served names of the unlocked model (vLLM's --served-model-name, or the model path).
    base_names: tuple[str, ...] = ()
    client_profiles: tuple[str, ...] | None = None  # None: the default (--client-profiles)
    allow_inline_steering: bool = False
    allow_routing_capture: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    audit_log: str | None = None

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0:
            raise ConfigError("--max-request-bytes must be positive")
        for alias, profile in self.endpoints.items():
            check_profile_names(profile, f"--endpoint {alias}")
            if alias in self.base_names:
                raise ConfigError(
                    f"--endpoint {alias}: the name is already a served name of the unlocked model"
                )
        for name in self.client_profiles or ():
            check_profile_name(name, "--client-profiles")
        for alias, names in self.endpoint_client_profiles.items():
            option = f"--endpoint-client-profiles {alias}"
            if alias not in self.endpoints:
                raise ConfigError(f"{option}: {alias!r} is not a locked endpoint (--endpoint)")
            if endpoint_guard(self.endpoints[alias]) is not None:
                raise ConfigError(f"{option}: a guarded endpoint runs its guard's profile only")
            for name in names:
                check_profile_name(name, option)
            locked = set(split_names(self.endpoints[alias]))
            if locked & set(names):
                raise ConfigError(f"{option}: {sorted(locked & set(names))[0]!r} is already "
                                  "locked on the endpoint")

    @property
    def served_names(self) -> tuple[str, ...]:
        return (*self.base_names, *self.endpoints)

    @property
    def default_name(self) -> str | None:
        return self.base_names[0] if self.base_names else None

    def to_json(self) -> str:
        data = asdict(self)
        data["base_names"] = list(self.base_names)
        data["endpoint_client_profiles"] = {
            alias: list(names) for alias, names in self.endpoint_client_profiles.items()}
        if self.client_profiles is not None:
            data["client_profiles"] = list(self.client_profiles)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        data: dict[str, Any] = json.loads(text)
        data["base_names"] = tuple(data.get("base_names") or ())
        data["endpoint_client_profiles"] = {
            alias: tuple(names)
            for alias, names in (data.get("endpoint_client_profiles") or {}).items()}
        if data.get("client_profiles") is not None:
            data["client_profiles"] = tuple(data["client_profiles"])
        return cls(**data)

    @classmethod
    def from_env(cls) -> ServerConfig:
        """The config `steermoe serve` passed, or defaults around `STEERMOE_PROFILE_DIR`."""
        text = os.environ.get(CONFIG_ENV)
        if text:
            return cls.from_json(text)
        return cls(profiles_dir=os.environ.get(PROFILE_DIR_ENV) or None)


def check_profile_name(name: str, option: str) -> None:
    if not is_profile_name(name):
        raise ConfigError(f"{option}: {name!r} is not a valid profile name")


GUARD_PREFIX = "guard:"


def endpoint_guard(locked: str) -> str | None:
    """The guard of a locked endpoint's value (`guard:NAME`), None for a profile."""
    return locked.removeprefix(GUARD_PREFIX) if locked.startswith(GUARD_PREFIX) else None


def locked_steering(locked: str) -> str:
    """A locked endpoint's steering in words: `steering profile 'A+B'` or `guard 'G'`."""
    guard = endpoint_guard(locked)
    return f"guard '{guard}'" if guard is not None else f"steering profile '{locked}'"


def locked_card(locked: str) -> dict[str, Any]:
    """How a locked endpoint describes its steering: `{"locked", "profile"}`, and `"guard"`
    (with no profile of its own) for a guarded one."""
    guard = endpoint_guard(locked)
    if guard is not None:
        return {"locked": True, "profile": None, "guard": guard}
    return {"locked": True, "profile": locked}


def check_profile_names(names: str, option: str) -> str:
    """A profile name or composition `A+B` as its canonical name (sorted names), or a guard
    `guard:NAME` as it is."""
    guard = endpoint_guard(names)
    if guard is not None:
        if not is_profile_name(guard):
            raise ConfigError(f"{option}: {guard!r} is not a valid guard name")
        return names
    try:
        return composed_name(split_names(names))
    except CompositionError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def parse_endpoint(text: str) -> tuple[str, str]:
    """`NAME=PROFILE`, `NAME=A+B` or `NAME=guard:GUARD` -> (served name, profile, canonical
    composition or guard)."""
    alias, sep, profile = text.partition("=")
    alias, profile = alias.strip(), profile.strip()
    if not sep or not alias or not profile:
        raise ConfigError(f"--endpoint {text!r}: expected NAME=PROFILE")
    if any(ch.isspace() for ch in alias):
        raise ConfigError(f"--endpoint {text!r}: the served name must not contain spaces")
    return alias, check_profile_names(profile, f"--endpoint {alias}")


def parse_endpoints(values: list[str] | None) -> dict[str, str]:
    endpoints: dict[str, str] = {}
    for text in values or ():
        alias, profile = parse_endpoint(text)
        if alias in endpoints:
            raise ConfigError(f"--endpoint {alias} is given twice")
        endpoints[alias] = profile
    return endpoints


def parse_endpoint_client_profiles(values: list[str] | None) -> dict[str, tuple[str, ...]]:
    """`NAME=A,B` items -> {served name: (A, B)}."""
    out: dict[str, tuple[str, ...]] = {}
    for text in values or ():
        alias, sep, names = text.partition("=")
        alias = alias.strip()
        if not sep or not alias:
            raise ConfigError(f"--endpoint-client-profiles {text!r}: expected NAME=A,B")
        if alias in out:
            raise ConfigError(f"--endpoint-client-profiles {alias} is given twice")
        out[alias] = profile_list(names, f"--endpoint-client-profiles {alias}")
    return out


def parse_client_profiles(text: str | None) -> tuple[str, ...] | None:
    """`a,b` -> ("a", "b"); `none` -> (); unset -> None (the default policy)."""
    if text is None:
        return None
    if text.strip().lower() in (NO_PROFILES, ""):
        return ()
    return profile_list(text, "--client-profiles")


def profile_list(text: str, option: str) -> tuple[str, ...]:
    """`a, b,a` -> ("a", "b"): comma-separated profile names, each checked, repeats dropped."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    for name in names:
        check_profile_name(name, option)
    return names


def admin_token_from_env() -> str | None:
    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    return token or None


def read_admin_token_file(path: str | os.PathLike[str]) -> str:
    """The admin token held in the file `path` (surrounding whitespace stripped).

    ConfigError for a file that cannot be read, is not a regular file (a symlink to a regular
    file is followed, as with mounted secrets; a FIFO or device is refused without blocking),
    is larger than MAX_ADMIN_TOKEN_FILE_BYTES, is not UTF-8 or holds an empty token or one with
    characters other than printable ASCII. Warns when group or others may read the file.
    The error messages never contain the file's content.
    """
    where = f"--admin-token-file {os.fspath(path)}"
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot open: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where}: not a regular file")
        if info.st_size > MAX_ADMIN_TOKEN_FILE_BYTES:
            raise ConfigError(f"{where}: larger than {MAX_ADMIN_TOKEN_FILE_BYTES} bytes; "
                              "it should hold only the token")
        if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
            logger.warning("steermoe: %s is readable by group or others (mode %o); "
                           "consider chmod 600", where, stat.S_IMODE(info.st_mode))
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, MAX_ADMIN_TOKEN_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ADMIN_TOKEN_FILE_BYTES:
                raise ConfigError(f"{where}: larger than {MAX_ADMIN_TOKEN_FILE_BYTES} bytes; "
                                  "it should hold only the token")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        token = b"".join(chunks).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: the token is not UTF-8 text") from None
    if not token:
        raise ConfigError(f"{where}: the file holds no token")
    if not all(" " <= ch <= "~" for ch in token):
        raise ConfigError(f"{where}: the token must be one line of printable ASCII characters "
                          "(it is sent in an HTTP header)")
    return token
