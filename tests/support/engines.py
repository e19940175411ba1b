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


# ---- the stock engine: vLLM with the plugin switched off ----------------------------------

REPO = Path(__file__).resolve().parents[2]

STOCK_ENGINE_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from tests.support.engines import plugin_state, request_output
if __name__ == "__main__":
    model, out = sys.argv[1], sys.argv[2]
    prompts, sampling, kwargs = (json.loads(a) for a in sys.argv[3:6])
    llm = LLM(model=model, **kwargs)
    outputs = llm.generate(prompts, SamplingParams(**sampling))
    json.dump({"outputs": [request_output(o) for o in outputs],
               "workers": llm.collective_rpc(plugin_state)}, open(out, "w"))
"""


def plugin_state(worker: Any) -> dict[str, Any]:
    """Where the steering plugin shows in one worker (run there by `collective_rpc`): the
    model runner's `_steermoe` attribute, MoE layers carrying a `_steermoe` hook, the plugin's
    vLLM-internals module being imported, and vLLM methods replaced by the plugin's."""
    import sys

    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    runner = worker.model_runner  # `worker` may be vLLM's wrapper, which forwards attributes
    methods = {"MoERunner._maybe_dispatch": MoERunner._maybe_dispatch,
               "GPUModelRunner._prepare_inputs": GPUModelRunner._prepare_inputs,
               "GPUModelRunner.execute_model": GPUModelRunner.execute_model,
               "Worker.load_model": Worker.load_model}
    return {
        "runner_has_steermoe": hasattr(runner, "_steermoe"),
        "layers_with_steermoe": sum(hasattr(m, "_steermoe") for m in runner.get_model().modules()),
        "vllm_compat_imported": "vllm_patches.vllm_compat" in sys.modules,
        "replaced_methods": sorted(name for name, fn in methods.items()
                                   if not fn.__module__.startswith("vllm.")),
    }


PLUGIN_OFF_STATE = {"runner_has_steermoe": False, "layers_with_steermoe": 0,
                    "vllm_compat_imported": False, "replaced_methods": []}


def request_output(output: Any) -> dict[str, Any]:
    """A `RequestOutput` as JSON-able data: token ids, sample and prompt logprobs."""
    def logprobs(entry: Any) -> dict[str, float] | None:
        return None if entry is None else {str(t): float(v.logprob) for t, v in entry.items()}

    completion = output.outputs[0]
    return {
        "prompt_ids": list(output.prompt_token_ids),
        "output_ids": list(completion.token_ids),
        "logprobs": [logprobs(e) for e in completion.logprobs or []],
        "prompt_logprobs": [logprobs(e) for e in output.prompt_logprobs or []],
    }


def run_stock_engine(model: str | Path, prompts: list[str], sampling: dict[str, Any],
                     workdir: str | Path, timeout: float = 900, **overrides: Any
                     ) -> dict[str, Any]:
    """Run `prompts` (one SamplingParams(**sampling) for all) on a stock vLLM engine.

    A fresh Python process with `STEERMOE_DISABLE=1` (README: vLLM without any hook), so no
    vLLM class this process has patched is inherited. Engine settings as `running_llm`'s.
    Returns {"outputs": [request_output(o) per prompt], "workers": [plugin_state(w)]}."""
    import subprocess
    import sys

    kwargs = {**ENGINE_DEFAULTS, **overrides}
    if cuda_available():
        kwargs = cuda_overrides(model, kwargs)
    workdir = Path(workdir)
    script, out = workdir / "stock_engine.py", workdir / "stock_engine.json"
    script.write_text(STOCK_ENGINE_SCRIPT)
    environ = {**os.environ, "STEERMOE_DISABLE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                           os.environ.get("PYTHONPATH")]))}
    subprocess.run(
        [sys.executable, str(script), str(model), str(out), json.dumps(prompts),
         json.dumps(sampling), json.dumps(kwargs)],
        check=True, env=environ, timeout=timeout, cwd=REPO,
    )
    return json.loads(out.read_text())
