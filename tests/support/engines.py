"""Starting real vLLM engines for tests: shared settings and a clean shutdown."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Small engines that fit beside each other on a 2-core, 24 GiB machine.
ENGINE_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 512,
    "max_num_seqs": 16,
    "gpu_memory_utilization": 0.2,
    "max_logprobs": -1,
    "seed": 0,
}


@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Set (or unset, with None) environment variables for the block."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def running_llm(model: str | Path, profile_dir: str | Path | None = None,
                **overrides: Any) -> Iterator[Any]:
    """A `vllm.LLM` on `model` with the steering plugin, shut down on exit."""
    from vllm import LLM

    kwargs = {**ENGINE_DEFAULTS, **overrides}
    with env(STEERMOE_PROFILE_DIR=str(profile_dir) if profile_dir else None):
        llm = LLM(model=str(model), **kwargs)
        try:
            yield llm
        finally:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
