"""Front-end hooks (the process that accepts requests: the API server, or `LLM`'s process):
each `InputProcessor` gets its own `FrontendSteering`, which resolves the steering of every
request entering that engine before vLLM assigns its request id.

vLLM 0.26 and 0.32: `InputProcessor(vllm_config, ...)` is built by `AsyncLLM` / `LLMEngine` as
their `input_processor`, which calls `self.input_processor.assign_request_id(request)` for each
request (declared a staticmethod; the hook makes it a method, so it sees its instance).
`frontend_of(input_processor)` gives the steering of one engine (`AsyncLLM.input_processor`).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from expert_profiles import request_steering as rs
from expert_profiles.model_shape import ModelShape, shape_from_hf_config
from vllm_patches.steering_table import applicable_problem
from vllm_patches.vllm_compat import engine_info_path

logger = logging.getLogger("steermoe")


# The attribute of an `InputProcessor` that holds its `FrontendSteering`.
FRONTEND_ATTR = "_steermoe_frontend"


class FrontendSteering:
    """Resolves the steering of requests entering one engine (one per `InputProcessor`)."""

    def __init__(self, hf_config: Any, info_path: Path | None = None):
        self.shape: ModelShape | None = shape_from_hf_config(hf_config)
        self.info_path = info_path
        self.profiles = rs.ProfileCache(os.environ.get(rs.PROFILE_DIR_ENV))
        self.eps = rs.default_eps()
        self._info_key: tuple[int, int] | None = None
        self._info: dict[str, Any] | None = None

    def engine_info(self) -> dict[str, Any] | None:
        """What the engine's workers found at load time (written to the runtime dir)."""
        path = self.info_path
        if path is None:
            return None
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        key = (stat.st_mtime_ns, stat.st_size)
        if key != self._info_key:
            self._info = json.loads(path.read_text())
            self._info_key = key
        return self._info

    def served_shape(self) -> tuple[ModelShape | None, str | None]:
        """The shape to check profiles against, and why the model cannot be steered (if so)."""
        info = self.engine_info()
        if self.shape is None:
            return None, "the served model has no Mixture-of-Experts layers to steer"
        if info is None:
            return self.shape, None
        if not info.get("steerable"):
            return self.shape, f"this model cannot be steered: {info.get('reason')}"
        shape = ModelShape(
            self.shape.architecture, self.shape.num_layers, int(info["num_experts"]),
            int(info["top_k"]), tuple(info["moe_layers"]),
        )
        return shape, None

    def apply(self, request: Any) -> None:
        """Resolve and attach steering to an EngineCoreRequest; raises SteeringRequestError.

        The request keys are replaced by the resolved steering (the engine never sees them).
        Under `steermoe serve` (a server key is set) steering must carry the steering layer's
        mark, and the layer sends the expert sets it resolved itself, so what its policy checked
        is what runs, even if the profile file changes meanwhile. Every request's prefix-cache
        salt is rewritten (`salted`), steered or not, so no client salt can reach the salt of
        steering the client did not get.
        """
        params = getattr(request, "sampling_params", None)
        extra = dict(getattr(params, "extra_args", None) or {})
        key = rs.server_key()
        marked = key is not None and any(name in extra for name in rs.MARKED_KEYS)
        if marked:
            rs.check_mark(key, extra)
        kept = {name: value for name, value in extra.items()
                if name not in rs.REQUEST_KEYS and name not in rs.RESERVED_KEYS}
        steering = self._steering(extra if marked else
                                  {k: v for k, v in extra.items() if k in rs.REQUEST_KEYS})
        if rs.wants_capture({k: v for k, v in extra.items() if k == rs.CAPTURE_KEY}):
            kept[rs.CAPTURE_KEY] = True
            kept[rs.CAPTURE_ID_KEY] = request.request_id
        if steering is not None:
            kept[rs.RESOLVED_KEY] = steering.to_extra_args()
            if steering.guard is not None:  # its decision is fetched under the caller's id
                if int(getattr(params, "n", 1) or 1) > 1:
                    raise rs.SteeringRequestError(
                        "a guard decides per sequence: steering_guard needs n=1",
                        param=rs.GUARD_KEY)
                kept[rs.GUARD_ID_KEY] = request.request_id
        digest = steering.digest if steering is not None else None
        if steering is not None and steering.guard is not None:
            # A guard scores the routing of every prompt token: none may come from the prefix
            # cache, so a guarded request shares no KV blocks with any other request (a fresh
            # nonce: two requests may carry the same caller-chosen id).
            digest = f"{digest}:{uuid.uuid4().hex}"
        request.cache_salt = rs.salted(request.cache_salt, digest)
        if params is not None and extra:
            params.extra_args = kept or None

    def _steering(self, fields: dict[str, Any]) -> rs.ResolvedSteering | None:
        """The resolved steering of a request's (trusted) fields, checked against the engine."""
        given = {name: fields[name] for name in (rs.PROFILE_KEY, rs.INLINE_KEY, rs.GUARD_KEY,
                                                 rs.STRENGTH_KEY) if name in fields}
        wire = fields.get(rs.RESOLVED_KEY)
        if wire is None and not given:
            return None
        if wire is not None and given:
            raise rs.SteeringRequestError("give either resolved steering or request keys")
        shape, reason = self.served_shape()
        if wire is not None:
            steering = rs.resolved_from_wire(wire)
            shape = rs.require_steerable(shape, reason)
        else:
            steering = rs.resolve_request(given, shape, self.profiles, self.eps, reason)
        if steering is not None and shape is not None:
            # The worker's own check: what passes here, the worker can apply.
            problem = applicable_problem(steering, shape.moe_layers, shape.num_experts,
                                         shape.top_k)
            if problem is None and steering.guard is not None:
                problem = steering.guard.problem(list(shape.moe_layers), shape.num_experts)
                stages = [layers for layers in (self.engine_info() or {}).get("stage_layers", [])
                          if layers]
                if problem is None and len(stages) > 1:
                    problem = ("a guard needs every MoE layer in one worker; this engine splits "
                               "them over pipeline stages")
            if problem is not None:
                raise rs.SteeringRequestError(f"steering cannot be applied: {problem}")
        return steering


def frontend_of(input_processor: Any) -> FrontendSteering | None:
    """The `FrontendSteering` of one engine's input processor (`AsyncLLM.input_processor`,
    `LLMEngine.input_processor`); None without the plugin's hooks."""
    return getattr(input_processor, FRONTEND_ATTR, None)


def install_frontend_hooks() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original_init = InputProcessor.__init__
    original_assign = InputProcessor.assign_request_id

    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        setattr(self, FRONTEND_ATTR, FrontendSteering(vllm_config.model_config.hf_config,
                                                      engine_info_path(vllm_config)))

    def assign_request_id(self, request):
        frontend = frontend_of(self)
        if frontend is not None:
            try:
                frontend.apply(request)
            except Exception as exc:  # a request's steering must fail that request alone
                from vllm.exceptions import VLLMValidationError

                if not isinstance(exc, rs.SteeringRequestError):
                    logger.exception("steermoe: steering of request %s failed", request.request_id)
                    exc = rs.SteeringRequestError("the request's steering could not be processed")
                raise VLLMValidationError(str(exc), parameter="steering") from exc
        original_assign(request)

    InputProcessor.__init__ = __init__
    InputProcessor.assign_request_id = assign_request_id
