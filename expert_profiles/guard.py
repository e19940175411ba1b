"""Routing guards: a logistic regression over a prompt's prefill routing (`steermoe-guard/1`).

The experts a prompt's tokens are routed to reveal what the prompt is about. A guard scores a
prompt from its feature `prefill-expert-share/1`: for every MoE layer l and expert e, the share
of the prompt's tokens whose top-k in layer l contains e (`prefill_share`). The score is
`sigmoid(sum(weights * share) + intercept)`; the guard fires when the score reaches
`threshold`, and then stands for steering with its `profile`.

```json
{"format": "steermoe-guard/1", "name": "demo-guard",
 "model": {"architecture": "OlmoeForCausalLM", "num_layers": 4, "num_experts": 8, "top_k": 2},
 "moe_layers": [0, 1, 2, 3], "feature": "prefill-expert-share/1",
 "weights": [[...8 numbers...], ...one row per MoE layer...], "intercept": -1.5,
 "threshold": 0.5, "profile": "safety", "metrics": {...}, "source": {...}, "description": ""}
```

Guards live beside the profiles they trigger, as `PROFILE_DIR/guards/NAME.json` (profile
loaders list `PROFILE_DIR/*.json` only, so they never take a guard for a profile). They are
read as profile files are (`directory.load_model_file`: regular files only, symbolic links
followed, at most `MAX_PROFILE_BYTES`), written atomically, and every error names the guard,
never a path.

Training is plain numpy: `fit_logistic` (L2-penalised Newton steps on standardised features,
folded back so the saved weights score raw shares), `roc_auc`, `precision_recall`,
`youden_threshold`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from expert_profiles.atomic_files import write_atomic
from expert_profiles.directory import ProfileFileError, load_model_file
from expert_profiles.model_shape import ModelShape
from expert_profiles.schema import (
    MAX_SOURCE_DEPTH,
    NAME_PATTERN,
    ProfileMismatchError,
    ProfileModel,
    is_profile_name,
)

GUARD_FORMAT = "steermoe-guard/1"
GUARD_FEATURE = "prefill-expert-share/1"
GUARDS_DIR = "guards"
GUARD_SUFFIX = ".json"
MAX_WEIGHT = 1e6  # bound on |weight| and |intercept|
DEFAULT_L2 = 1.0
DEFAULT_MAX_ITER = 100


class GuardFileError(ValueError):
    """A guard file that cannot be used, with the reason (naming the guard, never a path)."""


class GuardNotFoundError(KeyError):
    """No guard of that name in the profile directory."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "guard not found"


class GuardExistsError(FileExistsError):
    """A guard of that name exists and overwriting was not asked for."""


class InvalidGuardNameError(ValueError):
    """A name that is not a valid guard name (and so never a path)."""


class RoutingCountError(ValueError):
    """A routing capture that cannot be counted."""


# ---- the feature ---------------------------------------------------------------------------


def count_routed_experts(expert_ids: np.ndarray, start: int, end: int,
                         num_experts: int) -> np.ndarray:
    """[MoE layer, expert] counts of top-k membership over token rows start..end-1.

    `expert_ids` is a routing capture [tokens, MoE layers, top_k]; a -1 in the span means the
    token was not computed (prefix cache) and is an error, as is an expert >= num_experts.
    """
    ids = np.asarray(expert_ids)
    rows = ids[start:end]
    if len(rows) != end - start:
        raise RoutingCountError(f"the routing capture has {len(ids)} rows, need {end}")
    if (rows < 0).any():
        raise RoutingCountError(
            "the routing capture has uncomputed tokens (-1): start the engine with "
            "enable_prefix_caching=False"
        )
    if (rows >= num_experts).any():
        raise RoutingCountError("the routing capture names an expert beyond the model's experts")
    num_layers = rows.shape[1]
    flat = (np.arange(num_layers)[None, :, None] * num_experts + rows).ravel()
    return np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def prefill_share(counts: np.ndarray, tokens: int) -> np.ndarray:
    """The feature `prefill-expert-share/1`: counts [MoE layer, expert] / prompt tokens.

    counts[l, e] is the number of the prompt's tokens whose top-k in MoE layer l holds e.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens <= 0:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be [MoE layers, experts], got shape {counts.shape}")
    if (counts < 0).any() or (counts > tokens).any():
        raise ValueError(f"counts must lie between 0 and the {tokens} prompt tokens")
    return counts.astype(np.float64) / float(tokens)


def guard_logit(weights: np.ndarray, intercept: float, counts: np.ndarray,
                tokens: int) -> float:
    """sum(weights * prefill_share(counts, tokens)) + intercept, in float64: the one scoring
    rule of a guard file and of the engine (`guard_spec.GuardSpec`)."""
    share = prefill_share(counts, tokens)
    if share.shape != weights.shape:
        raise ValueError(f"counts have shape {share.shape}, the guard wants {weights.shape}")
    return float(np.sum(weights * share)) + intercept


def sigmoid(z: float) -> float:
    """1 / (1 + e^-z) without overflow."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


