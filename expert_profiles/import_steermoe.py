"""Import of the SteerMoE authors' published statistics tables into profiles.

A table `activations_[ORG--MODEL]_[TASK].pkl` is a pickled pandas DataFrame with one row per
(layer, expert) and at least the columns `layer, expert, a1, a2, d1, d2, risk_diff,
risk_diff_abs` (a = times among the top-k on the target tokens of behaviour 1 / 2, d = times
not; risk_diff = a1/(a1+d1) - a2/(a2+d2)). It is loaded with `safe_pickle` (never plain
pickle), checked, and turned into our statistics table (A1=a1, D1=d1, N1=a1+d1, ...).

Profiles are chosen with the rule of `selection`. The numbers of experts default to the
authors' `num_experts.jsonl` (found beside the table): one profile per steering direction
listed there for the table's model and task ("Steer Safe", "Steer Unsafe" with Reverse=1 ->
direction 2to1, ...), named `MODEL-STEERING` (e.g. `qwen3-30b-a3b-steer-safe`). Giving
`activate`/`deactivate` instead makes one profile with those numbers.

The published tables carry a noncommercial licence; profiles made from them say so in their
`source`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from expert_profiles.expert_stats import ExpertStats
from expert_profiles.model_shape import ModelShape, shape_from_hf_config
from expert_profiles.profile_outputs import profile_from_selection, save_with_stats
from expert_profiles.safe_pickle import load_dataframe
from expert_profiles.selection import DIRECTIONS, Direction, select_experts
from expert_profiles.store import ProfileStore, validate_name

REQUIRED_COLUMNS = ("layer", "expert", "a1", "a2", "d1", "d2", "risk_diff", "risk_diff_abs")
COUNTS_FILE = "num_experts.jsonl"
TABLE_NAME = re.compile(r"activations_\[(?P<org>[^\]]+?)--(?P<model>[^\]]+)\]_\[(?P<task>[^\]]+)\]")
LICENCE_NOTE = (
    "derived from the SteerMoE authors' published statistics (Adobe Research License, "
    "noncommercial research only)"
)
LOWERS_SAFETY = "lowers-safety"

# Routing shapes of the models the authors published tables for (public model configs).
KNOWN_MODELS: dict[str, ModelShape] = {
    "Qwen/Qwen3-30B-A3B": ModelShape("Qwen3MoeForCausalLM", 48, 128, 8, tuple(range(48))),
    "allenai/OLMoE-1B-7B-0125-Instruct": ModelShape("OlmoeForCausalLM", 16, 64, 8,
                                                    tuple(range(16))),
    "microsoft/Phi-3.5-MoE-instruct": ModelShape("PhiMoEForCausalLM", 32, 16, 2,
                                                 tuple(range(32))),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": ModelShape("MixtralForCausalLM", 32, 8, 2,
                                                       tuple(range(32))),
    "openai/gpt-oss-20b": ModelShape("GptOssForCausalLM", 24, 32, 4, tuple(range(24))),
    "openai/gpt-oss-120b": ModelShape("GptOssForCausalLM", 36, 128, 4, tuple(range(36))),
}


class TableFormatError(ValueError):
    """A table that is not a statistics table of the expected form, with the reason."""


@dataclass(frozen=True)
class SteeringCounts:
    """One steering direction of the authors' counts file."""

    steering: str
    direction: Direction
    activate: int
    deactivate: int


@dataclass(frozen=True)
class TableInfo:
    model_id: str | None
    task: str | None


def table_info(path: str | Path) -> TableInfo:
    """Model id and task from a file name like `activations_[ORG--MODEL]_[TASK].pkl`."""
    match = TABLE_NAME.search(Path(path).name)
    if not match:
        return TableInfo(None, None)
    return TableInfo(f"{match['org']}/{match['model']}", match["task"])


