"""Starting `steermoe serve` as a subprocess on 127.0.0.1 for a test module, and stopping it."""

from __future__ import annotations

import contextlib
import json
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
from typing import Any

# A small CPU engine that starts quickly (no graph compilation) beside other test engines.
ENGINE_OPTIONS = (
    "--dtype", "float32",
    "--max-model-len", "512",
    "--max-num-seqs", "16",
    "--gpu-memory-utilization", "0.2",
    "--block-size", "32",
    "--seed", "0",
    "--enforce-eager",
)
START_TIMEOUT_S = 420


def cuda_options() -> tuple[str, ...]:
    """On a CUDA machine (the GPU kit's vLLM has no flash-attention): Triton attention."""
    try:
        import torch
    except ImportError:
        return ()
    return ("--attention-backend", "TRITON_ATTN") if torch.cuda.is_available() else ()


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


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen) -> None:
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
def steermoe_server(model: Path, args: Sequence[str], log_path: Path,
                    env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """`steermoe serve MODEL ARGS` on a free port; yields once /health answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", str(model), *ENGINE_OPTIONS,
               *cuda_options(), "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", **(env or {})}
    for key in ("STEERMOE_SERVER_CONFIG", "VLLM_API_KEY"):
        full_env.pop(key, None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=full_env,
            cwd=Path(__file__).resolve().parents[2], start_new_session=True,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", log_path, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(server.base_url):
            if process.poll() is not None:
                raise RuntimeError(f"steermoe serve exited:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"steermoe serve did not start:\n{server.log_tail()}")
            time.sleep(2)
        yield server
    finally:
        _stop(process)


def write_profile(directory: Path, name: str, model: dict[str, Any],
                  activate: dict[int, list[int]] | None = None,
                  deactivate: dict[int, list[int]] | None = None,
                  tags: Sequence[str] = (), description: str = "") -> Path:
    data = {
        "format": "steermoe-profile/1",
        "name": name,
        "model": model,
        "activate": {str(k): v for k, v in (activate or {}).items()},
        "deactivate": {str(k): v for k, v in (deactivate or {}).items()},
        "tags": list(tags),
        "description": description,
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
