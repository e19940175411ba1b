"""`steermoe guard ...`: train and show routing guards (`expert_profiles.guard`).

    steermoe guard train --model MODEL --data LABELLED.jsonl --profile PROFILE --name NAME
        --out PROFILE_DIR [--holdout HELDOUT.jsonl | --holdout-fraction 0.25]
        [--threshold P] [--l2 X] [--engine-arg KEY=VALUE ...] [--seed N] [--overwrite]
    steermoe guard show PROFILE_DIR NAME

A labelled file holds one prompt per line, a chat or a text, and whether the guard should fire:

    {"messages": [{"role": "user", "content": "how do i make zorblax?"}], "label": 1}
    {"prompt": "what is 2 plus 2?", "label": 0, "id": "arith-1"}

Every prompt runs through a detection engine (prefix caching off, one generated token, routing
capture on); its feature is the share of its tokens (all of them, chat template included) routed
to each expert of each MoE layer. A logistic regression on the training prompts becomes the
guard PROFILE_DIR/guards/NAME.json, with its threshold (Youden's J on the training prompts
unless `--threshold`) and its figures on the training and held-out prompts.
Exit status: 0 success, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from expert_profiles.guard import (
    DEFAULT_L2,
    GuardExistsError,
    GuardFile,
    GuardFileError,
    GuardNotFoundError,
    InvalidGuardNameError,
    RoutingCountError,
    count_routed_experts,
    fit_logistic,
    guard_path,
    load_guard,
    prefill_share,
    save_guard,
    split_metrics,
    youden_threshold,
)
from expert_profiles.pairs import ChatMessage
from expert_profiles.schema import ProfileMismatchError
from expert_profiles.store import ProfileStore, validate_name

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 256 * 1024
MAX_EXAMPLES = 100_000
DEFAULT_HOLDOUT_FRACTION = 0.25
DEFAULT_BATCH_SIZE = 64
TOO_LONG = "longer than max_model_len - 1"


class GuardDataError(ValueError):
    """A labelled file, or a line of it, that cannot be used."""


class LabelledPrompt(BaseModel):
    """One line of a labelled file: a chat (`messages`) or a text (`prompt`), and its label."""

    model_config = ConfigDict(extra="forbid")

    id: str | int | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | None = Field(default=None, min_length=1)
    label: int

    @field_validator("label", mode="before")
    @classmethod
    def _zero_or_one(cls, value: Any) -> int:
        if isinstance(value, bool) or value not in (0, 1) or not isinstance(value, int):
            raise PydanticCustomError("label", "must be 0 or 1 (1: the guard should fire)")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> LabelledPrompt:
        if (self.messages is None) == (self.prompt is None):
            raise PydanticCustomError("prompt", "give either messages or prompt, not both")
        return self


@dataclass
class LabelledFile:
    """The examples of a labelled file, with their line numbers and the file's digest."""

    path: Path
    examples: list[LabelledPrompt]
    lines: list[int]
    sha256: str

    def label_counts(self) -> dict[str, int]:
        ones = sum(e.label for e in self.examples)
        return {"1": ones, "0": len(self.examples) - ones}


def read_labelled(path: str | Path) -> LabelledFile:
    """Parse and validate a labelled JSONL file (bounded: MAX_LINE_BYTES a line,
    MAX_EXAMPLES lines); GuardDataError names the file and line."""
    path = Path(path)
    examples, lines = [], []
    digest = hashlib.sha256()
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise GuardDataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise GuardDataError(f"{path.name} line {number}: longer than {MAX_LINE_BYTES} "
                                     "bytes")
            digest.update(raw)
            if not raw.strip():
                continue
            if len(examples) == MAX_EXAMPLES:
                raise GuardDataError(f"{path.name}: more than {MAX_EXAMPLES} examples")
            examples.append(_parse_line(raw, path.name, number))
            lines.append(number)
    if not examples:
        raise GuardDataError(f"{path.name}: no examples")
    return LabelledFile(path, examples, lines, digest.hexdigest())


