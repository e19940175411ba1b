"""The package that knows vLLM internals: version and internals checks, steerability."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_patches import vllm_compat
from vllm_patches.engine_steering import MoELayerInfo
from vllm_patches.vllm_compat import compile_cache, worker_hooks


def test_installed_vllm_is_supported():
    assert vllm_compat.check_vllm_version()
    vllm_compat.check_internals()


@pytest.mark.parametrize("version", ["0.25.2", "0.33.0", "1.0.0"])
def test_unsupported_versions_are_refused_with_the_supported_range(monkeypatch, version):
    import vllm

    monkeypatch.setattr(vllm, "__version__", version)
    monkeypatch.delenv(vllm_compat.ALLOW_UNSUPPORTED_ENV, raising=False)
    with pytest.raises(vllm_compat.UnsupportedVLLMError, match="0.26.0 through 0.32.x") as info:
        vllm_compat.check_vllm_version()
    assert version in str(info.value)
    monkeypatch.setenv(vllm_compat.ALLOW_UNSUPPORTED_ENV, "1")
    assert vllm_compat.check_vllm_version() == version


@pytest.mark.parametrize("version", ["0.26.0", "0.32.0", "0.32.3+cpu", "0.30.1rc1"])
def test_supported_versions(monkeypatch, version):
    import vllm

    monkeypatch.setattr(vllm, "__version__", version)
    monkeypatch.delenv(vllm_compat.ALLOW_UNSUPPORTED_ENV, raising=False)
    assert vllm_compat.check_vllm_version() == version


def test_a_missing_internal_is_named(monkeypatch):
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    monkeypatch.delattr(MoERunner, "_maybe_dispatch")
    with pytest.raises(vllm_compat.UnsupportedVLLMError, match="MoERunner._maybe_dispatch"):
        vllm_compat.check_internals()


class MoERunner:  # same class name as vLLM's runner
    def __init__(self, router: object):
        self.router = router


class TransformersMoERunner(MoERunner):
    pass


class FusedTopKRouter:
    pass


class FusedTopKBiasRouter:
    pass


class RoutingSimulatorRouter:
    pass


def _layer(layer: int, module: object, experts: int = 8, top_k: int = 2):
    info = MoELayerInfo(layer, experts, top_k, type(module.router).__name__)
    return info, module


CPU_RUNNER = SimpleNamespace(
    device=SimpleNamespace(type="cpu"),
    vllm_config=SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=None)),
)


@pytest.mark.parametrize(
    ("layers", "reason"),
    [
        ([], "no vLLM fused-MoE layers"),
        ([_layer(0, TransformersMoERunner(FusedTopKRouter()))], "Transformers backend"),
        ([_layer(0, MoERunner(RoutingSimulatorRouter()))], "RoutingSimulatorRouter"),
        ([_layer(0, MoERunner(FusedTopKRouter())), _layer(1, MoERunner(FusedTopKRouter()), 16)],
         "differ in experts/top-k"),
        ([_layer(0, MoERunner(FusedTopKRouter()))], None),
    ],
)
def test_steerability(layers, reason):
    got = worker_hooks._unsteerable_reason(layers, CPU_RUNNER)
    if reason is None:
        assert got is None
    else:
        assert reason in got


def test_biased_routers_under_cuda_graphs_ask_for_eager():
    router = FusedTopKBiasRouter()
    router.e_score_correction_bias = object()
    runner = SimpleNamespace(
        device=SimpleNamespace(type="cuda"),
        vllm_config=SimpleNamespace(
            compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name="FULL"))
        ),
    )
    reason = worker_hooks._unsteerable_reason([_layer(1, MoERunner(router))], runner)
    assert "--enforce-eager" in reason


def test_compile_cache_key_includes_the_hooks(monkeypatch):
    import vllm.config

    def key_with(code: str) -> str:
        class Config:
            def compute_hash(self) -> str:
                return "0123456789abcdef"

        monkeypatch.setattr(vllm.config, "VllmConfig", Config)
        monkeypatch.setattr(compile_cache, "code_hash", lambda: code)
        compile_cache.install_compile_cache_key()
        return Config().compute_hash()

    plain = "0123456789abcdef"
    first, again, changed = key_with("a" * 64), key_with("a" * 64), key_with("b" * 64)
    assert len(first) == len(plain) and first != plain
    assert first == again and first != changed


def test_installed_parallel_config_has_the_batch_splitting_switches():
    """The switches `batch_splitting_mode` reads exist in the installed vLLM (else it would
    silently see every mode as off)."""
    from vllm.config import ParallelConfig

    config = ParallelConfig()
    assert config.enable_dbo is False and config.ubatch_size in (0, 1)
    assert config.use_sequence_parallel_moe is False
    assert worker_hooks.batch_splitting_mode(config) is None


@pytest.mark.parametrize(("settings", "named"), [
    ({"enable_dbo": True}, "dual-batch overlap"),
    ({"ubatch_size": 2}, "micro-batching"),
    ({"use_sequence_parallel_moe": True}, "sequence-parallel MoE"),
])
def test_modes_that_split_a_step_refuse_to_start(monkeypatch, settings, named):
    parallel = SimpleNamespace(**{"enable_dbo": False, "ubatch_size": 1,
                                  "use_sequence_parallel_moe": False, **settings})
    assert named in worker_hooks.batch_splitting_mode(parallel)
    layer = (MoELayerInfo(0, 8, 2, "FusedTopKRouter"), SimpleNamespace())
    runner = SimpleNamespace(vllm_config=SimpleNamespace(parallel_config=parallel),
                             get_model=lambda: None)
    written = []
    monkeypatch.setattr(worker_hooks, "_write_engine_info", lambda r, info: written.append(info))
    monkeypatch.setattr(worker_hooks, "_moe_layers", lambda model: [layer])
    with pytest.raises(worker_hooks.UnsupportedLayoutError, match=named) as info:
        worker_hooks.attach_engine_steering(runner)
    assert "STEERMOE_DISABLE=1" in str(info.value) and written == []
    monkeypatch.setattr(worker_hooks, "_moe_layers", lambda model: [])  # a dense model starts
    assert worker_hooks.attach_engine_steering(runner) is None
    assert written == [{"steerable": False, "reason": "it has no vLLM fused-MoE layers"}]
