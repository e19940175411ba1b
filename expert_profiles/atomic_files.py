"""Writing files so that a reader sees the old content or the new, never part of a write.

The data goes to a temporary file in the target's directory (hidden, ending in `.tmp`, so no
`*.json` glob matches it), is flushed and fsynced, then renamed over the target with
`os.replace` (or hard-linked into place when the target must not exist yet); the directory is
fsynced last so the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o644


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or filesystem allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _differ_from_previous(tmp: str, target: Path) -> None:
    """Make the new file's (mtime, size) differ from the file it replaces.

    Readers that cache by (mtime, size) would otherwise miss a same-size rewrite made within
    one tick of the filesystem clock.
    """
    try:
        old = target.stat()
    except FileNotFoundError:
        return
    new = os.stat(tmp)
    if (new.st_mtime_ns, new.st_size) == (old.st_mtime_ns, old.st_size):
        os.utime(tmp, ns=(new.st_atime_ns, old.st_mtime_ns + 1))


def write_atomic(path: str | Path, data: bytes, *, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically; with overwrite=False raise FileExistsError if it exists.

    Concurrent writers never interleave: the last rename wins (overwrite=True), or exactly one
    creator wins (overwrite=False).
    """
    path = Path(path)
    directory = path.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            _differ_from_previous(tmp, path)
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        _fsync_directory(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _link_new(tmp: str, path: Path) -> None:
    """Put `tmp` at `path` only if nothing is there (atomic where hard links exist)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path.name} already exists") from None
    except OSError:  # a filesystem without hard links: check, then rename
        if path.exists():
            raise FileExistsError(f"{path.name} already exists") from None
        os.replace(tmp, path)
