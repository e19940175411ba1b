"""The Hugging Face reference: a checkpoint's transformers model with the SteerMoE edit.

Test oracle for the engine. The model runs in float32 with eager attention and eager experts.
For every decoder layer named in `steering`, the router's logits are edited for every token,
and everything after the logits is the model's own routing code, unchanged. The edit happens
by intercepting the one `F.linear` call a router's forward makes (its logits GEMM) and
returning the edited row instead; the call count is checked.

What the edit is (SteerMoE, arXiv 2509.09660, and vllm_patches/ROUTERS.md), written here from
those definitions and independent of the engine's own edit code (`vllm_patches.steering_math`
is deliberately not imported). Per token, with router logits z over the experts:
- softmax routers (Qwen3/Qwen2-MoE, OLMoE, Mixtral, Granite-MoE, DeepSeek-V2 grouped) and
  GPT-OSS (top-k then softmax): s = log_softmax(z); activated experts get s = max(s) + eps,
  deactivated ones s = min(s) - eps; the router then runs its own softmax / top-k /
  renormalisation on the edited s.
- PhiMoE (sparsemixer, not shift invariant): the same edit on the raw logits z.
- DeepSeek-V3 (sigmoid + e_score_correction_bias, grouped): the same edit on z, and during the
  router call the layer's correction bias is raised by FORCING_BIAS (1e4) for activated experts
  and lowered by it for deactivated ones, so the model's own grouped selection always keeps
  activated experts and never picks deactivated ones; the weights stay the router's own
  (sigmoid of the edited logits, renormalised, scaled).
Graded steering (issue-level definition, vllm_patches/steering_math): with a strength lambda in
[0, 1] and a bias b per expert, in the same space: activated experts move to
(1 - lambda) * s + lambda * (max(s) + eps), deactivated ones to (1 - lambda) * s +
lambda * (min(s) - eps), biased ones to s + lambda * b. DeepSeek-V3's forcing bias applies only
at lambda = 1 (graded rows are routed by the model's own rule on the edited logits).
eps is raised per row to twice the logits' dtype resolution at the value it moves from
(ROUTERS.md): max(eps, 2 * finfo(dtype).eps * max(|v|, 1)), v = max (activate) or min
(deactivate) of the row being edited. In float32 this leaves eps = 0.01 as it is.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

# How steering is defined for a model type's router (vllm_patches/ROUTERS.md): the one place
# this reference keeps it. model_type -> (edit space, forcing correction bias). Edit space
# "log_softmax": the paper's edit on s = log_softmax(z); "logits": the same edit on the raw
# logits z (routers that are not shift invariant). Forcing bias: during the router call the
# correction bias moves by FORCING_BIAS for steered experts. Not listed: ("log_softmax", False).
ROUTER_EDITS: dict[str, tuple[str, bool]] = {
    "phimoe": ("logits", False),
    "deepseek_v3": ("logits", True),
}
FORCING_BIAS = 1.0e4

# {layer: (activate, deactivate)} or {layer: (activate, deactivate, {expert: bias})}
Steering = dict[int, tuple]

# Derived from ROUTER_EDITS.
Z_SPACE_MODEL_TYPES = {kind for kind, (space, _) in ROUTER_EDITS.items() if space == "logits"}
BIASED_MODEL_TYPES = {kind for kind, (_, biased) in ROUTER_EDITS.items() if biased}


@lru_cache(maxsize=4)
def _load(path: str, stamp: float) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    return model.eval()


def load_reference_model(checkpoint_dir: str | Path) -> Any:
    """The checkpoint's transformers model in float32, eager (cached while the files last)."""
    path = Path(checkpoint_dir).resolve()
    weights = path / "model.safetensors"
    return _load(str(path), weights.stat().st_mtime if weights.exists() else 0.0)


def _decoder_layers(model: Any) -> Any:
    return model.model.layers


def _router(layer: Any) -> Any | None:
    """The MoE router module of a decoder layer (class name contains 'Router'), or None."""
    routers = [m for m in layer.modules() if "router" in type(m).__name__.lower()]
    if len(routers) > 1:
        raise RuntimeError(f"several routers in one layer: {routers}")
    return routers[0] if routers else None


