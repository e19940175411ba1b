"""How the registered ops find a layer's steering: by the name vLLM registers the MoE layer
under, in the forward context of the step being run.

vLLM registers every MoE layer (`MoERunner`, under its prefix `layer_name`, e.g.
`model.layers.7.mlp.experts`) in `compilation_config.static_forward_context`, which each
forward pass exposes as `get_forward_context().no_compile_layers` (0.26 and 0.32, GPU and CPU
runners; vLLM's `moe_forward` op finds its layer this way). The worker hook puts the layer's
steering on the layer (`STEERING_ATTR`), so an op given the layer name reaches the steering of
the engine running the step, and nothing is kept in a module global.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

# The attribute of a vLLM MoE layer that holds its steering (`LayerSteering`, or the fused
# routing that wraps it): what `MoERunner._maybe_dispatch` calls and what the ops read.
STEERING_ATTR = "_steermoe"


def steering_of_layer(layer_name: str) -> Any:
    """The steering of the MoE layer registered as `layer_name` in the current forward pass:
    an object with the engine's `flags` and the layer's `rerouter`."""
    return getattr(_get_forward_context()().no_compile_layers[layer_name], STEERING_ATTR)


@functools.cache
def _get_forward_context() -> Callable[[], Any]:
    """vLLM's `get_forward_context` (imported once: the ops call it on every run)."""
    from vllm.forward_context import get_forward_context

    return get_forward_context


@contextlib.contextmanager
def forward_context_of(*layer_steerings: Any,
                       layers: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """A forward context for calling the ops outside an engine (tests, benchmarks): its
    layers are `layers` (kept as given: add to it later), plus a stand-in MoE layer for each
    of `layer_steerings`, found under its `layer_name`. Yields the layers."""
    from types import SimpleNamespace

    from vllm.forward_context import ForwardContext, override_forward_context

    layers = layers if layers is not None else {}
    for steering in layer_steerings:
        layers[steering.layer_name] = SimpleNamespace(**{STEERING_ATTR: steering})
    context = ForwardContext(no_compile_layers=layers, attn_metadata={}, slot_mapping={})
    with override_forward_context(context):
        yield layers
