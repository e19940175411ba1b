"""vLLM general plugin entry point (`vllm.general_plugins`: `steermoe`).

vLLM calls `register()` in every process it starts (API server, engine core, workers) before
models are built. Set `STEERMOE_DISABLE=1` to load vLLM without any steering hook.
"""

from __future__ import annotations

import os

DISABLE_ENV = "STEERMOE_DISABLE"


def register() -> None:
    """Install the steering hooks into vLLM (idempotent)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return
    from vllm_patches import (
        steering_ops,  # noqa: F401  (registers the custom ops)
        vllm_compat,
    )

    vllm_compat.install()
