"""One real `steermoe serve` for the whole adversarial suite (session scope).

The tiny Mixtral checkpoint (4 MoE layers, 8 experts, top-2) served as `tiny-base` (unlocked)
and `tiny-safe` (locked to profile `safety`), with an API key, routing capture on, inline
steering off, a 64 KiB body limit, an audit log, the admin token from a file (when
`steermoe serve` has `--admin-token-file`) or from STEERMOE_ADMIN_TOKEN, vLLM's request-id
randomisation switched off and vLLM's Responses store on. Next to the good profiles the
directory holds hostile files: a FIFO, a symlink to /dev/zero, a 2 MiB file, a broken file and
a profile with empty sets.

A watchdog thread guards the machine and the rest of the suite: when /health stops answering
for STUCK_AFTER_S (a reader blocked on the FIFO stalls the whole server) it opens the FIFO for
writing and closes it, which ends any blocked read; when the API server grows past RSS_LIMIT
(reading /dev/zero) it kills the server. Tests look at `watchdog.releases` / `.killed` to
fail clearly instead of hanging.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from profile_tools.checkpoint_factory import model_shape
from tests.security import helpers as h
from tests.server.server_process import RunningServer, steermoe_server, write_profile

REPO = Path(__file__).resolve().parents[2]
STUCK_AFTER_S = 12.0
RSS_LIMIT = int(os.environ.get("STEERMOE_SECURITY_RSS_LIMIT", 6 << 30))
HOSTILE = ("fifo", "zero", "huge", "broken")


def serve_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--help"], cwd=REPO, capture_output=True,
        text=True, timeout=300, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"},
    )
    return result.stdout + result.stderr


def request_id_switch() -> str | None:
    """The real name of vLLM's switch that keeps client request ids as they are, if any."""
    spec = importlib.util.find_spec("vllm.envs")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).read_text(encoding="utf-8")
    for name in ("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "VLLM_DISABLE_REQUEST_ID_RANDOMISATION"):
        if f'"{name}"' in source:
            return name
    return None


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_fifo(path: Path) -> bool:
    """End a read blocked on the FIFO `path` (open for writing, close). True if one waited."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):  # nobody reads it
            return False
        raise
    os.close(fd)
    return True


@dataclass
class Watchdog:
    base_url: str
    fifo: Path
    pid: int
    releases: int = 0
    killed: bool = False
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="security-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        last_ok = next_health = time.monotonic()
        with httpx.Client(base_url=self.base_url, timeout=2) as client:
            while not self._stop.wait(0.25):
                rss = _rss(self.pid)
                self.peak_rss = max(self.peak_rss, rss)
                if rss > RSS_LIMIT:
                    self.killed = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pid, signal.SIGKILL)
                    return
                if time.monotonic() < next_health:
                    continue
                try:
                    healthy = client.get("/health").status_code == 200
                except httpx.HTTPError:
                    healthy = False
                now = next_health = time.monotonic()
                next_health += 1.0
                if healthy:
                    last_ok = now
                elif now - last_ok > STUCK_AFTER_S:
                    with contextlib.suppress(OSError):
                        if release_fifo(self.fifo):
                            self.releases += 1
                    last_ok = now


@dataclass
class SecurityServer:
    running: RunningServer
    root: Path
    profiles: Path
    audit_log: Path
    model: dict[str, Any]
    admin_via: str  # "file" or "env"
    request_id_switch: str | None
    watchdog: Watchdog

    @property
    def base_url(self) -> str:
        return self.running.base_url

    def log_text(self) -> str:
        return self.running.log_path.read_text(errors="replace")

    def secret_markers(self) -> tuple[str, ...]:
        """Strings no answer may contain: the machine's paths of this run."""
        return (str(self.root), str(self.profiles))


def write_hostile_files(profiles: Path, model: dict[str, Any]) -> None:
    os.mkfifo(profiles / "fifo.json")
    (profiles / "zero.json").symlink_to("/dev/zero")
    filler = "x" * (2 << 20)
    (profiles / "huge.json").write_text(
        '{"format": "steermoe-profile/1", "name": "huge", "description": "' + filler + '"}',
        encoding="utf-8",
    )
    (profiles / "broken.json").write_text("{not json", encoding="utf-8")
    # A profile whose expert sets are empty, written raw (the schema would refuse it).
    import json

    (profiles / "empty.json").write_text(json.dumps(h.profile_document(
        model, "empty", {3: []}, {})), encoding="utf-8")


@pytest.fixture(scope="session")
def security_server(build_tiny, tmp_path_factory) -> Iterator[SecurityServer]:
    checkpoint = build_tiny("mixtral")
    shape = model_shape(checkpoint)
    model = {key: shape[key] for key in ("architecture", "num_layers", "num_experts", "top_k")}
    assert shape["moe_layers"] == list(h.LAYERS), shape
    root = tmp_path_factory.mktemp("security")
    profiles = root / "profiles"
    profiles.mkdir()
    write_profile(profiles, "safety", model, *h.SAFETY, description="keeps to safe experts")
    write_profile(profiles, "concise", model, *h.CONCISE)
    write_profile(profiles, "unsafe", model, *h.UNSAFE, tags=["lowers-safety"])
    write_hostile_files(profiles, model)
    audit_log = root / "audit.jsonl"

    args = ["--served-model-name", h.BASE, "--profiles", str(profiles),
            "--endpoint", f"{h.LOCKED}=safety", "--allow-routing-capture",
            "--api-key", h.API_KEY, "--max-request-bytes", str(h.MAX_BODY),
            "--audit-log", str(audit_log)]
    # vLLM's Responses store, so that continuations (`previous_response_id`) can be attacked.
    env: dict[str, str] = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    if "--admin-token-file" in serve_help():
        token_file = root / "admin-token"
        token_file.write_text(h.ADMIN_TOKEN + "\n", encoding="utf-8")
        token_file.chmod(0o600)
        args += ["--admin-token-file", str(token_file)]
        admin_via = "file"
    else:
        env["STEERMOE_ADMIN_TOKEN"] = h.ADMIN_TOKEN
        admin_via = "env"
    switch = request_id_switch()
    if switch is not None:
        env[switch] = "1"

    with steermoe_server(checkpoint, args, root / "server.log", env=env) as running:
        watchdog = Watchdog(running.base_url, profiles / "fifo.json", running.process.pid)
        watchdog.start()
        try:
            yield SecurityServer(running, root, profiles, audit_log, model, admin_via, switch,
                                 watchdog)
        finally:
            watchdog.stop()
            with contextlib.suppress(OSError):
                release_fifo(profiles / "fifo.json")


@pytest.fixture(scope="session")
def http(security_server: SecurityServer) -> Iterator[httpx.Client]:
    """A plain client: no default headers (each test sends its own Authorization)."""
    with httpx.Client(base_url=security_server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(autouse=True)
def watchdog_guard(security_server: SecurityServer) -> Iterator[SecurityServer]:
    """After each test: an error if the watchdog had to step in during it."""
    releases = security_server.watchdog.releases
    yield security_server
    assert not security_server.watchdog.killed, \
        "the API server was killed: its memory grew past the limit (reading /dev/zero?)"
    assert security_server.watchdog.releases == releases, \
        "the server stalled (a read blocked on fifo.json); the watchdog released it"
