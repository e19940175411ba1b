"""`steermoe eval`: behaviour rate per steering setting, with its side effect on a control set.

    steermoe eval --base-url http://localhost:8000/v1 --model demo \\
        --prompts restricted.jsonl --judge refusal --control arithmetic.jsonl \\
        --setting none --setting profile:safety --setting endpoint:demo-safe --out eval-out

Writes OUT/results.jsonl (one row per answer; a rerun skips what is done), OUT/summary.json,
OUT/summary.md and OUT/chart.png.

Strength curves: `--strengths 0,0.5,1` runs every `profile:NAME` setting once per strength,
labelled NAME@0, NAME@0.5, NAME@1, each request sending `steering_strength` (strength 1
included) next to `steering_profile`; `profile:NAME@0.5` is one setting at its own strength.
`none` and endpoints are not scaled. summary.json and summary.md then give each profile's
curve (behaviour rate and control accuracy per strength, 95% Wilson intervals) and whether
the behaviour rate is monotonic in strength at the measured points; OUT/curve.png plots it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from profile_tools.evaluation.client import ChatClient
from profile_tools.evaluation.judges import LLMJudge, rule_judge
from profile_tools.evaluation.prompts import PromptSetError, load_prompts
from profile_tools.evaluation.report import BEHAVIOUR, CONTROL, summarize, write_reports
from profile_tools.evaluation.runner import (
    MAX_STRENGTHS,
    Setting,
    Task,
    check_settings,
    expand_strengths,
    parse_setting,
    parse_strengths,
    run_tasks,
)


def _strengths(text: str) -> list[float]:
    try:
        return parse_strengths(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steermoe eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible base URL (…/v1)")
    parser.add_argument("--model", required=True, help="the base model's served name")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--prompts", required=True, help="behaviour prompt set (.jsonl/.csv)")
    parser.add_argument("--judge", default="refusal",
                        help="refusal | regex:PATTERN | expected | llm (default: refusal)")
    parser.add_argument("--behaviour-name", help="name of the behaviour in reports")
    parser.add_argument("--control", help="control prompt set with expected answers")
    parser.add_argument("--control-judge", default="expected",
                        help="judge of control answers (default: expected)")
    parser.add_argument("--setting", action="append", required=True, metavar="SETTING",
                        help="none | profile:NAME | profile:NAME@STRENGTH | endpoint:NAME, "
                        "optionally LABEL=... (repeatable)")
    parser.add_argument("--strengths", type=_strengths, metavar="S,S,...",
                        help="run every profile:NAME setting (without its own @STRENGTH) at "
                        f"each of these strengths in [0, 1] (at most {MAX_STRENGTHS}), "
                        "labelled NAME@S, sending steering_strength (1 included); none and "
                        "endpoint settings are not scaled")
    parser.add_argument("--with-unscaled", action="store_true",
                        help="with --strengths, also run each scaled profile once without "
                        "steering_strength (labelled NAME), the reference for NAME@1")
    parser.add_argument("--judge-url", help="OpenAI-compatible base URL of the LLM judge")
    parser.add_argument("--judge-model", help="the LLM judge's model")
    parser.add_argument("--judge-api-key", default=os.environ.get("JUDGE_API_KEY"))
    parser.add_argument("--judge-template", help="file with the judge prompt "
                        "({prompt}, {answer}, {expected}); answer YES means the behaviour")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--title", default="")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _judge(spec: str, args: argparse.Namespace, clients: list[ChatClient]):
    if spec != "llm":
        return rule_judge(spec)
    if not args.judge_url or not args.judge_model:
        raise ValueError("--judge llm needs --judge-url and --judge-model")
    client = ChatClient(args.judge_url, args.judge_api_key, args.timeout, args.retries)
    clients.append(client)
    kwargs = {}
    if args.judge_template:
        kwargs["template"] = Path(args.judge_template).read_text(encoding="utf-8")
    return LLMJudge(client, args.judge_model, **kwargs)


def plan_settings(args: argparse.Namespace) -> list[Setting]:
    """The settings of --setting, expanded by --strengths; ValueError if they clash."""
    settings = [parse_setting(text) for text in args.setting]
    if args.with_unscaled and not args.strengths:
        raise ValueError("--with-unscaled needs --strengths")
    if args.strengths:
        if not any(s.profile and s.strength is None for s in settings):
            raise ValueError("--strengths needs a profile:NAME setting to scale")
        settings = expand_strengths(settings, args.strengths, args.with_unscaled)
    check_settings(settings)
    return settings


async def evaluate(args: argparse.Namespace) -> dict:
    settings = plan_settings(args)
    clients: list[ChatClient] = []
    try:
        judge = _judge(args.judge, args, clients)
        sets = [(BEHAVIOUR, load_prompts(args.prompts), judge)]
        if args.control:
            sets.append((CONTROL, load_prompts(args.control),
                         _judge(args.control_judge, args, clients)))
        tasks = [Task(setting, name, item, set_judge) for setting in settings
                 for name, items, set_judge in sets for item in items]
        client = ChatClient(args.base_url, args.api_key, args.timeout, args.retries)
        clients.append(client)
        out = Path(args.out)
        rows = await run_tasks(tasks, client, args.model, out / "results.jsonl",
                               concurrency=args.concurrency, max_tokens=args.max_tokens,
                               temperature=args.temperature, progress=not args.no_progress)
    finally:
        for opened in clients:
            await opened.close()
    name = args.behaviour_name or (judge.name if args.judge != "llm" else "behaviour")
    summary = summarize(rows, settings, name)
    summary["paths"] = {k: str(v) for k, v in write_reports(summary, out, args.title).items()}
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run `steermoe eval` with argv (without the leading 'eval')."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        summary = asyncio.run(evaluate(args))
    except (PromptSetError, ValueError, OSError) as exc:
        print(f"steermoe eval: error: {exc}", file=sys.stderr)
        return 1
    print(Path(summary["paths"]["table"]).read_text(), end="")
    curve = f"  curve: {summary['paths']['curve']}" if "curve" in summary["paths"] else ""
    print(f"results: {Path(args.out) / 'results.jsonl'}  chart: {summary['paths']['chart']}"
          + curve)
    failed = sum(entry["errors"] for entry in summary["settings"])
    if failed:
        print(f"steermoe eval: {failed} requests failed; run again to retry them",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
