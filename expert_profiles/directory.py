"""Reading profiles from a directory of `NAME.json` files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from expert_profiles.schema import SteeringProfile, describe_validation_error

logger = logging.getLogger(__name__)


class ProfileFileError(ValueError):
    """A profile file that cannot be used, with the reason."""


def load_profile_file(path: str | Path) -> SteeringProfile:
    """Parse and validate one profile file; its `name` must equal the file name's stem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileFileError(f"{path.name}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ProfileFileError(f"{path.name}: not valid JSON: {exc}") from None
    try:
        profile = SteeringProfile.model_validate(data)
    except ValidationError as exc:
        problems = describe_validation_error(exc, "profile")
        raise ProfileFileError(f"{path.name}: {problems}") from None
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
    """Load every `*.json` profile in `directory`; bad files are reported and skipped."""
    result = ProfileDirectory()
    directory = Path(directory)
    if not directory.is_dir():
        result.errors[str(directory)] = "profile directory does not exist"
        return result
    for path in sorted(directory.glob("*.json")):
        try:
            profile = load_profile_file(path)
        except ProfileFileError as exc:
            result.errors[path.name] = str(exc)
            logger.error("steermoe: skipping profile file %s", exc)
            continue
        result.profiles[profile.name] = profile
    return result
