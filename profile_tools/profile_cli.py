"""`steermoe profile ...`: manage, detect and import steering profiles.

    steermoe profile list [--dir DIR]
    steermoe profile show NAME [--dir DIR] [--heatmap OUT.png]
    steermoe profile validate [--dir DIR] [--model MODEL_DIR_OR_CONFIG]
    steermoe profile delete NAME [--dir DIR]
    steermoe profile detect MODEL PAIRS.jsonl --out DIR [--name NAME] [--activate N]
        [--deactivate M] [--direction 1to2|2to1] [--batch-size B] [--max-model-len L]
        [--resume] [--overwrite] ...
    steermoe profile import-steermoe TABLE.pkl --out DIR [--model-config config.json |
        --architecture A --num-layers L --num-experts E --top-k K] [--activate N ...]

`--dir` defaults to $STEERMOE_PROFILE_DIR. Exit status: 0 success, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from expert_profiles.model_shape import ModelShape
from expert_profiles.request_steering import PROFILE_DIR_ENV
from expert_profiles.schema import SteeringProfile
from expert_profiles.selection import DIRECTIONS
from expert_profiles.store import ProfileStore

_DESCRIPTION_WIDTH = 48


class CliError(Exception):
    """A failure to report in one line, exit status 1."""


def _store(args: argparse.Namespace) -> ProfileStore:
    directory = args.dir or os.environ.get(PROFILE_DIR_ENV)
    if not directory:
        raise CliError(f"give --dir DIR or set {PROFILE_DIR_ENV}")
    if not Path(directory).is_dir():
        raise CliError(f"profile directory {directory} does not exist")
    return ProfileStore(directory)


def _shape_text(profile: SteeringProfile) -> str:
    m = profile.model
    return f"{m.num_layers}x{m.num_experts} top-{m.top_k}"


def _count(sets: dict[int, list[int]]) -> int:
    return sum(len(v) for v in sets.values())


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_profile_logs() -> Iterator[None]:
    """Silence the loaders' per-file error logs while the command prints the errors itself."""
    logger = logging.getLogger("expert_profiles")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _shorten(text: str, width: int = _DESCRIPTION_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


# ---- list / show / validate / delete ---------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    with _quiet_profile_logs():
        profiles, errors = store.validate_all()
    if not profiles and not errors:
        print(f"no profiles in {store.directory}")
        return 0
    rows = []
    for name, profile in sorted(profiles.items()):
        rows.append([
            name, profile.model.architecture, _shape_text(profile),
            str(_count(profile.activate)), str(_count(profile.deactivate)),
            "default" if profile.eps is None else f"{profile.eps:g}",
            "yes" if store.stats_path(name).is_file() else "-",
            _shorten(profile.description),
        ])
    if rows:
        print(_table(rows, ["NAME", "ARCHITECTURE", "SHAPE", "ACTIVATE", "DEACTIVATE", "EPS",
                            "STATS", "DESCRIPTION"]))
    for _file, message in sorted(errors.items()):
        print(f"invalid: {message}", file=sys.stderr)
    return 0


def _format_sets(profile: SteeringProfile) -> str:
    layers = sorted(set(profile.activate) | set(profile.deactivate))
    if not layers:
        return "  (no experts: requests with this profile are not steered)"
    rows = [[str(layer), ", ".join(map(str, profile.activate.get(layer, []))) or "-",
             ", ".join(map(str, profile.deactivate.get(layer, []))) or "-"] for layer in layers]
    return "\n".join("  " + line for line in _table(rows, ["LAYER", "ACTIVATE", "DEACTIVATE"])
                     .splitlines())


def describe_profile(profile: SteeringProfile, store: ProfileStore) -> str:
    """The text `show` prints."""
    m = profile.model
    stats_path = store.stats_path(profile.name)
    lines = [
        f"name:         {profile.name}",
        f"model:        {m.architecture} ({m.num_layers} layers, {m.num_experts} experts, "
        f"top-{m.top_k})",
        f"description:  {profile.description or '-'}",
        f"tags:         {', '.join(profile.tags) or '-'}",
        f"eps:          {'engine default' if profile.eps is None else f'{profile.eps:g}'}",
        f"experts:      {_count(profile.activate)} activated, "
        f"{_count(profile.deactivate)} deactivated",
        f"statistics:   {stats_path.name if stats_path.is_file() else '-'}",
        "per layer:",
        _format_sets(profile),
        "source:",
    ]
    if profile.source:
        for key, value in profile.source.items():
            text = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"  {key}: {text}")
    else:
        lines.append("  -")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    profile = store.get(args.name)
    print(describe_profile(profile, store))
    if args.heatmap:
        stats = store.get_stats(args.name)
        if stats is None:
            raise CliError(f"no statistics are stored for {args.name!r}, so no heatmap")
        from expert_profiles.heatmap import write_heatmap

        path = write_heatmap(
            args.heatmap, stats, num_layers=profile.model.num_layers,
            num_experts=profile.model.num_experts, activate=profile.activate,
            deactivate=profile.deactivate, title=f"{profile.name}: RD = p1 - p2",
        )
        print(f"heatmap written to {path}")
    return 0