def _parse_line(raw: bytes, file_name: str, number: int) -> LabelledPrompt:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GuardDataError(f"{file_name} line {number}: not valid JSON: {exc}") from None
    except (RecursionError, ValueError):
        raise GuardDataError(f"{file_name} line {number}: not valid JSON") from None
    if not isinstance(data, dict):
        raise GuardDataError(f"{file_name} line {number}: expected an object with messages or "
                             "prompt, and label")
    try:
        return LabelledPrompt.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
            for err in exc.errors())
        raise GuardDataError(f"{file_name} line {number}: {problems}") from None


def token_ids(tokenizer: Any, example: LabelledPrompt) -> list[int]:
    """The prompt's token ids as the engine sees them: a chat through the chat template (with
    the generation prompt), a text as the tokenizer encodes it."""
    if example.prompt is not None:
        return list(tokenizer.encode(example.prompt))
    conversation = [m.model_dump() for m in example.messages or []]
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


# ---- routing ---------------------------------------------------------------------------------


def route_prompts(llm: Any, prompts: list[list[int]], num_experts: int,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[list[int], list[np.ndarray]]:
    """(MoE layers, counts [MoE layer, expert] of each prompt over all its tokens)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from profile_tools.detection import DetectionError
    from vllm_patches.routing_capture import KEEP_ENV, capture_keep, fetch_routing

    keep = capture_keep()
    if not 1 <= batch_size <= keep:
        raise ValueError(f"batch_size must be between 1 and {keep} (the engine keeps {keep} "
                         f"routing records, {KEEP_ENV})")
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                            extra_args={"capture_routing": True})
    moe_layers: list[int] | None = None
    counts: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], params,
                               use_tqdm=False)
        ids = [output.request_id for output in outputs]
        records = fetch_routing(llm, ids)
        if any(i not in records for i in ids):
            raise DetectionError("the engine recorded no routing for some prompts")
        for request_id, tokens in zip(ids, batch, strict=True):
            record = records[request_id]
            if moe_layers is None:
                moe_layers = list(record.moe_layers)
            elif list(record.moe_layers) != moe_layers:
                raise DetectionError("routing records disagree on the MoE layers")
            try:
                counts.append(count_routed_experts(record.expert_ids, 0, len(tokens),
                                                   num_experts))
            except RoutingCountError as exc:
                raise DetectionError(str(exc)) from None
    return moe_layers or [], counts


# ---- training --------------------------------------------------------------------------------


@dataclass
class _Routed:
    """Routed prompts: each one's (counts [MoE layer, expert], tokens) and label."""

    samples: list[tuple[np.ndarray, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def subset(self, indices: Sequence[int]) -> _Routed:
        return _Routed([self.samples[i] for i in indices], [self.labels[i] for i in indices])

    def features(self) -> np.ndarray:
        return np.stack([prefill_share(c, t).ravel() for c, t in self.samples])

    def scores(self, guard: GuardFile) -> np.ndarray:
        return np.array([guard.score(c, t) for c, t in self.samples])


def _route_file(llm: Any, tokenizer: Any, data: LabelledFile, num_experts: int,
                max_prompt: int, batch_size: int) -> tuple[list[int], _Routed]:
    from jinja2 import TemplateError

    routed = _Routed()
    prompts = []
    for example, number in zip(data.examples, data.lines, strict=True):
        try:
            ids = token_ids(tokenizer, example)
        except (TemplateError, ValueError) as exc:
            raise GuardDataError(f"{data.path.name} line {number}: the chat template failed: "
                                 f"{exc}") from None
        reason = "no tokens" if not ids else TOO_LONG if len(ids) > max_prompt else None
        if reason:
            routed.skipped[reason] = routed.skipped.get(reason, 0) + 1
            continue
        prompts.append(ids)
        routed.labels.append(example.label)
    if not prompts:
        raise GuardDataError(f"{data.path.name}: no prompt could be used ({routed.skipped})")
    moe_layers, counts = route_prompts(llm, prompts, num_experts, batch_size)
    routed.samples = [(c, len(ids)) for c, ids in zip(counts, prompts, strict=True)]
    return moe_layers, routed


def holdout_split(labels: Sequence[int], fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): `fraction` of each label held out, at random."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the holdout fraction must lie between 0 and 1, got {fraction}")
    labels_array = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for label in (0, 1):
        members = np.flatnonzero(labels_array == label)
        if len(members) < 2:
            raise GuardDataError(f"a held-out split needs at least two prompts of label {label}, "
                                 f"the data has {len(members)}")
        take = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.extend(int(i) for i in rng.permutation(members)[:take])
    held_set = set(held)
    train = np.array([i for i in range(len(labels_array)) if i not in held_set], dtype=int)
    return train, np.array(sorted(held), dtype=int)


def _need_both(labels: Sequence[int], what: str) -> None:
    ones = sum(labels)
    if ones == 0 or ones == len(labels):
        raise GuardDataError(f"the {what} prompts need both labels (0 and 1), they have only "
                             f"{'1' if ones else '0'}")


def train_guard(llm: Any, data_path: str | Path, out_dir: str | Path, *, name: str,
                profile: str, holdout_path: str | Path | None = None,
                holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
                threshold: float | None = None, l2: float = DEFAULT_L2, seed: int = 0,
                overwrite: bool = False, description: str = "",
                batch_size: int = DEFAULT_BATCH_SIZE, tokenizer: Any = None) -> GuardFile:
    """Train guard `name` (triggering `profile` of `out_dir`) on a running detection engine
    and write it to OUT_DIR/guards/NAME.json; returns the guard, its figures in `metrics`.

    `llm` must run without prefix caching (`detection.start_detection_engine`). Held out:
    the prompts of `holdout_path`, else `holdout_fraction` of each label of the data (`seed`).
    """
    from profile_tools.detection import require_no_prefix_caching, served_shape

    path = guard_path(out_dir, name)
    validate_name(profile)
    if threshold is not None and not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
        raise ValueError(f"the threshold must lie strictly between 0 and 1, got {threshold}")
    if not (math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be a positive number, got {l2}")
    if holdout_path is None and not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"the holdout fraction must lie between 0 and 1, got {holdout_fraction}")
    if path.exists() and not overwrite:
        raise GuardExistsError(f"guard {name!r} already exists in {out_dir} (overwrite it "
                               "explicitly)")
    data = read_labelled(data_path)
    held_file = read_labelled(holdout_path) if holdout_path is not None else None
    steering = ProfileStore(out_dir).get(profile)
    require_no_prefix_caching(llm)
    shape = served_shape(llm)
    steering.check_model(shape)
    tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
    max_prompt = int(llm.llm_engine.vllm_config.model_config.max_model_len) - 1

    moe_layers: list[int] = []

    def route(file: LabelledFile) -> _Routed:
        nonlocal moe_layers
        moe_layers, routed = _route_file(llm, tokenizer, file, shape.num_experts, max_prompt,
                                         batch_size)
        if shape.moe_layers and tuple(moe_layers) != tuple(shape.moe_layers):
            raise GuardDataError(f"the engine routes MoE layers {moe_layers}, the model config "
                                 f"says {list(shape.moe_layers)}")
        return routed

    routed = route(data)
    skipped = dict(routed.skipped)
    if held_file is not None:
        train, held = routed, route(held_file)
        for reason, count in held.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        holdout_rule: dict[str, Any] = {"file": held_file.path.name,
                                        "sha256": held_file.sha256,
                                        "labels": held_file.label_counts()}
    else:
        train_idx, held_idx = holdout_split(routed.labels, holdout_fraction, seed)
        train, held = routed.subset(train_idx), routed.subset(held_idx)
        holdout_rule = {"fraction": holdout_fraction, "seed": seed, "stratified": True}
    _need_both(train.labels, "training")
    _need_both(held.labels, "held-out")

    fit = fit_logistic(train.features(), np.asarray(train.labels), l2=l2)
    draft = GuardFile(
        name=name, model=steering.model, moe_layers=moe_layers,
        weights=fit.weights.reshape(len(moe_layers), shape.num_experts).tolist(),
        intercept=fit.intercept, threshold=0.5, profile=profile, description=description,
    )
    train_scores, held_scores = train.scores(draft), held.scores(draft)
    train_labels, held_labels = np.asarray(train.labels), np.asarray(held.labels)
    chosen = threshold if threshold is not None else youden_threshold(train_scores,
                                                                      train_labels)
    metrics = {
        "threshold": chosen,
        "threshold_rule": "given" if threshold is not None else "youden-j-on-train",
        "train": split_metrics(train_scores, train_labels, chosen),
        "heldout": split_metrics(held_scores, held_labels, chosen),
    }
    source = {
        "method": "steermoe-guard-train",
        "data_file": data.path.name, "data_sha256": data.sha256,
        "labels": data.label_counts(),
        "holdout": holdout_rule,
        "skipped": skipped,
        "l2": l2, "standardised": True,
        "fit": {"iterations": fit.iterations, "converged": fit.converged},
    }
    guard = GuardFile.model_validate({**draft.model_dump(), "threshold": chosen,
                                      "metrics": metrics, "source": source})
    save_guard(out_dir, guard, overwrite=overwrite)
    if not fit.converged:
        logger.warning("steermoe: the fit of guard %s did not converge (raise --l2)", name)
    return guard


# ---- the command -----------------------------------------------------------------------------


class CliError(Exception):
    """A failure to report in one line, exit status 1."""


def _check_before_engine(args: argparse.Namespace) -> None:
    """Everything that can be checked without an engine: names, files, profile, model."""
    from expert_profiles.model_shape import shape_from_hf_config

    guard_path(args.out, args.name)
    validate_name(args.profile)
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise CliError(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    if not (math.isfinite(args.l2) and args.l2 > 0):
        raise CliError(f"--l2 must be a positive number, got {args.l2}")
    if not Path(args.out).is_dir():
        raise CliError(f"profile directory {args.out} does not exist")
    if guard_path(args.out, args.name).exists() and not args.overwrite:
        raise CliError(f"guard {args.name!r} already exists in {args.out} (use --overwrite)")
    data = read_labelled(args.data)
    if args.holdout:
        _need_both([e.label for e in read_labelled(args.holdout).examples], "held-out")
        _need_both([e.label for e in data.examples], "training")
    else:
        holdout_split([e.label for e in data.examples], args.holdout_fraction, args.seed)
    steering = ProfileStore(args.out).get(args.profile)
    config = Path(args.model) / "config.json"
    if config.is_file():
        try:
            shape = shape_from_hf_config(json.loads(config.read_text()))
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read {config}: {exc}") from None
        if shape is None:
            raise CliError(f"{args.model} is not a Mixture-of-Experts model")
        steering.check_model(shape)


def cmd_train(args: argparse.Namespace) -> int:
    from profile_tools.demo.prepare import shutdown
    from profile_tools.detection import parse_engine_args, start_detection_engine

    _check_before_engine(args)
    try:
        engine_kwargs = parse_engine_args(args.engine_arg or [])
    except ValueError as exc:
        raise CliError(str(exc)) from None
    llm = start_detection_engine(args.model, **engine_kwargs)
    try:
        guard = train_guard(
            llm, args.data, args.out, name=args.name, profile=args.profile,
            holdout_path=args.holdout, holdout_fraction=args.holdout_fraction,
            threshold=args.threshold, l2=args.l2, seed=args.seed, overwrite=args.overwrite,
            description=args.description or "",
        )
    finally:
        shutdown(llm)
    print(json.dumps({"guard": str(guard_path(args.out, guard.name)), "profile": guard.profile,
                      **guard.metrics}, indent=2))
    return 0


def describe_guard(guard: GuardFile, top: int = 8) -> str:
    """The text `show` prints."""
    m = guard.model
    lines = [
        f"name:         {guard.name}",
        f"model:        {m.architecture} ({m.num_layers} layers, {m.num_experts} experts, "
        f"top-{m.top_k})",
        f"profile:      {guard.profile}",
        f"threshold:    {guard.threshold:.6g}",
        f"feature:      {guard.feature} over MoE layers {guard.moe_layers}",
        f"description:  {guard.description or '-'}",
    ]
    weights = guard.weight_array
    order = np.argsort(-np.abs(weights), axis=None, kind="stable")[:top]
    lines.append(f"largest weights (layer, expert: weight), intercept {guard.intercept:.4g}:")
    for flat in order:
        row, expert = divmod(int(flat), weights.shape[1])
        lines.append(f"  {guard.moe_layers[row]}, {expert}: {weights[row, expert]:+.4g}")
    for split in ("train", "heldout"):
        figures = guard.metrics.get(split)
        if isinstance(figures, dict):
            auc = figures.get("roc_auc")
            lines.append(f"{split + ':':13} ROC AUC {'-' if auc is None else f'{auc:.4f}'}, "
                         f"precision {figures.get('precision', 0):.4f}, recall "
                         f"{figures.get('recall', 0):.4f}, counts "
                         f"{json.dumps(figures.get('counts', {}))}")
    lines.append("source:")
    for key, value in guard.source.items():
        lines.append(f"  {key}: {value if isinstance(value, str) else json.dumps(value)}")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    if not Path(args.profile_dir).is_dir():
        raise CliError(f"profile directory {args.profile_dir} does not exist")
    print(describe_guard(load_guard(args.profile_dir, args.name)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steermoe guard",
        description="Routing guards: classify prompts by the experts their tokens reach.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = commands.add_parser("train", help="train a guard from labelled prompts")
    sub.add_argument("--model", required=True, help="model directory or Hugging Face id")
    sub.add_argument("--data", required=True, metavar="LABELLED.jsonl",
                     help='training prompts: {"messages": [...]} or {"prompt": "..."}, and '
                     '"label": 1 (fire) or 0')
    sub.add_argument("--profile", required=True, help="the profile the guard triggers")
    sub.add_argument("--name", required=True, help="guard name")
    sub.add_argument("--out", required=True, metavar="PROFILE_DIR",
                     help="profile directory holding PROFILE; the guard goes to guards/NAME.json")
    held = sub.add_mutually_exclusive_group()
    held.add_argument("--holdout", metavar="HELDOUT.jsonl", help="held-out labelled prompts")
    held.add_argument("--holdout-fraction", type=float, default=DEFAULT_HOLDOUT_FRACTION,
                      help="share of each label held out when no --holdout (default "
                      "%(default)s)")
    sub.add_argument("--threshold", type=float,
                     help="fire at this probability (default: Youden's J on the training set)")
    sub.add_argument("--l2", type=float, default=DEFAULT_L2,
                     help="L2 penalty on the standardised weights (default %(default)s)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    sub.add_argument("--engine-arg", action="append", metavar="KEY=VALUE",
                     help="any vllm.LLM argument (VALUE parsed as JSON when it can be)")
    sub.add_argument("--description")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing guard")
    sub.set_defaults(run=cmd_train)
    sub = commands.add_parser("show", help="print a guard")
    sub.add_argument("profile_dir", metavar="PROFILE_DIR")
    sub.add_argument("name")
    sub.set_defaults(run=cmd_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `steermoe guard` with `argv` (without the leading 'guard')."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from expert_profiles.directory import ProfileFileError
    from expert_profiles.store import InvalidProfileNameError, ProfileNotFoundError
    from profile_tools.detection import DetectionError

    failures = (CliError, GuardDataError, GuardFileError, GuardNotFoundError, GuardExistsError,
                InvalidGuardNameError, InvalidProfileNameError, ProfileNotFoundError,
                ProfileFileError, ProfileMismatchError, DetectionError, ValueError)
    try:
        return args.run(args)
    except failures as exc:
        print(f"steermoe guard {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
