"""A directory of steering profiles: `NAME.json` files in the `steermoe-profile/1` format.

Beside a profile may lie the statistics it was selected from (`NAME.stats.csv`, see
`expert_stats`) and their picture (`NAME.heatmap.png`); neither ends in `.json`, so profile
loaders never take them for profiles. Every write is atomic (`atomic_files`): a reader, such
as a running server that re-reads changed files per request, sees the old file or the new one.

Profile files are read as `directory.load_profile_file` reads them (regular files only, symlinks
followed, at most `MAX_PROFILE_BYTES`); a server, which looks a profile up on every request,
reads it with `get_cached` (parsed again only when the file changed). The messages of this
module's errors name profiles, not paths: they may reach HTTP clients. The directory is kept
on the error (`.directory`) for callers, such as a command line, that want to show it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from expert_profiles.atomic_files import write_atomic
from expert_profiles.directory import ProfileFileError, load_profile_dir, load_profile_file
from expert_profiles.expert_stats import ExpertStats
from expert_profiles.guard import GuardFile, guard_path, load_guard
from expert_profiles.model_shape import ModelShape
from expert_profiles.schema import ProfileMismatchError, SteeringProfile, is_profile_name

logger = logging.getLogger(__name__)
T = TypeVar("T")

PROFILE_SUFFIX = ".json"
STATS_SUFFIX = ".stats.csv"
HEATMAP_SUFFIX = ".heatmap.png"


class InvalidProfileNameError(ValueError):
    """A name that is not a valid profile name (and so never a path)."""


class ProfileNotFoundError(KeyError):
    """No profile of that name in the store."""

    def __init__(self, message: str = "profile not found", *, name: str | None = None,
                 directory: Path | None = None):
        super().__init__(message)
        self.name = name
        self.directory = directory

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "profile not found"


class ProfileExistsError(FileExistsError):
    """A profile of that name exists and overwriting was not asked for."""

    def __init__(self, message: str, *, name: str | None = None,
                 directory: Path | None = None):
        super().__init__(message)
        self.name = name
        self.directory = directory

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "profile exists"


def validate_name(name: str) -> str:
    """Return `name` if it is a valid profile name, else raise InvalidProfileNameError."""
    if not is_profile_name(name):
        raise InvalidProfileNameError(
            f"invalid profile name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class ProfileStore:
    """Profiles of one directory: list, read, write, delete and validate them."""

    def __init__(self, directory: str | Path, *, create: bool = False):
        self.directory = Path(directory)
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        # `get_cached` / `get_guard_cached`: (kind, name) -> (identity of the file read, what
        # was read from it).
        self._cache: dict[tuple[str, str], tuple[tuple[int, ...], Any]] = {}
        self._cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProfileStore({str(self.directory)!r})"

    # ---- paths ------------------------------------------------------------------------------

    def profile_path(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}{PROFILE_SUFFIX}"

    def stats_path(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}{STATS_SUFFIX}"

    def heatmap_path(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}{HEATMAP_SUFFIX}"

    # ---- profiles ---------------------------------------------------------------------------

    def list(self) -> list[str]:
        """Names of the profile files present (valid or not), sorted."""
        if not self.directory.is_dir():
            return []
        return sorted(
            path.stem for path in self.directory.glob(f"*{PROFILE_SUFFIX}")
            if is_profile_name(path.stem)
        )

    def signature(self) -> tuple[tuple[str, int, int], ...]:
        """(file name, modification time, size) of every `NAME.json` entry, sorted: equal
        signatures mean nothing to validate again (an entry that cannot be stat'ed is -1, -1)."""
        signature = []
        for path in self.directory.glob(f"*{PROFILE_SUFFIX}"):
            try:
                info = path.stat()
            except OSError:  # gone, or unreadable: validating reports it
                signature.append((path.name, -1, -1))
                continue
            signature.append((path.name, info.st_mtime_ns, info.st_size))
        return tuple(sorted(signature))

    def exists(self, name: str) -> bool:
        return self.profile_path(name).is_file()

    def get(self, name: str) -> SteeringProfile:
        """The profile `name`; ProfileNotFoundError if absent, ProfileFileError if unusable
        (also when NAME.json is there but is no regular file, e.g. a FIFO or directory)."""
        path = self.profile_path(name)
        if not self._present(path):
            raise self._not_found(name)
        return load_profile_file(path)

    def get_cached(self, name: str) -> SteeringProfile:
        """The profile `name` as a server looks it up on each request: the copy read before
        while its file is unchanged (same inode, modification and change times and size of
        what the name leads to), else read again (thread-safe).

        Unlike `get`, anything at the name that leads to no file (a dangling link too) is
        ProfileNotFoundError; ProfileFileError if the file is unusable (not cached)."""
        def missing() -> SteeringProfile:
            raise self._not_found(name)

        path = self.profile_path(name)
        return self._read_cached(("profile", name), path, lambda: load_profile_file(path),
                                 missing)

    def get_guard_cached(self, name: str) -> GuardFile:
        """The guard `name` (`guards/NAME.json`, `guard.load_guard`), cached as `get_cached`
        caches profiles: GuardNotFoundError or GuardFileError as `load_guard` raises them."""
        def load() -> GuardFile:
            return load_guard(self.directory, name)

        return self._read_cached(("guard", name), guard_path(self.directory, name), load, load)

    def _read_cached(self, key: tuple[str, str], path: Path, load: Callable[[], T],
                     missing: Callable[[], T]) -> T:
        """What `load` read from `path` before while the file is unchanged (same inode,
        modification and change times and size), else `load` again (thread-safe); `missing`
        when nothing at `path` leads to a file. A failing `load` is not cached."""
        try:
            info = path.stat()
        except FileNotFoundError:
            with self._cache_lock:
                self._cache.pop(key, None)
            return missing()
        except OSError:  # a link loop, no permission: reading it says why
            info = None
        identity = None if info is None else (
            info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)
        with self._cache_lock:
            cached = self._cache.get(key)
        if identity is not None and cached is not None and cached[0] == identity:
            return cached[1]
        value = load()
        if identity is not None:
            with self._cache_lock:
                self._cache[key] = (identity, value)
        return value

    def _not_found(self, name: str) -> ProfileNotFoundError:
        return ProfileNotFoundError(f"no profile {name!r} in the profile directory",
                                    name=name, directory=self.directory)

    @staticmethod
    def _present(path: Path) -> bool:
        """Whether a directory entry (of any kind, a dangling link too) is at `path`."""
        try:
            os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError:
            return True  # there may be something; reading it reports the problem
        return True

    def put(self, profile: SteeringProfile, *, overwrite: bool = False) -> Path:
        """Write `profile` as NAME.json atomically; ProfileExistsError unless `overwrite`."""
        checked = SteeringProfile.model_validate(profile.model_dump())
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.profile_path(checked.name)
        try:
            write_atomic(path, checked.to_json().encode("utf-8"), overwrite=overwrite)
        except FileExistsError:
            raise ProfileExistsError(
                f"profile {checked.name!r} already exists (overwrite it explicitly)",
                name=checked.name, directory=self.directory,
            ) from None
        return path

    def delete(self, name: str) -> list[Path]:
        """Remove the profile and the files stored beside it; returns the removed paths.

        NAME.json may be any entry but a directory (a symlink is removed, not its target), so
        a profile that cannot be read can still be deleted.
        """
        path = self.profile_path(name)
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(name) from None
        if stat.S_ISDIR(mode):
            raise self._not_found(name)
        removed = []
        for candidate in (path, self.stats_path(name), self.heatmap_path(name)):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
        return removed

    def check(self, name: str, shape: ModelShape) -> SteeringProfile:
        """The profile `name`, or ProfileMismatchError if it does not fit `shape`."""
        profile = self.get(name)
        profile.check_model(shape)
        return profile

    def validate_all(self, shape: ModelShape | None = None) -> tuple[
        dict[str, SteeringProfile], dict[str, str]
    ]:
        """(valid profiles by name, error by file name); with `shape`, mismatches are errors.

        Every error is also logged.
        """
        loaded = load_profile_dir(self.directory)
        ok: dict[str, SteeringProfile] = {}
        errors = dict(loaded.errors)
        for name, profile in loaded.profiles.items():
            if shape is not None:
                try:
                    profile.check_model(shape)
                except ProfileMismatchError as exc:
                    errors[f"{name}{PROFILE_SUFFIX}"] = f"{name}{PROFILE_SUFFIX}: {exc}"
                    logger.error("steermoe: profile %s does not fit the model: %s", name, exc)
                    continue
            ok[name] = profile
        return ok, errors

    # ---- statistics -------------------------------------------------------------------------

    def put_stats(self, name: str, stats: ExpertStats) -> Path:
        """Write the statistics table of profile `name` (atomically, replacing any)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return write_atomic(self.stats_path(name), stats.to_csv_text().encode("utf-8"))

    def get_stats(self, name: str) -> ExpertStats | None:
        """The statistics stored beside profile `name`, or None if there are none."""
        path = self.stats_path(name)
        if not path.is_file():
            return None
        return ExpertStats.read(path)


__all__ = [
    "HEATMAP_SUFFIX",
    "InvalidProfileNameError",
    "PROFILE_SUFFIX",
    "ProfileExistsError",
    "ProfileFileError",
    "ProfileNotFoundError",
    "ProfileStore",
    "STATS_SUFFIX",
    "validate_name",
]
