"""Reading profiles from a directory of `NAME.json` files.

A profile file is read defensively, since its errors may reach HTTP clients and a server reads
it on a request's path:

* only a regular file is read: the file is opened non-blocking (so a FIFO cannot stall the
  reader) and refused unless `fstat` says it is a regular file (a FIFO, socket, device such as
  `/dev/zero`, or directory is refused);
* symbolic links are followed, so a profile may be a link to a regular file elsewhere (as in
  a Kubernetes ConfigMap mount); the checks apply to the file it leads to. Whoever can write
  to the profile directory decides what the server steers with, links or not, so that
  directory must be writable by administrators only;
* at most MAX_PROFILE_BYTES are read; a larger file is refused;
* the text must be UTF-8 JSON; nesting too deep to parse and numbers too long to convert are
  reported like any other JSON error.

Every problem is a ProfileFileError whose message names the file by its name (`NAME.json`,
never its directory) and gives a short reason; the full detail goes to this module's logger.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from expert_profiles.schema import SteeringProfile, describe_validation_error

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

MAX_PROFILE_BYTES = 1 << 20  # 1 MiB
_READ_CHUNK = 64 * 1024


class ProfileFileError(ValueError):
    """A profile file that cannot be used, with the reason (free of paths and OS detail)."""


def os_reason(exc: OSError) -> str:
    """A short reason for `exc` that names no path (`str(exc)` would)."""
    return exc.strerror or type(exc).__name__


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def read_profile_bytes(path: str | Path) -> bytes:
    """The bytes of the regular file `path` (symlinks followed), at most MAX_PROFILE_BYTES.

    Raises ProfileFileError, without blocking, for anything else.
    """
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        logger.debug("steermoe: cannot open profile file %s: %s", path, exc)
        raise ProfileFileError(f"{path.name}: cannot read: {os_reason(exc)}") from None
    try:
        try:
            info = os.fstat(fd)
        except OSError as exc:
            logger.debug("steermoe: cannot stat profile file %s: %s", path, exc)
            raise ProfileFileError(f"{path.name}: cannot read: {os_reason(exc)}") from None
        if not stat.S_ISREG(info.st_mode):
            logger.debug("steermoe: profile file %s is %s", path, _file_kind(info.st_mode))
            raise ProfileFileError(
                f"{path.name}: cannot read: not a regular file ({_file_kind(info.st_mode)})"
            )
        if info.st_size > MAX_PROFILE_BYTES:
            raise _too_large(path)
        chunks: list[bytes] = []
        size = 0
        try:
            os.set_blocking(fd, True)
            while size <= MAX_PROFILE_BYTES:
                chunk = os.read(fd, min(_READ_CHUNK, MAX_PROFILE_BYTES + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError as exc:
            logger.debug("steermoe: cannot read profile file %s: %s", path, exc)
            raise ProfileFileError(f"{path.name}: cannot read: {os_reason(exc)}") from None
        if size > MAX_PROFILE_BYTES:  # it grew after fstat
            raise _too_large(path)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _too_large(path: Path) -> ProfileFileError:
    return ProfileFileError(
        f"{path.name}: too large: a profile file may hold at most {MAX_PROFILE_BYTES} bytes"
    )


def parse_profile_json(name: str, data: bytes) -> object:
    """The JSON value of a profile file's bytes; ProfileFileError names the file `name`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProfileFileError(f"{name}: cannot read: not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileFileError(f"{name}: not valid JSON: {exc}") from None
    except RecursionError:
        raise ProfileFileError(f"{name}: not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        logger.debug("steermoe: profile file %s: %s", name, exc)
        reason = "a number has too many digits" if "digits" in str(exc) else "a value is invalid"
        raise ProfileFileError(f"{name}: not valid JSON: {reason}") from None


def load_model_file(path: Path, model: type[M], root: str) -> M:
    """Read, parse and validate one JSON file as `model` (read as the module docstring says);
    every failure is a ProfileFileError `FILE: problem`, `root` naming the document."""
    data = parse_profile_json(path.name, read_profile_bytes(path))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = describe_validation_error(exc, root)
        raise ProfileFileError(f"{path.name}: {problems}") from None
    except RecursionError:
        raise ProfileFileError(f"{path.name}: {root}: nested too deeply") from None


def load_profile_file(path: str | Path) -> SteeringProfile:
    """Parse and validate one profile file; its `name` must equal the file name's stem.

    See the module docstring for what is read and how; every failure is a ProfileFileError.
    """
    path = Path(path)
    profile = load_model_file(path, SteeringProfile, "profile")
    if profile.name != path.stem:
        raise ProfileFileError(
            f"{path.name}: the profile is named {profile.name!r}; the file must be "
            f"{profile.name}.json"
        )
    return profile


@dataclass
class ProfileDirectory:
    """The profiles of one directory, with the files that failed and why."""

    profiles: dict[str, SteeringProfile] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def load_profile_dir(directory: str | Path) -> ProfileDirectory:
    """Load every `*.json` profile in `directory`; bad files are reported and skipped. Hidden
    files (`.name.json`, such as the demo's `.prepared.json`) are not profiles: a profile name
    starts with a letter or digit.

    Errors are keyed by file name; a directory that cannot be listed is reported under its
    path (the caller configured it; no file name applies).
    """
    result = ProfileDirectory()
    directory = Path(directory)
    if not directory.is_dir():
        result.errors[str(directory)] = "profile directory does not exist"
        return result
    try:
        paths = sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))
    except OSError as exc:
        logger.error("steermoe: cannot list the profile directory %s: %s", directory, exc)
        result.errors[str(directory)] = f"cannot list the profile directory: {os_reason(exc)}"
        return result
    for path in paths:
        try:
            profile = load_profile_file(path)
        except ProfileFileError as exc:
            result.errors[path.name] = str(exc)
            logger.error("steermoe: skipping profile file %s", exc)
            continue
        result.profiles[profile.name] = profile
    return result