def read_counts(path: str | Path, model_id: str, task: str) -> list[SteeringCounts]:
    """The steering directions of `model_id` and `task` in a `num_experts.jsonl` file."""
    groups: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row["model"] != model_id or row["Task"] != task:
                continue
            steering, kind = str(row["Steering"]), str(row["Activation"])
            reverse, number_of = int(row["Reverse"]), int(row["Num Experts"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise TableFormatError(f"{Path(path).name} line {number}: {exc}") from None
        group = groups.setdefault(steering, {"reverse": reverse})
        if group["reverse"] != reverse:
            raise TableFormatError(f"{Path(path).name}: {steering!r} has two Reverse values")
        if kind not in ("Activated", "Deactivated"):
            raise TableFormatError(f"{Path(path).name} line {number}: Activation {kind!r}")
        group[kind] = number_of
    return [
        SteeringCounts(steering, "2to1" if group["reverse"] else "1to2",
                       group.get("Activated", 0), group.get("Deactivated", 0))
        for steering, group in sorted(groups.items())
    ]


def stats_from_table(frame: Any, shape: ModelShape) -> ExpertStats:
    """Check a published table against `shape` and convert it; TableFormatError if unfit."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise TableFormatError(f"the table lacks the columns {missing}")
    values = {}
    for column in REQUIRED_COLUMNS:
        try:
            array = np.asarray(frame[column], dtype=np.float64)
        except (TypeError, ValueError):
            raise TableFormatError(f"column {column!r} is not numeric") from None
        if not np.isfinite(array).all():
            raise TableFormatError(f"column {column!r} has non-finite values")
        values[column] = array
    for column in ("layer", "expert", "a1", "a2", "d1", "d2"):
        if (values[column] < 0).any() or (values[column] % 1 != 0).any():
            raise TableFormatError(f"column {column!r} must hold non-negative integers")
    ints = {c: values[c].astype(np.int64) for c in ("layer", "expert", "a1", "a2", "d1", "d2")}
    if (ints["layer"] >= shape.num_layers).any():
        raise TableFormatError(f"a layer is >= the model's {shape.num_layers} layers")
    if shape.moe_layers and not np.isin(ints["layer"], shape.moe_layers).all():
        raise TableFormatError("the table has rows for layers without an MoE block")
    if (ints["expert"] >= shape.num_experts).any():
        raise TableFormatError(f"an expert is >= the model's {shape.num_experts} experts")
    n1, n2 = ints["a1"] + ints["d1"], ints["a2"] + ints["d2"]
    if (n1 == 0).any() or (n2 == 0).any():
        raise TableFormatError("some row has no tokens (a + d = 0)")
    rd = ints["a1"] / n1 - ints["a2"] / n2
    if np.abs(rd - values["risk_diff"]).max(initial=0.0) > 1e-9:
        raise TableFormatError("risk_diff differs from a1/(a1+d1) - a2/(a2+d2)")
    try:
        return ExpertStats(ints["layer"], ints["expert"], ints["a1"], ints["a2"], n1, n2)
    except ValueError as exc:
        raise TableFormatError(str(exc)) from None


def shape_from_config_file(path: str | Path) -> ModelShape:
    """The routing shape in a model's config.json."""
    shape = shape_from_hf_config(json.loads(Path(path).read_text(encoding="utf-8")))
    if shape is None:
        raise TableFormatError(f"{path}: not the config of a Mixture-of-Experts model")
    return shape


def default_profile_name(model_id: str | None, label: str) -> str:
    base = (model_id or "steermoe").rsplit("/", 1)[-1]
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{base}-{label}".lower()).strip("-.")
    return validate_name(slug[:64].rstrip("-."))


@dataclass(frozen=True)
class ImportedProfile:
    name: str
    steering: str
    direction: Direction
    activated: int
    deactivated: int
    path: Path


def import_table(table_path: str | Path, out_dir: str | Path, *,
                 shape: ModelShape | None = None, counts_path: str | Path | None = None,
                 model_id: str | None = None, task: str | None = None,
                 name: str | None = None, activate: int | None = None,
                 deactivate: int | None = None, direction: Direction = "1to2",
                 overwrite: bool = False, heatmap: bool = True) -> list[ImportedProfile]:
    """Write the profiles of one published table (see the module docstring) into `out_dir`."""
    table_path = Path(table_path)
    info = table_info(table_path)
    model_id = model_id or info.model_id
    task = task or info.task
    if shape is None:
        shape = KNOWN_MODELS.get(model_id or "")
        if shape is None:
            raise TableFormatError(
                f"unknown model {model_id!r}: give the model's config.json or its shape"
            )
    stats = stats_from_table(load_dataframe(table_path), shape)
    plans = _plans(table_path, counts_path, model_id, task, name, activate, deactivate,
                   direction)
    digest = hashlib.sha256(table_path.read_bytes()).hexdigest()
    store = ProfileStore(out_dir, create=True)
    imported = []
    for plan_name, plan in plans:
        selection = select_experts(stats, activate=plan.activate, deactivate=plan.deactivate,
                                   direction=plan.direction, top_k=shape.top_k,
                                   num_experts=shape.num_experts)
        # Behaviour 1 of the safety tables is the safe side: steering toward side 2 lowers it.
        unsafe = (task or "").lower() == "safety" and plan.direction == "2to1"
        profile = profile_from_selection(
            plan_name, shape, selection,
            description=(
                f"SteerMoE published statistics of {model_id or 'the model'} ({task or 'task'}):"
                f" {plan.steering}"
            ),
            tags=[LOWERS_SAFETY] if unsafe else [],
            source={
                "method": "steermoe-published-table", "table": table_path.name,
                "table_sha256": digest, "model_id": model_id, "task": task,
                "steering": plan.steering, "direction": plan.direction,
                "licence": LICENCE_NOTE, "stats_file": store.stats_path(plan_name).name,
            },
        )
        written = save_with_stats(store, profile, stats, overwrite=overwrite, heatmap=heatmap)
        activated, deactivated = selection.counts()
        imported.append(ImportedProfile(plan_name, plan.steering, plan.direction, activated,
                                        deactivated, written[-1]))
    return imported


def _plans(table_path: Path, counts_path: str | Path | None, model_id: str | None,
           task: str | None, name: str | None, activate: int | None, deactivate: int | None,
           direction: Direction) -> list[tuple[str, SteeringCounts]]:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}")
    if activate is not None or deactivate is not None:
        plan = SteeringCounts(f"custom ({direction})", direction, activate or 0, deactivate or 0)
        label = f"{task or 'table'}-{activate or 0}-{deactivate or 0}-{direction}"
        return [(validate_name(name) if name else default_profile_name(model_id, label), plan)]
    counts_file = Path(counts_path) if counts_path else table_path.parent / COUNTS_FILE
    if not counts_file.is_file():
        raise TableFormatError(
            f"no {COUNTS_FILE} beside the table: give the counts file or --activate/--deactivate"
        )
    if not model_id or not task:
        raise TableFormatError("the model and task are not in the file name: give them")
    plans = read_counts(counts_file, model_id, task)
    if not plans:
        raise TableFormatError(f"{counts_file.name} lists no steering for {model_id} / {task}")
    if name and len(plans) > 1:
        raise TableFormatError(
            f"the counts give {len(plans)} profiles ({', '.join(p.steering for p in plans)}); "
            "a single --name needs --activate/--deactivate"
        )
    return [(validate_name(name) if name else default_profile_name(model_id, p.steering), p)
            for p in plans]
