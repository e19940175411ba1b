"""The `steermoe-profile/1` file format: one steering profile for one model, as JSON.

```json
{"format": "steermoe-profile/1", "name": "safety",
 "model": {"architecture": "OlmoeForCausalLM", "num_layers": 16, "num_experts": 64, "top_k": 8},
 "activate": {"3": [12, 40]}, "deactivate": {"5": [7]}, "bias": {"4": {"9": 1.5, "2": -0.8}},
 "eps": 0.01, "description": "...", "source": {...}}
```
LAYER keys are 0-based decoder-layer indices as vLLM numbers them; experts are 0-based.
`eps` is optional (the engine default applies). `bias` (optional) is graded steering: a real
value per expert added in log-softmax space (`vllm_patches.steering_math`), |value| at most
`MAX_BIAS`; an expert that a layer activates or deactivates takes no bias there. `tags` is an
optional list of labels (`lowers-safety` marks a profile that removes guardrails).

Steering that selects no expert at all (no activated, deactivated or biased expert in any layer,
e.g. `{}` or `{"activate": {"3": []}}`) is refused, inline in a request and as a profile alike:
it would change nothing, and a request that asked for steering must not silently run without
it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from expert_profiles.model_shape import ModelShape

PROFILE_FORMAT = "steermoe-profile/1"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_EPS = 100.0
# The largest |bias| of graded steering, in log-softmax space (e^50: beyond any router margin).
MAX_BIAS = 50.0
EMPTY_STEERING_MESSAGE = (
    "steering selects no experts: give at least one expert to activate, deactivate or bias"
)
# The pydantic error type of empty steering (`ValidationError.errors()[i]["type"]`).
EMPTY_STEERING_ERROR = "empty_steering"
# How deeply `source` may nest; deeper values could not be written back as JSON.
MAX_SOURCE_DEPTH = 32
# The longest layer key echoed in an error message.
_MAX_ECHO = 40


def is_profile_name(name: object) -> bool:
    """Whether `name` is a valid profile name (`NAME_PATTERN`: 1-64 letters, digits, '.', '_'
    or '-', starting with a letter or digit): never a path, `..` or anything but ASCII."""
    return isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) is not None


def describe_validation_error(exc: ValidationError, root: str) -> str:
    """A pydantic error as one line: `field.path: message; ...` (`root` when no field)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or root}: {err['msg']}" for err in exc.errors()
    )


class ProfileMismatchError(ValueError):
    """A profile does not fit the served model."""


class ProfileModel(BaseModel):
    """The model a profile was made for."""

    model_config = ConfigDict(extra="forbid")

    architecture: str
    num_layers: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)


ExpertSets = dict[int, list[int]]


