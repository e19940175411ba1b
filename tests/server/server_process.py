"""Starting `steermoe serve` as a subprocess on 127.0.0.1 for a test module, and stopping it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.local_server import ENGINE_OPTIONS, RunningServer, steermoe_serve


def cuda_options() -> tuple[str, ...]:
    """On a CUDA machine (the GPU kit's vLLM has no flash-attention): Triton attention."""
    try:
        import torch
    except ImportError:
        return ()
    return ("--attention-backend", "TRITON_ATTN") if torch.cuda.is_available() else ()


@contextlib.contextmanager
def steermoe_server(model: Path, args: Sequence[str], log_path: Path,
                    env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """`steermoe serve MODEL ARGS` with the small test engine on a free port; yields once
    /health answers 200."""
    with steermoe_serve(model, [*ENGINE_OPTIONS, *cuda_options(), *args], log_path,
                        env=env) as server:
        yield server


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


# Two profiles over every layer of the tiny Qwen3-MoE (4 layers, 8 experts): (activate, deactivate).
LAYERS = range(4)
SAFETY = ({layer: [5] for layer in LAYERS}, {layer: [0, 1] for layer in LAYERS})
CONCISE = ({layer: [2] for layer in LAYERS}, {layer: [6, 7] for layer in LAYERS})


def tiny_qwen_with_profiles(build_tiny: Any, root: Path) -> dict[str, Any]:
    """The tiny Qwen3-MoE checkpoint and, in ROOT/profiles, `safety`, `concise` and `unsafe`
    (tagged lowers-safety): {"checkpoint", "root", "profiles"}."""
    from profile_tools.checkpoint_factory import model_shape

    checkpoint = build_tiny("qwen3_moe")
    shape = model_shape(checkpoint)
    model = {key: shape[key] for key in ("architecture", "num_layers", "num_experts", "top_k")}
    profiles = root / "profiles"
    profiles.mkdir()
    write_profile(profiles, "safety", model, *SAFETY)
    write_profile(profiles, "concise", model, *CONCISE)
    write_profile(profiles, "unsafe", model, {1: [3]}, tags=["lowers-safety"])
    return {"checkpoint": checkpoint, "root": root, "profiles": profiles}
