"""The compile-cache key (every process that builds a model): vLLM caches compiled model
graphs under `VllmConfig.compute_hash`; the hook mixes in a hash of the plugin's code that runs
inside those graphs, so a graph compiled without the hooks (or with older ones) is never
loaded into an engine that steers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def code_hash() -> str:
    """Hash of the modules whose code runs inside compiled model graphs: the ops and what
    they call, the layer hooks, the router kinds' attach code, and this package."""
    from vllm_patches import (
        engine_steering,
        fused_routing,
        fused_steered_routing,
        routers,
        steering_math,
        steering_ops,
        vllm_compat,
    )
    from vllm_patches.routers import kind
    from vllm_patches.vllm_compat import layer_lookup, worker_hooks

    digest = hashlib.sha256()
    modules = (engine_steering, steering_math, steering_ops, fused_routing,
               fused_steered_routing, routers, kind, *routers.MODULES, vllm_compat,
               layer_lookup, worker_hooks)
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def install_compile_cache_key() -> None:
    from vllm.config import VllmConfig

    original = VllmConfig.compute_hash
    ours = code_hash()

    def compute_hash(self, *args, **kwargs):
        base = original(self, *args, **kwargs)
        mixed = hashlib.sha256(f"{base}|steermoe:{ours}".encode()).hexdigest()
        return mixed[: len(base)]

    VllmConfig.compute_hash = compute_hash