def _index_key(key: Any, where: str, noun: str) -> int:
    """A layer or expert key: an int, or its decimal text (JSON object keys are text)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and re.fullmatch(r"0|[1-9][0-9]{0,8}", key):
        return int(key)
    raise ValueError(f"{where} key {_echo(key)} is not a decimal {noun} index")


def _normalise_sets(value: Any) -> ExpertSets:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("must be an object mapping layer index to a list of expert indices")
    out: ExpertSets = {}
    seen: set[int] = set()
    for layer, experts in value.items():
        layer_index = _index_key(layer, "layer", "layer")
        if layer_index in seen:
            raise ValueError(f"layer {layer_index} is listed twice")
        seen.add(layer_index)
        if layer_index < 0:
            raise ValueError(f"layer {layer_index} is negative")
        if not isinstance(experts, list) or not all(
            isinstance(e, int) and not isinstance(e, bool) for e in experts
        ):
            raise ValueError(f"layer {layer_index}: experts must be a list of integers")
        if len(set(experts)) != len(experts):
            raise ValueError(f"layer {layer_index}: an expert is listed twice")
        if any(e < 0 for e in experts):
            raise ValueError(f"layer {layer_index}: negative expert index")
        if experts:
            out[layer_index] = sorted(experts)
    return out


ExpertBias = dict[int, dict[int, float]]


def _normalise_bias(value: Any) -> ExpertBias:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("must be an object mapping layer index to {expert index: bias}")
    out: ExpertBias = {}
    for layer, experts in value.items():
        layer_index = _index_key(layer, "layer", "layer")
        if layer_index in out or layer_index < 0:
            raise ValueError(f"layer {layer_index} is listed twice or negative")
        if not isinstance(experts, dict):
            raise ValueError(f"layer {layer_index}: bias must map expert index to a number")
        row: dict[int, float] = {}
        for expert, bias in experts.items():
            expert_index = _index_key(expert, f"layer {layer_index}: expert", "expert")
            if expert_index in row:
                raise ValueError(f"layer {layer_index}: expert {expert_index} is listed twice")
            # |bias| first: a huge int compares exactly, while isfinite() would overflow.
            if not isinstance(bias, (int, float)) or isinstance(bias, bool) \
                    or not abs(bias) <= MAX_BIAS or not math.isfinite(bias):
                raise ValueError(f"layer {layer_index}: expert {expert_index}: bias must be a "
                                 f"finite number in [-{MAX_BIAS:g}, {MAX_BIAS:g}]")
            if bias != 0:
                row[expert_index] = float(bias)
        if row:
            out[layer_index] = dict(sorted(row.items()))
    return out


class ExpertSteering(BaseModel):
    """Experts to switch on and off, per decoder layer; the part of a profile the engine uses."""

    model_config = ConfigDict(extra="forbid")

    activate: ExpertSets = Field(default_factory=dict)
    deactivate: ExpertSets = Field(default_factory=dict)
    bias: ExpertBias = Field(default_factory=dict)
    eps: float | None = Field(default=None, gt=0, le=MAX_EPS)

    @field_validator("activate", "deactivate", mode="before")
    @classmethod
    def _check_sets(cls, value: Any) -> ExpertSets:
        return _normalise_sets(value)

    @field_validator("bias", mode="before")
    @classmethod
    def _check_bias(cls, value: Any) -> ExpertBias:
        return _normalise_bias(value)

    @model_validator(mode="after")
    def _no_overlap(self) -> ExpertSteering:
        for layer, experts in self.activate.items():
            both = set(experts) & set(self.deactivate.get(layer, []))
            if both:
                raise ValueError(
                    f"layer {layer}: experts {sorted(both)} are both activated and deactivated"
                )
        for layer, biased in self.bias.items():
            switched = set(self.activate.get(layer, [])) | set(self.deactivate.get(layer, []))
            both = sorted(switched & set(biased))
            if both:
                raise ValueError(f"layer {layer}: experts {both[:8]} are switched on or off and "
                                 "also biased")
        return self

    @model_validator(mode="after")
    def _selects_some_expert(self) -> ExpertSteering:
        if self.is_empty():
            raise PydanticCustomError(EMPTY_STEERING_ERROR, EMPTY_STEERING_MESSAGE)
        return self

    def is_empty(self) -> bool:
        """True if no expert is activated or deactivated.

        Validation refuses such steering, so this holds only for an instance built without
        validation (`model_construct`) or changed after it (assignment is not validated).
        """
        return not self.activate and not self.deactivate and not self.bias

    def check_shape(self, shape: ModelShape) -> None:
        """Raise ProfileMismatchError unless every layer and expert exists in `shape`."""
        moe_layers = set(shape.moe_layers)
        biased = {layer: sorted(row) for layer, row in self.bias.items()}
        for kind, sets in (("activate", self.activate), ("deactivate", self.deactivate),
                           ("bias", biased)):
            for layer, experts in sets.items():
                if not 0 <= layer < shape.num_layers:
                    raise ProfileMismatchError(
                        f"{kind}: layer {layer} does not exist "
                        f"(the model has {shape.num_layers} decoder layers)"
                    )
                if moe_layers and layer not in moe_layers:
                    raise ProfileMismatchError(
                        f"{kind}: decoder layer {layer} has no MoE block "
                        f"(MoE layers: {_ranges(sorted(moe_layers))})"
                    )
                bad = [e for e in experts if e >= shape.num_experts]
                if bad:
                    raise ProfileMismatchError(
                        f"{kind}: layer {layer} names experts {bad}, "
                        f"the model has {shape.num_experts} experts per layer"
                    )
        for layer, experts in self.deactivate.items():
            if len(experts) > shape.num_experts - shape.top_k:
                raise ProfileMismatchError(
                    f"deactivate: layer {layer} deactivates {len(experts)} of "
                    f"{shape.num_experts} experts; at least top-k ({shape.top_k}) must remain"
                )
        for layer, experts in self.activate.items():
            if len(experts) > shape.top_k:
                raise ProfileMismatchError(
                    f"activate: layer {layer} activates {len(experts)} experts, "
                    f"more than the model's top-k of {shape.top_k}"
                )

    def digest(self, default_eps: float) -> str:
        """A stable hash of what the engine applies (sets, bias and effective eps); steering
        without bias hashes as it did before bias existed."""
        payload: dict[str, Any] = {
            "activate": {str(k): v for k, v in sorted(self.activate.items())},
            "deactivate": {str(k): v for k, v in sorted(self.deactivate.items())},
            "eps": self.eps if self.eps is not None else default_eps,
        }
        if self.bias:
            payload["bias"] = {str(layer): {str(e): v for e, v in sorted(row.items())}
                               for layer, row in sorted(self.bias.items())}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class SteeringProfile(ExpertSteering):
    """One `steermoe-profile/1` file."""

    format: Literal["steermoe-profile/1"] = PROFILE_FORMAT
    name: str = Field(pattern=NAME_PATTERN)
    model: ProfileModel
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    source: dict[str, Any] = Field(default_factory=dict)

    @field_validator("source")
    @classmethod
    def _shallow_source(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _depth(value) > MAX_SOURCE_DEPTH:
            raise ValueError(f"nested more than {MAX_SOURCE_DEPTH} levels deep")
        return value

    @model_validator(mode="after")
    def _within_own_model(self) -> SteeringProfile:
        shape = ModelShape(
            self.model.architecture, self.model.num_layers, self.model.num_experts,
            self.model.top_k,
        )
        try:
            self.check_shape(shape)
        except ProfileMismatchError as exc:
            raise ValueError(str(exc)) from None
        return self

    def check_model(self, shape: ModelShape) -> None:
        """Raise ProfileMismatchError unless this profile was made for `shape`."""
        declared = (self.model.architecture, self.model.num_layers, self.model.num_experts,
                    self.model.top_k)
        served = (shape.architecture, shape.num_layers, shape.num_experts, shape.top_k)
        if declared != served:
            raise ProfileMismatchError(
                f"profile {self.name!r} is for {_describe(*declared)}, "
                f"but the served model is {_describe(*served)}"
            )
        self.check_shape(shape)

    def to_json(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if not data.get("bias"):
            data.pop("bias", None)
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (a scalar is 0); stops past the limit."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        deepest = max(deepest, level)
        if level <= MAX_SOURCE_DEPTH:
            stack.extend((child, level + 1) for child in children)
    return deepest


def _echo(value: Any) -> str:
    """`repr(value)`, cut to a length fit for an error message."""
    text = repr(value)
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."


def _describe(architecture: str, layers: int, experts: int, top_k: int) -> str:
    return f"{architecture} ({layers} layers, {experts} experts, top-{top_k})"


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)