# ---- the file ------------------------------------------------------------------------------


def _tree_problem(value: Any) -> str | None:
    """What is wrong with a JSON-like value (nested too deeply, a float not finite), or None."""
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return "holds a number that is not finite"
        children = list(item.values()) if isinstance(item, dict) else \
            list(item) if isinstance(item, (list, tuple)) else None
        if children is not None:
            if level >= MAX_SOURCE_DEPTH:
                return f"is nested more than {MAX_SOURCE_DEPTH} levels deep"
            stack.extend((child, level + 1) for child in children)
    return None


class GuardFile(BaseModel):
    """One `steermoe-guard/1` file: weights over the prefill expert shares, and a threshold."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    format: Literal["steermoe-guard/1"] = GUARD_FORMAT
    name: str = Field(pattern=NAME_PATTERN)
    model: ProfileModel
    moe_layers: list[int] = Field(min_length=1)
    feature: Literal["prefill-expert-share/1"] = GUARD_FEATURE
    weights: list[list[float]]
    intercept: float = Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)
    threshold: float = Field(gt=0.0, lt=1.0)
    profile: str = Field(pattern=NAME_PATTERN)
    metrics: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> GuardFile:
        layers = self.moe_layers
        if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
            raise ValueError("moe_layers must be sorted and must not repeat")
        if layers[0] < 0 or layers[-1] >= self.model.num_layers:
            raise ValueError(
                f"moe_layers must lie in 0..{self.model.num_layers - 1} "
                f"(the model has {self.model.num_layers} decoder layers)"
            )
        if len(self.weights) != len(layers):
            raise ValueError(f"weights has {len(self.weights)} rows, moe_layers {len(layers)}")
        for index, row in enumerate(self.weights):
            if len(row) != self.model.num_experts:
                raise ValueError(
                    f"weights row {index} has {len(row)} values, the model has "
                    f"{self.model.num_experts} experts"
                )
        if (np.abs(np.asarray(self.weights, dtype=np.float64)) > MAX_WEIGHT).any():
            raise ValueError(f"a weight exceeds {MAX_WEIGHT:g} in magnitude")
        for field_name in ("metrics", "source"):
            problem = _tree_problem(getattr(self, field_name))
            if problem:
                raise ValueError(f"{field_name} {problem}")
        return self

    def __eq__(self, other: object) -> bool:  # fields only (not the cached weight array)
        if not isinstance(other, GuardFile):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  (lists inside: not hashable)

    @cached_property
    def weight_array(self) -> np.ndarray:
        """The weights as a read-only float64 array [len(moe_layers), num_experts]."""
        weights = np.asarray(self.weights, dtype=np.float64)
        weights.flags.writeable = False
        return weights

    def logit(self, counts: np.ndarray, tokens: int) -> float:
        """sum(weights * prefill_share(counts, tokens)) + intercept, in float64."""
        return guard_logit(self.weight_array, self.intercept, counts, tokens)

    def score(self, counts: np.ndarray, tokens: int) -> float:
        """The probability that the guard should fire for a prompt of `tokens` tokens whose
        routing gave `counts` [MoE layer, expert] (see `prefill_share`)."""
        return sigmoid(self.logit(counts, tokens))

    def fires(self, score: float) -> bool:
        """Whether a score reaches the threshold."""
        return score >= self.threshold

    def check_model(self, shape: ModelShape) -> None:
        """Raise ProfileMismatchError unless this guard was made for `shape`."""
        m = self.model
        declared = (m.architecture, m.num_layers, m.num_experts, m.top_k)
        served = (shape.architecture, shape.num_layers, shape.num_experts, shape.top_k)
        if declared != served:
            raise ProfileMismatchError(
                f"guard {self.name!r} is for {declared[0]} ({m.num_layers} layers, "
                f"{m.num_experts} experts, top-{m.top_k}), but the model is {served[0]} "
                f"({shape.num_layers} layers, {shape.num_experts} experts, top-{shape.top_k})"
            )
        if shape.moe_layers and tuple(self.moe_layers) != tuple(shape.moe_layers):
            raise ProfileMismatchError(
                f"guard {self.name!r} scores MoE layers {self.moe_layers}, the model has "
                f"{list(shape.moe_layers)}"
            )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


# ---- storage -------------------------------------------------------------------------------


def guard_path(profile_dir: str | Path, name: str) -> Path:
    """PROFILE_DIR/guards/NAME.json; InvalidGuardNameError unless `name` is a valid name."""
    if not is_profile_name(name):
        raise InvalidGuardNameError(
            f"invalid guard name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return Path(profile_dir) / GUARDS_DIR / f"{name}{GUARD_SUFFIX}"


def list_guards(profile_dir: str | Path) -> list[str]:
    """Names of the guard files in PROFILE_DIR/guards (valid or not), sorted."""
    directory = Path(profile_dir) / GUARDS_DIR
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob(f"*{GUARD_SUFFIX}") if is_profile_name(p.stem))


def save_guard(profile_dir: str | Path, guard: GuardFile, *, overwrite: bool = False) -> Path:
    """Write PROFILE_DIR/guards/NAME.json atomically; GuardExistsError unless `overwrite`."""
    checked = GuardFile.model_validate(guard.model_dump())
    path = guard_path(profile_dir, checked.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, checked.to_json().encode("utf-8"), overwrite=overwrite)
    except FileExistsError:
        raise GuardExistsError(
            f"guard {checked.name!r} already exists (overwrite it explicitly)") from None
    return path


def load_guard(profile_dir: str | Path, name: str) -> GuardFile:
    """The guard `name` of a profile directory.

    GuardNotFoundError if there is none, GuardFileError if its file cannot be used (not a
    regular file, too large, not JSON, invalid, or named otherwise inside).
    """
    path = guard_path(profile_dir, name)
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise GuardNotFoundError(f"no guard {name!r} in the profile directory") from None
    except OSError:
        pass  # there may be something; reading it says what is wrong
    try:
        guard = load_model_file(path, GuardFile, "guard")
    except ProfileFileError as exc:
        reason = str(exc).removeprefix(f"{path.name}: ")
        raise GuardFileError(f"guard {name!r}: {reason}") from None
    if guard.name != name:
        raise GuardFileError(f"guard {name!r}: the file names the guard {guard.name!r}")
    return guard


# ---- training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogisticFit:
    """A fitted logistic regression on raw features: P(y=1 | x) = sigmoid(x . w + b)."""

    weights: np.ndarray
    intercept: float
    iterations: int
    converged: bool


def _penalised_loss(Z: np.ndarray, y: np.ndarray, beta: np.ndarray, l2: float) -> float:
    z = Z @ beta
    # sum(log(1 + e^z) - y z), stably
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * beta[1:] @ beta[1:])


def fit_logistic(X: np.ndarray, y: np.ndarray, *, l2: float = DEFAULT_L2,
                 max_iter: int = DEFAULT_MAX_ITER, tol: float = 1e-9) -> LogisticFit:
    """Minimise sum(log-loss) + l2/2 * |w|^2 by damped Newton steps (deterministic).

    Features are standardised for the fit (the penalty applies to standardised weights; the
    intercept is not penalised) and the result is folded back: the returned weights and
    intercept score raw features. A feature constant over X gets weight 0.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be [samples, features] and y [samples], got {X.shape} and "
                         f"{y.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X holds a number that is not finite")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not (math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be a positive number, got {l2!r}")
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    constant = std <= 1e-12 * np.maximum(1.0, np.abs(mean))
    scale = np.where(constant, 1.0, std)
    Z = np.hstack([np.ones((X.shape[0], 1)), np.where(constant, 0.0, (X - mean) / scale)])
    ridge = np.full(Z.shape[1], l2)
    ridge[0] = 1e-12  # the intercept is not penalised; keeps the Hessian invertible
    beta = np.zeros(Z.shape[1])
    loss = _penalised_loss(Z, y, beta, l2)
    converged = False
    iterations = 0
    while iterations < max_iter and not converged:
        iterations += 1
        p = np.exp(-np.logaddexp(0.0, -(Z @ beta)))
        gradient = Z.T @ (p - y) + ridge * beta
        hessian = (Z * (p * (1.0 - p))[:, None]).T @ Z + np.diag(ridge)
        step = np.linalg.solve(hessian, gradient)
        size = 1.0
        new_loss = _penalised_loss(Z, y, beta - step, l2)
        while new_loss > loss and size > 1e-10:  # damped: halve until the loss does not grow
            size /= 2.0
            new_loss = _penalised_loss(Z, y, beta - size * step, l2)
        if new_loss > loss:  # no descent left: at the optimum, up to rounding
            converged = bool(np.max(np.abs(step)) < math.sqrt(tol))
            break
        beta, loss = beta - size * step, new_loss
        converged = bool(np.max(np.abs(size * step)) < tol)
    weights = np.where(constant, 0.0, beta[1:] / scale)
    intercept = float(beta[0] - np.sum(np.where(constant, 0.0, beta[1:] * mean / scale)))
    return LogisticFit(weights, intercept, iterations, converged)


def _binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError("scores and labels must be 1-D and of equal length")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(scores).all():
        raise ValueError("a score is not finite")
    return scores, labels.astype(bool)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2.

    ValueError unless both labels occur.
    """
    scores, positive = _binary(scores, labels)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both labels")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts of a threshold (fires when score >= threshold): tp, fp, tn, fn."""
    scores, positive = _binary(scores, labels)
    fired = scores >= threshold
    return {"tp": int((fired & positive).sum()), "fp": int((fired & ~positive).sum()),
            "tn": int((~fired & ~positive).sum()), "fn": int((~fired & positive).sum())}


def precision_recall(scores: np.ndarray, labels: np.ndarray,
                     threshold: float) -> tuple[float, float]:
    """(precision, recall) of firing when score >= threshold; 0.0 where undefined (nothing
    fired, or no positive)."""
    c = confusion(scores, labels, threshold)
    fired, positives = c["tp"] + c["fp"], c["tp"] + c["fn"]
    return (c["tp"] / fired if fired else 0.0, c["tp"] / positives if positives else 0.0)


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold in (0, 1) that maximises Youden's J = recall - false positive rate.

    Among the distinct scores (candidate cut: fire at or above it) the best one is taken,
    the highest on ties; the threshold is the midpoint between it and the next lower score
    (or 0), so both stay on their side. ValueError unless both labels occur.
    """
    scores, positive = _binary(scores, labels)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("choosing a threshold needs both labels")
    if ((scores < 0) | (scores > 1)).any():
        raise ValueError("scores must be probabilities")
    cuts = np.unique(scores)[::-1]
    tpr = np.array([(positive & (scores >= c)).sum() for c in cuts]) / n_pos
    fpr = np.array([(~positive & (scores >= c)).sum() for c in cuts]) / n_neg
    best = int(np.argmax(tpr - fpr))
    lower = cuts[best + 1] if best + 1 < len(cuts) else 0.0
    return float(min(max((cuts[best] + lower) / 2.0, 1e-12), 1.0 - 1e-12))


def split_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """roc_auc (None with one label only), precision, recall and counts at `threshold`."""
    scores, positive = _binary(scores, labels)
    precision, recall = precision_recall(scores, positive, threshold)
    has_both = 0 < positive.sum() < len(positive)
    return {
        "roc_auc": roc_auc(scores, positive) if has_both else None,
        "precision": precision, "recall": recall, "threshold": threshold,
        "counts": {"positive": int(positive.sum()), "negative": int((~positive).sum()),
                   **confusion(scores, positive, threshold)},
    }


__all__ = [
    "DEFAULT_L2",
    "GUARDS_DIR",
    "GUARD_FEATURE",
    "GUARD_FORMAT",
    "GuardExistsError",
    "GuardFile",
    "GuardFileError",
    "GuardNotFoundError",
    "InvalidGuardNameError",
    "LogisticFit",
    "MAX_WEIGHT",
    "RoutingCountError",
    "confusion",
    "count_routed_experts",
    "fit_logistic",
    "guard_path",
    "list_guards",
    "load_guard",
    "precision_recall",
    "prefill_share",
    "roc_auc",
    "save_guard",
    "sigmoid",
    "split_metrics",
    "youden_threshold",
]