def _model_shape(path: str) -> ModelShape:
    from expert_profiles.import_steermoe import shape_from_config_file

    config = Path(path)
    if config.is_dir():
        config = config / "config.json"
    if not config.is_file():
        raise CliError(f"{config} does not exist")
    return shape_from_config_file(config)


def cmd_validate(args: argparse.Namespace) -> int:
    store = _store(args)
    shape = _model_shape(args.model) if args.model else None
    with _quiet_profile_logs():
        profiles, errors = store.validate_all(shape)
    for name in sorted(profiles):
        print(f"ok       {name}")
    for _file, message in sorted(errors.items()):
        print(f"invalid  {message}")
    against = f" against {shape.architecture}" if shape else ""
    print(f"{len(profiles)} valid, {len(errors)} invalid{against} in {store.directory}")
    return 1 if errors else 0


def cmd_delete(args: argparse.Namespace) -> int:
    store = _store(args)
    for path in store.delete(args.name):
        print(f"removed {path}")
    return 0


# ---- detect / import -------------------------------------------------------------------------


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    if args.dtype:
        kwargs["dtype"] = args.dtype
    if args.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.tensor_parallel_size:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    from profile_tools.detection import parse_engine_args

    try:
        kwargs.update(parse_engine_args(args.engine_arg or []))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return kwargs


def cmd_detect(args: argparse.Namespace) -> int:
    from expert_profiles.store import validate_name
    from profile_tools.detection import detect_profile, start_detection_engine

    name = args.name or Path(args.pairs).stem
    validate_name(name)
    if not Path(args.pairs).is_file():
        raise CliError(f"{args.pairs} does not exist")
    if args.graded is not None and not (math.isfinite(args.graded) and args.graded > 0):
        raise CliError(f"--graded must be a positive number, got {args.graded}")
    store = ProfileStore(args.out)
    if store.exists(name) and not args.overwrite:
        raise CliError(f"profile {name!r} already exists in {args.out} (use --overwrite)")
    llm = start_detection_engine(args.model, **_engine_kwargs(args))
    result = detect_profile(
        llm, args.pairs, args.out, name=name, activate=args.activate,
        deactivate=args.deactivate, direction=args.direction, batch_size=args.batch_size,
        resume=args.resume, overwrite=args.overwrite, description=args.description or "",
        heatmap=not args.no_heatmap, progress=not args.no_progress, graded=args.graded,
    )
    chosen = (f"{result.activated + result.deactivated} experts biased by {args.graded:g} * RD"
              if args.graded is not None else
              f"{result.activated} activated, {result.deactivated} deactivated")
    print(f"profile {name}: {chosen} "
          f"({result.pairs_used} pairs used, {result.pairs_skipped} skipped)")
    print(f"  profile    {result.profile_path}")
    print(f"  statistics {result.stats_path}")
    if result.heatmap_path:
        print(f"  heatmap    {result.heatmap_path}")
    return 0


def _import_shape(args: argparse.Namespace) -> ModelShape | None:
    flags = (args.architecture, args.num_layers, args.num_experts, args.top_k)
    if args.model_config:
        if any(f is not None for f in flags):
            raise CliError("give --model-config or the shape flags, not both")
        return _model_shape(args.model_config)
    if any(f is not None for f in flags):
        if any(f is None for f in flags):
            raise CliError("--architecture, --num-layers, --num-experts and --top-k go together")
        return ModelShape(args.architecture, args.num_layers, args.num_experts, args.top_k,
                          tuple(range(args.num_layers)))
    return None


def cmd_import(args: argparse.Namespace) -> int:
    from expert_profiles.import_steermoe import import_table

    imported = import_table(
        args.table, args.out, shape=_import_shape(args), counts_path=args.counts,
        model_id=args.model_id, task=args.task, name=args.name, activate=args.activate,
        deactivate=args.deactivate, direction=args.direction, overwrite=args.overwrite,
        heatmap=not args.no_heatmap,
    )
    rows = [[p.name, p.steering, p.direction, str(p.activated), str(p.deactivated), str(p.path)]
            for p in imported]
    print(_table(rows, ["NAME", "STEERING", "DIRECTION", "ACTIVATED", "DEACTIVATED", "FILE"]))
    return 0


