"""`steermoe serve` as a child process on 127.0.0.1, for the soak and the test suite."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 420
# A small CPU engine that starts quickly (no graph compilation) beside other engines.
ENGINE_OPTIONS = (
    "--dtype", "float32",
    "--max-model-len", "512",
    "--max-num-seqs", "16",
    "--gpu-memory-utilization", "0.2",
    "--block-size", "32",
    "--seed", "0",
    "--enforce-eager",
)
# What the operator's shell may hold that must not reach a server started here.
CLEARED_ENV = ("STEERMOE_SERVER_CONFIG", "VLLM_API_KEY")


@dataclass
class RunningServer:
    base_url: str
    log_path: Path
    process: subprocess.Popen

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def steermoe_serve(model: Path, args: Sequence[str], log_path: Path,
                   env: dict[str, str] | None = None,
                   start_timeout_s: float = START_TIMEOUT_S) -> Iterator[RunningServer]:
    """`steermoe serve MODEL ARGS` on a free port of 127.0.0.1 (its own process group, output
    to `log_path`); yields once /health answers 200, stops it when the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", str(model), *args,
               "--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", **(env or {})}
    for key in CLEARED_ENV:
        full_env.pop(key, None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                   cwd=REPO, start_new_session=True)
    server = RunningServer(f"http://127.0.0.1:{port}", Path(log_path), process)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not healthy(server.base_url):
            if process.poll() is not None:
                raise RuntimeError(f"steermoe serve exited:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"steermoe serve did not start:\n{server.log_tail()}")
            time.sleep(2)
        yield server
    finally:
        stop(process)