def effective_eps(eps: float, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ROUTERS.md: eps raised to twice `dtype`'s resolution at `value`, the value moved from."""
    resolution = 2.0 * torch.finfo(dtype).eps
    return torch.clamp(resolution * value.abs().clamp_min(1.0), min=eps)


def paper_edit(
    z: torch.Tensor, activate: list[int], deactivate: list[int], eps: float, *,
    on_log_probs: bool, bias: dict[int, float] | None = None, strength: float = 1.0,
) -> torch.Tensor:
    """The SteerMoE edit of router logits z [..., E], per token (row), in z's dtype.

    on_log_probs: edit s = log_softmax(z) (softmax routers, the paper); else edit z itself.
    Activated experts get max(row) + eps, deactivated ones min(row) - eps, others keep their
    value; max and min are those of the row before the edit. Graded (module docstring): the
    moves are scaled by `strength`, and `bias` is added (scaled) to its experts.
    """
    row = torch.log_softmax(z.float(), dim=-1) if on_log_probs else z.float()
    top = row.amax(dim=-1, keepdim=True)
    bottom = row.amin(dim=-1, keepdim=True)
    high = top + effective_eps(eps, top, z.dtype)
    low = bottom - effective_eps(eps, bottom, z.dtype)
    experts = torch.arange(row.shape[-1])
    on = torch.isin(experts, torch.tensor(activate, dtype=torch.long))
    off = torch.isin(experts, torch.tensor(deactivate, dtype=torch.long))
    if bool((on & off).any()):
        raise ValueError("an expert is both activated and deactivated")
    if strength != 1.0:
        high = (1.0 - strength) * row + strength * high
        low = (1.0 - strength) * row + strength * low
    shift = torch.zeros(row.shape[-1])
    for expert, value in (bias or {}).items():
        shift[expert] = strength * value
    return torch.where(on, high, torch.where(off, low, row + shift)).to(z.dtype)


def _edit_fn(model_type: str, activate: list[int], deactivate: list[int], eps: float,
             bias: dict[int, float], strength: float):
    on_log_probs = model_type not in Z_SPACE_MODEL_TYPES
    return lambda z: paper_edit(z, activate, deactivate, eps, on_log_probs=on_log_probs,
                                bias=bias, strength=strength)


@contextlib.contextmanager
def _first_linear_edited(edit) -> Iterator[list[int]]:
    """Within the block, `F.linear` returns `edit(logits)`; yields a one-item call counter."""
    functional = torch.nn.functional
    original = functional.linear
    calls = [0]

    def linear(input, weight, bias=None):  # noqa: A002 - torch's own argument names
        calls[0] += 1
        return edit(original(input, weight, bias))

    functional.linear = linear
    try:
        yield calls
    finally:
        functional.linear = original


@contextlib.contextmanager
def _steered(model: Any, steering: Steering | None, eps: float,
             strength: float = 1.0) -> Iterator[None]:
    """Patch the routers of the layers in `steering` for the duration of the block."""
    model_type = model.config.model_type
    patched: list[tuple[Any, Any | None]] = []
    try:
        for index, sets in sorted((steering or {}).items()):
            activate, deactivate = sets[0], sets[1]
            bias = sets[2] if len(sets) > 2 else {}
            layers = _decoder_layers(model)
            if not 0 <= index < len(layers):
                raise ValueError(f"layer {index} out of range (model has {len(layers)} layers)")
            router = _router(layers[index])
            if router is None:
                raise ValueError(f"layer {index} has no MoE router")
            edit = _edit_fn(model_type, list(activate), list(deactivate), eps, bias, strength)
            original_forward = router.forward
            saved_bias = None
            if model_type in BIASED_MODEL_TYPES and strength == 1.0:
                saved_bias = router.e_score_correction_bias.detach().clone()
                with torch.no_grad():
                    router.e_score_correction_bias[list(activate)] += FORCING_BIAS
                    router.e_score_correction_bias[list(deactivate)] -= FORCING_BIAS

            def forward(*args, _original=original_forward, _edit=edit, **kwargs):
                with _first_linear_edited(_edit) as calls:
                    out = _original(*args, **kwargs)
                if calls[0] != 1:
                    raise RuntimeError(f"router made {calls[0]} F.linear calls, expected 1")
                return out

            router.forward = forward
            patched.append((router, saved_bias))
        yield
    finally:
        for router, saved_bias in patched:
            del router.forward  # back to the class's forward
            if saved_bias is not None:
                with torch.no_grad():
                    router.e_score_correction_bias.copy_(saved_bias)


def _run(
    checkpoint_dir: str | Path, token_ids: list[int], steering: Steering | None, eps: float,
    strength: float = 1.0,
) -> tuple[torch.Tensor, np.ndarray]:
    model = load_reference_model(checkpoint_dir)
    layers = _decoder_layers(model)
    selections: dict[int, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(layers):
        router = _router(layer)
        if router is None:
            continue

        def capture(module, args, output, _index=index):
            # Routers return (logits, weights, ids) or, Granite, (ids, weights, logits).
            ids = [t for t in output if torch.is_tensor(t) and not t.is_floating_point()]
            selections[_index] = ids[0].reshape(-1, ids[0].shape[-1])

        hooks.append(router.register_forward_hook(capture))
    try:
        with torch.no_grad(), _steered(model, steering, eps, strength):
            logits = model(torch.tensor([list(token_ids)], dtype=torch.long)).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    routing = np.stack(
        [selections[i].sort(dim=-1).values.numpy() for i in sorted(selections)], axis=1
    )
    return logits.float(), routing


def hf_steered_logits(
    checkpoint_dir: str | Path,
    token_ids: list[int],
    steering: Steering | None,
    eps: float = 0.01,
    strength: float = 1.0,
) -> torch.Tensor:
    """Float32 logits [len(token_ids), vocab] of one forward pass with `steering` applied.

    steering: {decoder layer index: (experts to activate, experts to deactivate[, {expert:
    bias}])}, applied to every token at `strength`; None or {} runs the model unsteered. See
    the module docstring for the edit.
    """
    return _run(checkpoint_dir, token_ids, steering, eps, strength)[0]


def hf_routing(
    checkpoint_dir: str | Path,
    token_ids: list[int],
    steering: Steering | None,
    eps: float = 0.01,
    strength: float = 1.0,
) -> np.ndarray:
    """Selected expert ids [len(token_ids), num_moe_layers, top_k], sorted within each row.

    MoE layers in decoder-layer order (layers without a router, e.g. DeepSeek's dense first
    layers, are skipped), from the same forward pass as `hf_steered_logits`.
    """
    return _run(checkpoint_dir, token_ids, steering, eps, strength)[1]


def moe_layer_indices(checkpoint_dir: str | Path) -> list[int]:
    """Decoder layers of the transformers model that have a router (cross-check for tests)."""
    model = load_reference_model(checkpoint_dir)
    return [i for i, layer in enumerate(_decoder_layers(model)) if _router(layer) is not None]


def model_type(checkpoint_dir: str | Path) -> str:
    """model_type from config.json."""
    return json.loads((Path(checkpoint_dir) / "config.json").read_text())["model_type"]
