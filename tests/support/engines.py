"""Starting real vLLM engines for tests: shared settings and a clean shutdown."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
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


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _config(model: str | Path) -> dict[str, Any]:
    path = Path(model) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def needs_eager_on_cuda(model: str | Path) -> bool:
    """Correction-bias routers (DeepSeek-V3 family): steermoe steers them exactly only without
    CUDA graphs, and refuses steering in an engine with graphs (README, ROUTERS.md)."""
    return _config(model).get("topk_method") == "noaux_tc"


def attention_backend(model: str | Path) -> str:
    """The GPU kit's vLLM has no flash-attention: Triton attention (Triton MLA for MLA)."""
    return "TRITON_MLA" if "kv_lora_rank" in _config(model) else "TRITON_ATTN"


def cuda_overrides(model: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Engine settings on a CUDA machine: the kit's attention backend, and CUDA graphs with
    torch.compile (the path that serves) even where a test asks for eager mode to start
    faster on the CPU, except for models steermoe steers only in eager mode on GPUs."""
    out = dict(overrides)
    out.setdefault("attention_backend", attention_backend(model))
    out["enforce_eager"] = needs_eager_on_cuda(model)
    return out


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
    if cuda_available():
        kwargs = cuda_overrides(model, kwargs)
    with env(STEERMOE_PROFILE_DIR=str(profile_dir) if profile_dir else None):
        llm = LLM(model=str(model), **kwargs)
        try:
            yield llm
        finally:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