# ---- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steermoe profile",
                                     description="Manage, detect and import steering profiles.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_dir(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--dir", help=f"profile directory (default: ${PROFILE_DIR_ENV})")
        return sub

    sub = with_dir(commands.add_parser("list", help="list the profiles of a directory"))
    sub.set_defaults(run=cmd_list)

    sub = with_dir(commands.add_parser("show", help="print one profile"))
    sub.add_argument("name")
    sub.add_argument("--heatmap", metavar="OUT.png", help="also draw its statistics")
    sub.set_defaults(run=cmd_show)

    sub = with_dir(commands.add_parser("validate", help="check every profile file"))
    sub.add_argument("--model", metavar="MODEL_DIR",
                     help="also check each profile against this model (dir or config.json)")
    sub.set_defaults(run=cmd_validate)

    sub = with_dir(commands.add_parser("delete", help="remove a profile and its statistics"))
    sub.add_argument("name")
    sub.set_defaults(run=cmd_delete)

    sub = commands.add_parser("detect", help="find behaviour experts from paired data")
    sub.add_argument("model", help="model directory or Hugging Face id")
    sub.add_argument("pairs", help="pairs JSONL file")
    sub.add_argument("--out", required=True, help="profile directory to write to")
    sub.add_argument("--name", help="profile name (default: the pairs file's stem)")
    _selection_flags(sub, default_activate=10, default_deactivate=10)
    sub.add_argument("--graded", type=float, metavar="SCALE",
                     help="write graded steering: a bias of SCALE * RD on each selected expert "
                     "(+ for those it would activate, - for those it would deactivate) instead "
                     "of switches; requests scale it with steering_strength")
    sub.add_argument("--batch-size", type=int, default=32, help="pairs per batch (default 32)")
    sub.add_argument("--max-model-len", type=int)
    sub.add_argument("--dtype")
    sub.add_argument("--gpu-memory-utilization", type=float)
    sub.add_argument("--tensor-parallel-size", type=int)
    sub.add_argument("--engine-arg", action="append", metavar="KEY=VALUE",
                     help="any other vllm.LLM argument (VALUE parsed as JSON when it can be)")
    sub.add_argument("--resume", action="store_true", help="continue an interrupted run")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing profile")
    sub.add_argument("--description")
    sub.add_argument("--no-heatmap", action="store_true")
    sub.add_argument("--no-progress", action="store_true")
    sub.set_defaults(run=cmd_detect)

    sub = commands.add_parser("import-steermoe",
                              help="profiles from a SteerMoE published statistics table")
    sub.add_argument("table", help="activations_[ORG--MODEL]_[TASK].pkl")
    sub.add_argument("--out", required=True, help="profile directory to write to")
    sub.add_argument("--model-config", metavar="CONFIG", help="the model's config.json (or dir)")
    sub.add_argument("--architecture")
    sub.add_argument("--num-layers", type=int)
    sub.add_argument("--num-experts", type=int)
    sub.add_argument("--top-k", type=int)
    sub.add_argument("--counts", help="num_experts.jsonl (default: beside the table)")
    sub.add_argument("--model-id", help="model id, if the file name does not carry it")
    sub.add_argument("--task", help="task, if the file name does not carry it")
    sub.add_argument("--name", help="profile name (with --activate/--deactivate)")
    _selection_flags(sub, default_activate=None, default_deactivate=None)
    sub.add_argument("--overwrite", action="store_true", help="replace existing profiles")
    sub.add_argument("--no-heatmap", action="store_true")
    sub.set_defaults(run=cmd_import)
    return parser


def _selection_flags(sub: argparse.ArgumentParser, *, default_activate: int | None,
                     default_deactivate: int | None) -> None:
    hint = " (default: %(default)s)" if default_activate is not None else \
        " (default: the counts file)"
    sub.add_argument("--activate", type=int, default=default_activate, metavar="N",
                     help="experts to activate: the N largest RD > 0, at most top-k per layer"
                     + hint)
    sub.add_argument("--deactivate", type=int, default=default_deactivate, metavar="M",
                     help="experts to deactivate: the M most negative RD" + hint)
    sub.add_argument("--direction", choices=DIRECTIONS, default="1to2",
                     help="1to2: steer toward side 1 (RD = p1 - p2); 2to1: toward side 2")


def profile_main(argv: Sequence[str] | None = None) -> int:
    """Run `steermoe profile` with `argv` (without the leading 'profile')."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from expert_profiles.directory import ProfileFileError
    from expert_profiles.expert_stats import StatsFormatError
    from expert_profiles.pairs import PairsFileError
    from expert_profiles.safe_pickle import UnsafePickleError
    from expert_profiles.store import (
        InvalidProfileNameError,
        ProfileExistsError,
        ProfileNotFoundError,
    )
    from profile_tools.detection import DetectionError

    failures = (CliError, DetectionError, ProfileFileError, StatsFormatError, PairsFileError,
                UnsafePickleError, InvalidProfileNameError, ProfileExistsError,
                ProfileNotFoundError, FileNotFoundError, ValueError)
    try:
        return args.run(args)
    except failures as exc:
        print(f"steermoe profile {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(profile_main())
