"""`steermoe demo serve DIR`: the prepared demo behind `steermoe serve`, with `demo-safe`
(always the safety profile) and `demo-guarded` (the safety profile where the guard fires).

    steermoe serve DIR/model --profiles DIR/profiles --endpoint demo-safe=safety \
        --endpoint demo-guarded=guard:demo-guard \
        --served-model-name demo --dtype float32 --max-model-len 512 \
        --gpu-memory-utilization 0.15 [more options]

Options after DIR go to `steermoe serve` (and from there to `vllm serve`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from profile_tools.demo.build import MAX_MODEL_LEN
from profile_tools.demo.prepare import GUARD, paths

SERVED_NAME = "demo"
SAFE_ENDPOINT = "demo-safe"
GUARDED_ENDPOINT = "demo-guarded"


def steering_args(directory: str | Path) -> list[str]:
    """The steering options of `steermoe serve` for a prepared demo directory."""
    _, profile_dir = paths(directory)
    return ["--profiles", str(profile_dir), "--endpoint", f"{SAFE_ENDPOINT}=safety",
            "--endpoint", f"{GUARDED_ENDPOINT}=guard:{GUARD.name}",
            "--served-model-name", SERVED_NAME]


def serve_argv(directory: str | Path, extra: Sequence[str] = ()) -> list[str]:
    """The `steermoe serve` arguments (without 'serve') for a prepared demo directory."""
    model_dir, _ = paths(directory)
    argv = [str(model_dir), *steering_args(directory)]
    given = set(extra)
    if "--dtype" not in given:
        argv += ["--dtype", "float32"]
    if "--max-model-len" not in given:
        argv += ["--max-model-len", str(MAX_MODEL_LEN)]
    if "--gpu-memory-utilization" not in given:
        argv += ["--gpu-memory-utilization", "0.15"]
    return argv + list(extra)

