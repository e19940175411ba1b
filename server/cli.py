"""The `steermoe` command: dispatches to its subcommands.

    steermoe serve MODEL ...   the OpenAI-compatible steering server (server.serve_command)
    steermoe run-batch ...     vLLM's batch runner, steered per line (server.run_batch_command)
    steermoe profile ...       profiles: manage, detect, import (profile_tools.profile_cli)
    steermoe guard ...         routing guards: train, show (profile_tools.guard_cli)
    steermoe demo ...          the demo model with planted behaviours (profile_tools.demo)
    steermoe eval ...          behaviour rates per steering setting (profile_tools.evaluation)
    steermoe audit ...         refusal rate as top-N safety experts are suppressed
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: steermoe COMMAND ...

commands:
  serve     serve a model with vLLM's OpenAI-compatible API, steerable per request
            (steermoe serve MODEL [vllm serve options] [steering options]; see --help)
  run-batch run an OpenAI batch file with the steering options of serve, per line
            (steermoe run-batch -i IN.jsonl -o OUT.jsonl MODEL [options]; see --help)
  profile   manage, detect and import steering profiles (see steermoe profile --help)
  guard     train and show routing guards over prompt routing (see steermoe guard --help)
  demo      build, prepare and serve the demo model (see steermoe demo --help)
  eval      behaviour rate per steering setting against an OpenAI-compatible server
  audit     refusal rate as the top-N safety experts are suppressed"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "serve":
        from server.serve_command import serve_main

        return serve_main(args[1:])
    if args and args[0] == "run-batch":
        from server.run_batch_command import run_batch_main

        return run_batch_main(args[1:])
    if args and args[0] == "profile":
        from profile_tools.profile_cli import profile_main

        return int(profile_main(args[1:]) or 0)
    if args and args[0] == "guard":
        from profile_tools.guard_cli import main as guard_main

        return int(guard_main(args[1:]) or 0)
    if args and args[0] == "demo":
        from profile_tools.demo.cli import main as demo_main
        from server.serve_command import serve_main

        return int(demo_main(args[1:], serve_main=serve_main) or 0)
    if args and args[0] == "eval":
        from profile_tools.evaluation.cli import main as eval_main

        return int(eval_main(args[1:]) or 0)
    if args and args[0] == "audit":
        from profile_tools.evaluation.audit import main as audit_main

        return int(audit_main(args[1:]) or 0)
    if args and args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
