"""SteerMoE detection: which experts separate two behaviours, from paired data, with vLLM.

Every side of every pair (see `pairs`) is rendered to token ids and run through the engine
(`max_tokens=1`, routing capture on). For each MoE layer and expert we count how often the
expert was in the router's top-k on the target tokens of side 1 (A1) and side 2 (A2), out of
N1 and N2 target tokens; the table (`expert_stats`) goes beside the profile, and the profile's
experts follow the rule of `selection`.

The engine must run without prefix caching: the capture of a prompt token served from the
prefix cache is empty (-1). Pairs are processed in batches; after each batch the partial counts
are checkpointed to `NAME.detect-state.npz` in the output directory (atomically), and a run
started with `resume=True` continues after the last finished batch. A side that does not fit
the engine's context (`max_model_len`) or whose target cannot be located skips its pair; both
are counted in the profile's `source`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expert_profiles.atomic_files import write_atomic
from expert_profiles.expert_stats import ExpertStats
from expert_profiles.guard import RoutingCountError, count_routed_experts
from expert_profiles.model_shape import ModelShape, shape_from_hf_config
from expert_profiles.pairs import (
    Pair,
    PairsFileError,
    RenderedSide,
    iter_lines,
    parse_pair,
    render_side,
)
from expert_profiles.profile_outputs import profile_from_selection, save_with_stats
from expert_profiles.selection import Direction, select_experts
from expert_profiles.store import ProfileExistsError, ProfileStore, validate_name
from vllm_patches.routing_capture import KEEP_ENV, capture_keep

logger = logging.getLogger(__name__)

STATE_SUFFIX = ".detect-state.npz"
STATE_VERSION = 1
DEFAULT_ACTIVATE = 10
DEFAULT_DEACTIVATE = 10
DEFAULT_BATCH_SIZE = 32


class DetectionError(RuntimeError):
    """Detection cannot run or continue, with the reason."""


def count_target_experts(expert_ids: np.ndarray, start: int, end: int,
                         num_experts: int) -> np.ndarray:
    """[moe layer, expert] counts of top-k membership over token rows start..end-1
    (`expert_profiles.guard.count_routed_experts`; its errors as DetectionError).

    `expert_ids` is a routing capture [tokens, moe layers, top_k]; a -1 in the span means the
    token was not computed (prefix cache) and is an error.
    """
    try:
        return count_routed_experts(expert_ids, start, end, num_experts)
    except RoutingCountError as exc:
        raise DetectionError(str(exc)) from None


@dataclass
class DetectionState:
    """Counts so far and how far into the pairs file they reach."""

    moe_layers: list[int]
    a1: np.ndarray
    a2: np.ndarray
    n1: int = 0
    n2: int = 0
    lines_done: int = 0
    consumed_sha256: str = hashlib.sha256().hexdigest()
    pairs_used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, moe_layers: Sequence[int], num_experts: int) -> DetectionState:
        zeros = np.zeros((len(moe_layers), num_experts), dtype=np.int64)
        return cls(list(moe_layers), zeros, zeros.copy())

    def skip(self, pair_id: Any, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(f"{pair_id}: {reason}")

    def to_bytes(self, fingerprint: dict[str, Any]) -> bytes:
        meta = {
            "version": STATE_VERSION, "fingerprint": fingerprint, "moe_layers": self.moe_layers,
            "n1": self.n1, "n2": self.n2, "lines_done": self.lines_done,
            "consumed_sha256": self.consumed_sha256, "pairs_used": self.pairs_used,
            "skipped": self.skipped, "skipped_examples": self.skipped_examples,
        }
        buffer = io.BytesIO()
        np.savez(buffer, a1=self.a1, a2=self.a2, meta=np.array(json.dumps(meta)))
        return buffer.getvalue()

    @classmethod
    def read(cls, path: Path, fingerprint: dict[str, Any]) -> DetectionState:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                a1, a2 = data["a1"].astype(np.int64), data["a2"].astype(np.int64)
        except (OSError, ValueError, KeyError) as exc:
            raise DetectionError(f"cannot read the checkpoint {path}: {exc}") from None
        if meta.get("version") != STATE_VERSION or meta.get("fingerprint") != fingerprint:
            raise DetectionError(
                f"the checkpoint {path} belongs to another run (the model or the pairs file "
                "differ); delete it to start over"
            )
        return cls(
            moe_layers=list(meta["moe_layers"]), a1=a1, a2=a2, n1=int(meta["n1"]),
            n2=int(meta["n2"]), lines_done=int(meta["lines_done"]),
            consumed_sha256=str(meta["consumed_sha256"]), pairs_used=int(meta["pairs_used"]),
            skipped=dict(meta["skipped"]), skipped_examples=list(meta["skipped_examples"]),
        )


@dataclass
class DetectionResult:
    profile_path: Path
    stats_path: Path
    heatmap_path: Path | None
    pairs_used: int
    pairs_skipped: int
    activated: int
    deactivated: int


def served_shape(llm: Any) -> ModelShape:
    """The routing shape of the model an `LLM` serves (from its Hugging Face config)."""
    shape = shape_from_hf_config(llm.llm_engine.vllm_config.model_config.hf_config)
    if shape is None:
        raise DetectionError("the served model has no Mixture-of-Experts layers")
    return shape


def require_no_prefix_caching(llm: Any) -> None:
    if llm.llm_engine.vllm_config.cache_config.enable_prefix_caching:
        raise DetectionError(
            "detection needs an engine started with enable_prefix_caching=False (routing of "
            "prompt tokens served from the prefix cache is not recorded)"
        )


def parse_engine_args(items: Sequence[str]) -> dict[str, Any]:
    """`--engine-arg KEY=VALUE` items as `vllm.LLM` keyword arguments (VALUE as JSON if it
    parses, else the string); ValueError for an item without `=` or key."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg wants KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def start_detection_engine(model: str | Path, **engine_kwargs: Any) -> Any:
    """A `vllm.LLM` for detection: prefix caching off, steering plugin loaded as usual."""
    from vllm import LLM

    engine_kwargs["enable_prefix_caching"] = False
    return LLM(model=str(model), **engine_kwargs)


