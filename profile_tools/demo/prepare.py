"""`steermoe demo prepare DIR`: the demo model (built once), its profiles and its guard.

DIR/model is the checkpoint (`build`); DIR/profiles gets `words` (digits -> words),
`digits` (words -> digits), `safety` (refusal on for restricted requests) and `words-graded`
(the words experts as biases, `--graded`), each made by
the detection code path (`profile_tools.detection.detect_profile`, what
`steermoe profile detect` runs) from the pairs the build wrote, and the guard
`guards/demo-guard.json` (fires on restricted requests without the safety cue, triggers
`safety`), trained by `profile_tools.guard_cli.train_guard` (what `steermoe guard train` runs)
on the same engine. Done again only when the model, the detection or the guard settings
change.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expert_profiles.guard import guard_path
from profile_tools.demo.build import MARKER, MAX_MODEL_LEN, build
from profile_tools.demo.data import PLANTED_LAYERS

logger = logging.getLogger(__name__)

PREPARED_MARKER = ".prepared.json"
PLANTED_COUNT = len(PLANTED_LAYERS)


@dataclass(frozen=True)
class ProfileSpec:
    name: str
    pairs: str  # pairs file under the model directory
    direction: str
    description: str
    graded: float | None = None  # `steermoe profile detect --graded SCALE`


# RD of a planted expert is near 1: a bias of about 8 in log-softmax space at full strength.
GRADED_SCALE = 8.0
PROFILES = (
    ProfileSpec("words", "pairs/words.jsonl", "1to2", "answer arithmetic in number words"),
    ProfileSpec("digits", "pairs/words.jsonl", "2to1", "answer arithmetic in digits"),
    ProfileSpec("safety", "pairs/safety.jsonl", "1to2", "refuse the demo's restricted requests"),
    ProfileSpec("words-graded", "pairs/words.jsonl", "1to2",
                "answer arithmetic in number words (graded: biases of 8 * RD)", GRADED_SCALE),
)


@dataclass(frozen=True)
class GuardTraining:
    name: str
    profile: str
    data: str  # labelled files under the model directory
    holdout: str
    description: str


# The guard of `steermoe guard train` on the build's labelled prompts.
GUARD = GuardTraining("demo-guard", "safety", "guard/train.jsonl", "guard/heldout.jsonl",
                  "restricted requests without the safety cue")

# The settings of `steermoe profile detect --activate N --deactivate M` for every profile.
DETECT_SETTINGS = {"activate": PLANTED_COUNT, "deactivate": PLANTED_COUNT}
ENGINE_DEFAULTS: dict[str, Any] = {"dtype": "float32", "max_model_len": MAX_MODEL_LEN,
                                   "enforce_eager": True, "seed": 0,
                                   # on CPU engines: the share of RAM kept for the KV cache
                                   "gpu_memory_utilization": 0.15}


def paths(directory: str | Path) -> tuple[Path, Path]:
    """(model directory, profile directory) of a demo directory."""
    root = Path(directory)
    return root / "model", root / "profiles"


def _wanted(model_dir: Path) -> dict[str, Any]:
    return {"model": json.loads((model_dir / MARKER).read_text()), "detect": DETECT_SETTINGS,
            "profiles": [spec.__dict__ for spec in PROFILES], "guard": GUARD.__dict__}


def is_prepared(directory: str | Path) -> bool:
    model_dir, profile_dir = paths(directory)
    try:
        marker = json.loads((profile_dir / PREPARED_MARKER).read_text())
        return marker == _wanted(model_dir) and all(
            (profile_dir / f"{spec.name}.json").exists() for spec in PROFILES
        ) and guard_path(profile_dir, GUARD.name).exists()
    except (OSError, ValueError):
        return False


def detect_all(llm: Any, model_dir: Path, profile_dir: Path, progress: bool = False) -> None:
    """Detect every profile of PROFILES on a running detection engine (overwriting)."""
    from profile_tools.detection import detect_profile

    for spec in PROFILES:
        result = detect_profile(
            llm, model_dir / spec.pairs, profile_dir, name=spec.name,
            direction=spec.direction, overwrite=True, description=spec.description,
            progress=progress, graded=spec.graded, **DETECT_SETTINGS,
        )
        logger.info("steermoe demo: profile %s: %d activated, %d deactivated (%d pairs)",
                    spec.name, result.activated, result.deactivated, result.pairs_used)


def train_demo_guard(llm: Any, model_dir: Path, profile_dir: Path) -> None:
    """Train GUARD on a running detection engine (overwriting); needs its profile detected."""
    from profile_tools.guard_cli import train_guard

    guard = train_guard(llm, model_dir / GUARD.data, profile_dir, name=GUARD.name,
                        profile=GUARD.profile, holdout_path=model_dir / GUARD.holdout,
                        overwrite=True, description=GUARD.description)
    held = guard.metrics["heldout"]
    logger.info("steermoe demo: guard %s: held-out ROC AUC %.3f, precision %.3f, recall %.3f",
                guard.name, held["roc_auc"], held["precision"], held["recall"])


def prepare(directory: str | Path, progress: bool = False,
            engine_kwargs: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Build (cached), detect the profiles and train the guard (cached); returns (model dir,
    profile dir)."""
    from profile_tools.detection import start_detection_engine

    model_dir, profile_dir = paths(directory)
    build(model_dir, progress=progress)
    if is_prepared(directory):
        return model_dir, profile_dir
    profile_dir.mkdir(parents=True, exist_ok=True)
    (profile_dir / PREPARED_MARKER).unlink(missing_ok=True)
    for stale in profile_dir.glob("*.detect-state.npz"):
        stale.unlink()
    llm = start_detection_engine(model_dir, **{**ENGINE_DEFAULTS, **(engine_kwargs or {})})
    try:
        detect_all(llm, model_dir, profile_dir, progress=progress)
        train_demo_guard(llm, model_dir, profile_dir)
    finally:
        shutdown(llm)
    (profile_dir / PREPARED_MARKER).write_text(json.dumps(_wanted(model_dir)) + "\n")
    return model_dir, profile_dir


def shutdown(llm: Any) -> None:
    """Stop an `LLM`'s engine core now (rather than at interpreter exit)."""
    import contextlib
    import gc

    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
