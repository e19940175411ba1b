"""`steermoe demo build|prepare|serve DIR`: the demo model with planted, steerable behaviours."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steermoe demo",
        description="A small OLMoE trained here with steerable behaviours planted in experts.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = commands.add_parser("build", help="train the demo model into DIR (cached)")
    sub.add_argument("dir")
    sub = commands.add_parser("prepare", help="build DIR/model and detect DIR/profiles (cached)")
    sub.add_argument("dir")
    sub = commands.add_parser(
        "serve", help="serve a prepared DIR with the locked endpoint demo-safe (more options "
        "after DIR go to steermoe serve)")
    sub.add_argument("dir")
    return parser


def main(argv: Sequence[str] | None = None,
         serve_main: Callable[[list[str]], int] | None = None) -> int:
    """Run `steermoe demo` with argv (without the leading 'demo').

    `serve_main` runs `steermoe serve` (the server sits above this package, so the `steermoe`
    command hands it in)."""
    args, extra = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if extra and args.command != "serve":
        print(f"steermoe demo {args.command}: unknown arguments {extra}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build":
        from profile_tools.demo.build import build

        out = build(args.dir, progress=True)
        print(json.dumps({"model": str(out)}))
    elif args.command == "prepare":
        from profile_tools.demo.prepare import prepare

        model_dir, profile_dir = prepare(args.dir, progress=True)
        print(json.dumps({"model": str(model_dir), "profiles": str(profile_dir)}))
    else:
        from profile_tools.demo.prepare import is_prepared
        from profile_tools.demo.serve import serve_argv

        if serve_main is None:
            print("steermoe demo serve: run it through the steermoe command", file=sys.stderr)
            return 2
        if not is_prepared(args.dir):
            print(f"steermoe demo serve: {args.dir} is not prepared; run steermoe demo prepare "
                  f"{args.dir} first", file=sys.stderr)
            return 2
        return serve_main(serve_argv(args.dir, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