def _route_batch(llm: Any, sides: list[RenderedSide]) -> tuple[list[int], list[np.ndarray]]:
    """Run the sides (max_tokens=1, capture on); (MoE layer indices, capture of each side)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_patches.routing_capture import fetch_routing

    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                            extra_args={"capture_routing": True})
    prompts = [TokensPrompt(prompt_token_ids=side.token_ids) for side in sides]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    ids = [output.request_id for output in outputs]
    records = fetch_routing(llm, ids)
    missing = [i for i in ids if i not in records]
    if missing:
        raise DetectionError(f"no routing was recorded for {len(missing)} requests")
    first = records[ids[0]].moe_layers
    if any(records[i].moe_layers != first for i in ids):
        raise DetectionError("routing records disagree on the MoE layers")
    return list(first), [records[i].expert_ids for i in ids]


class _Detector:
    """One detection run: batches in, counts accumulated, checkpoints written."""

    def __init__(self, llm: Any, tokenizer: Any, state: DetectionState, num_experts: int,
                 state_path: Path, fingerprint: dict[str, Any]):
        self.llm = llm
        self.tokenizer = tokenizer
        self.state = state
        self.num_experts = num_experts
        self.state_path = state_path
        self.fingerprint = fingerprint
        self.max_prompt = int(llm.llm_engine.vllm_config.model_config.max_model_len) - 1

    def run_batch(self, pairs: list[Pair]) -> None:
        sides: list[RenderedSide] = []
        for pair in pairs:
            try:
                rendered = [render_side(self.tokenizer, pair.side1),
                            render_side(self.tokenizer, pair.side2)]
            except PairsFileError as exc:
                self.state.skip(pair.id, str(exc))
                continue
            if any(len(side.token_ids) > self.max_prompt for side in rendered):
                self.state.skip(pair.id, f"longer than max_model_len - 1 ({self.max_prompt})")
                continue
            sides.extend(rendered)
        if not sides:
            return
        moe_layers, captures = _route_batch(self.llm, sides)
        if moe_layers != self.state.moe_layers:
            raise DetectionError(
                f"the engine routes MoE layers {moe_layers}, the model config says "
                f"{self.state.moe_layers}"
            )
        for index, (side, ids) in enumerate(zip(sides, captures, strict=True)):
            counts = count_target_experts(ids, side.target_start, side.target_end,
                                          self.num_experts)
            if index % 2 == 0:
                self.state.a1 += counts
                self.state.n1 += side.target_length
            else:
                self.state.a2 += counts
                self.state.n2 += side.target_length
        self.state.pairs_used += len(sides) // 2

    def checkpoint(self, lines_done: int, consumed_sha256: str) -> None:
        self.state.lines_done = lines_done
        self.state.consumed_sha256 = consumed_sha256
        write_atomic(self.state_path, self.state.to_bytes(self.fingerprint))


def _file_prefix_sha256(path: Path, lines: int) -> Any:
    """A sha256 object fed with the first `lines` lines of the file."""
    hasher = hashlib.sha256()
    if lines:
        for number, raw in iter_lines(path):
            hasher.update(raw)
            if number == lines:
                break
    return hasher


def scan_pairs(path: str | Path) -> int:
    """Validate every line of a pairs file (before any engine work); returns the pair count."""
    count = 0
    for number, raw in iter_lines(path):
        if raw.strip():
            parse_pair(raw, number)
            count += 1
    if count == 0:
        raise PairsFileError(f"{path}: no pairs")
    return count


def detect_profile(llm: Any, pairs_path: str | Path, out_dir: str | Path, *, name: str,
                   activate: int = DEFAULT_ACTIVATE, deactivate: int = DEFAULT_DEACTIVATE,
                   direction: Direction = "1to2", batch_size: int = DEFAULT_BATCH_SIZE,
                   resume: bool = False, overwrite: bool = False, description: str = "",
                   tokenizer: Any = None, heatmap: bool = True,
                   progress: bool = True, graded: float | None = None) -> DetectionResult:
    """Count expert activations of the pairs on `llm` and write NAME.json with its statistics.

    `graded`: write biases of `graded` * RD on the selected experts instead of switches
    (`selection.graded_bias`).

    `llm` must have been started with enable_prefix_caching=False (`start_detection_engine`).
    """
    validate_name(name)
    keep = capture_keep()
    if not 1 <= 2 * batch_size <= keep:
        raise ValueError(
            f"batch_size must be between 1 and {keep // 2} (the engine keeps {keep} routing "
            f"records, {KEEP_ENV}; each pair makes two)"
        )
    pairs_path = Path(pairs_path)
    store = ProfileStore(out_dir, create=True)
    if store.exists(name) and not overwrite:
        raise ProfileExistsError(f"profile {name!r} already exists in {store.directory}")
    require_no_prefix_caching(llm)
    shape = served_shape(llm)
    total = scan_pairs(pairs_path)
    tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
    state_path = store.directory / f"{name}{STATE_SUFFIX}"
    fingerprint = {"model": shape.to_dict(), "pairs_file": pairs_path.name,
                   "moe_layers": list(shape.moe_layers)}
    if state_path.exists() and not resume:
        raise DetectionError(
            f"a partial run of {name!r} exists ({state_path}); continue it with --resume or "
            "delete that file"
        )
    if resume and state_path.exists():
        state = DetectionState.read(state_path, fingerprint)
        hasher = _file_prefix_sha256(pairs_path, state.lines_done)
        if hasher.hexdigest() != state.consumed_sha256:
            raise DetectionError(
                f"{pairs_path.name} changed since the checkpoint was written; delete "
                f"{state_path.name} to start over"
            )
        logger.info("steermoe: resuming %s after line %d", name, state.lines_done)
    else:
        state = DetectionState.empty(shape.moe_layers, shape.num_experts)
        hasher = hashlib.sha256()
    detector = _Detector(llm, tokenizer, state, shape.num_experts, state_path, fingerprint)

    from tqdm import tqdm

    done_before = state.pairs_used + sum(state.skipped.values())
    bar = tqdm(total=total, initial=done_before, unit="pair", desc=f"detect {name}",
               disable=not progress)
    batch: list[Pair] = []
    last_line = state.lines_done
    try:
        for number, raw in iter_lines(pairs_path, skip=state.lines_done):
            hasher.update(raw)
            last_line = number
            if raw.strip():
                batch.append(parse_pair(raw, number))
            if len(batch) == batch_size:
                detector.run_batch(batch)
                detector.checkpoint(number, hasher.hexdigest())
                bar.update(len(batch))
                batch = []
        if batch:
            detector.run_batch(batch)
            bar.update(len(batch))
        detector.checkpoint(last_line, hasher.hexdigest())
    finally:
        bar.close()
    if state.n1 == 0 or state.n2 == 0:
        raise DetectionError(f"no pair could be used (skipped: {state.skipped})")

    stats = ExpertStats.from_counts(state.moe_layers, state.a1, state.a2, state.n1, state.n2)
    selection = select_experts(stats, activate=activate, deactivate=deactivate,
                               direction=direction, top_k=shape.top_k,
                               num_experts=shape.num_experts)
    skipped = sum(state.skipped.values())
    source = {
        "method": "steermoe-detect",
        "pairs_file": pairs_path.name,
        "pairs_sha256": hasher.hexdigest(),
        "pairs_used": state.pairs_used,
        "pairs_skipped": skipped,
        "skipped_reasons": state.skipped,
        "target_tokens": {"side1": state.n1, "side2": state.n2},
        "direction": direction,
        "stats_file": store.stats_path(name).name,
    }
    profile = profile_from_selection(
        name, shape, selection, source=source,
        graded=None if graded is None else (stats, graded),
        description=description or (
            f"Detected from {pairs_path.name} ({state.pairs_used} pairs), "
            f"steering toward side {'1' if direction == '1to2' else '2'}"
        ),
    )
    written = save_with_stats(store, profile, stats, overwrite=overwrite, heatmap=heatmap)
    state_path.unlink(missing_ok=True)
    if skipped:
        logger.warning("steermoe: %d pairs skipped: %s", skipped, state.skipped_examples[:5])
    activated, deactivated = selection.counts()
    return DetectionResult(
        profile_path=written[-1], stats_path=written[0],
        heatmap_path=written[1] if heatmap else None, pairs_used=state.pairs_used,
        pairs_skipped=skipped, activated=activated, deactivated=deactivated,
    )
