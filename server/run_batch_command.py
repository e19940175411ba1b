"""`steermoe run-batch -i IN -o OUT MODEL [vllm run-batch options] [steering options]`.

vLLM's batch runner (`vllm run-batch`: an OpenAI batch input file, one request per line, to an
output file) with the steering options of `steermoe serve` applied to every line:

1. the engine starts (in this process, as `vllm run-batch` starts it), with a fresh server key
   (`STEERMOE_SERVER_KEY`): the engine front end refuses steering the policy did not mark;
2. each line is read with the steering layer's parser and, for `/v1/chat/completions`, goes
   through `steering_plan.plan_request`, the path every HTTP request takes: the policy
   (locked names, client profiles, `--allow-inline-steering`, `--allow-routing-capture`), the
   steering resolved once and marked, a locked name replaced by the base model's. Lines of
   other URLs may not steer or use a locked name (`check_other_body`). A refused line never
   reaches vLLM: it gets an output line with the status and an OpenAI error, as vLLM writes
   its own errors;
3. vLLM's own `run_batch` runs the checked lines;
4. each output line gets `steering` (top level and in `response.body`, null when unsteered),
   the locked name in `response.body.model`, `response.body.routing` for captured lines, and
   leaves an audit line (path `run-batch:/v1/chat/completions`).

Input and output may be local paths or http(s) URLs (GET / PUT), as for `vllm run-batch`.
`--max-request-bytes` bounds each line. The steering options are those of `steermoe serve`;
the admin API and `--middleware` do not exist here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expert_profiles.request_steering import PROFILE_DIR_ENV, SERVER_KEY_ENV
from server import vllm_server_compat as compat
from server.config import ConfigError, ServerConfig
from server.context import SteeringContext
from server.errors import SteeringHTTPError, error_payload
from server.guard_field import guard_decision
from server.request_body import parse_json_object
from server.request_record import RUN_BATCH_PATH, CompletionTrace, record_completion
from server.response_editor import token_counts
from server.routing_field import routing_field
from server.serve_command import build_parser, split_model, steering_config
from server.steering_plan import SteeringPlan, check_other_body, plan_request, steering_field

logger = logging.getLogger("steermoe.run_batch")

CHAT_URL = "/v1/chat/completions"
USAGE = "steermoe run-batch -i INPUT.jsonl -o OUTPUT.jsonl MODEL [vllm run-batch options] " \
        "[steering options]"


@dataclass
class BatchLine:
    """One non-empty input line: what goes to vLLM, or why it does not."""

    custom_id: Any
    trace: CompletionTrace | None = None
    plan: SteeringPlan | None = None
    forwarded: str | None = None  # the line vLLM reads
    error: SteeringHTTPError | None = None
    output: dict[str, Any] | None = field(default=None, repr=False)


class LineFacts:
    """The answer facts of an output line, for the metrics and the audit line."""

    def __init__(self, body: Any):
        body = body if isinstance(body, dict) else {}
        self.response_id = body.get("id") if isinstance(body.get("id"), str) else None
        self._usage = body.get("usage")

    def token_counts(self) -> tuple[int | None, int | None]:
        return token_counts(self._usage)


def prepare_line(context: SteeringContext, text: str) -> BatchLine:
    """Check one input line as the steering layer checks a request; never raises."""
    config = context.config
    line = BatchLine(custom_id=None)
    trace = CompletionTrace(path=RUN_BATCH_PATH, started=time.monotonic())
    try:
        raw = text.encode("utf-8", "surrogateescape")
        if len(raw) > config.max_request_bytes:
            raise SteeringHTTPError(413, f"the line exceeds {config.max_request_bytes} bytes")
        data = parse_json_object(raw)
        line.custom_id = data.get("custom_id")
        for key in ("custom_id", "method", "url"):
            if not isinstance(data.get(key), str):
                raise SteeringHTTPError(400, f"the line needs {key!r} (a string)", param=key)
        body = data.get("body")
        if not isinstance(body, dict):
            raise SteeringHTTPError(400, "the line's 'body' must be a JSON object", param="body")
        if data["url"] == CHAT_URL:
            line.trace = trace
            line.plan = plan_request(context, "batch_line", body, trace)
            data["body"] = line.plan.body
        else:
            checked = check_other_body(config, data["url"], body)
            if checked is not None:
                data["body"] = checked
        line.forwarded = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    except SteeringHTTPError as exc:
        line.error = exc
        if line.trace is not None:
            trace.error = exc.message
    return line


def error_output(line: BatchLine) -> dict[str, Any]:
    """The output line of a refused line, in the form vLLM writes its own errors."""
    assert line.error is not None
    error = line.error
    return {
        "id": f"vllm-{uuid.uuid4().hex}",
        "custom_id": line.custom_id if isinstance(line.custom_id, str) else "",
        "response": {"status_code": error.status, "request_id": f"vllm-batch-{uuid.uuid4().hex}",
                     "body": None},
        "error": error_payload(error.status, error.message, error.param),
        "steering": None,
    }


async def finish_line(context: SteeringContext, line: BatchLine, output: dict[str, Any],
                      engine_client: Any) -> dict[str, Any]:
    """vLLM's output line with the line's steering, locked name and routing added; its metrics
    and audit line written."""
    trace, plan = line.trace, line.plan
    if trace is None or plan is None:
        return output
    response = output.get("response") if isinstance(output.get("response"), dict) else {}
    status = response.get("status_code", 500)
    status = status if isinstance(status, int) else 500
    body = response.get("body")
    field_value = steering_field(trace.decision, trace.resolved)
    if plan.guard_ids and field_value is not None:
        trace.guard_decision = await guard_decision(engine_client, plan.guard_ids)
        field_value["guard_decision"] = trace.guard_decision
    output["steering"] = field_value
    if isinstance(body, dict):
        base = context.config.default_name
        if trace.locked and body.get("model") == base:
            body["model"] = trace.endpoint
        body["steering"] = field_value
        if plan.capture_ids:
            body["routing"] = await routing_field(engine_client, plan.capture_ids[0])
    elif plan.capture_ids:
        from vllm_patches.routing_capture import discard_routing_async

        try:
            await discard_routing_async(engine_client, list(plan.capture_ids))
        except Exception:  # the record expires in the worker
            logger.warning("steermoe: could not discard routing record %s", plan.capture_ids)
    if status != 200 and trace.error is None:
        error = output.get("error")
        message = error.get("error", {}).get("message") if isinstance(error, dict) else error
        trace.error = str(message) if message is not None else f"status {status}"
    record_completion(context, trace, status, LineFacts(body))
    return output


def read_input(path_or_url: str) -> str:
    if path_or_url.startswith(("http://", "https://")):
        import httpx

        response = httpx.get(path_or_url, timeout=300, follow_redirects=True)
        response.raise_for_status()
        return response.text
    return Path(path_or_url).read_text(encoding="utf-8")


def write_output(path_or_url: str, text: str) -> None:
    if path_or_url.startswith(("http://", "https://")):
        import httpx

        httpx.put(path_or_url, content=text.encode("utf-8"), timeout=1000).raise_for_status()
        return
    Path(path_or_url).write_text(text, encoding="utf-8")


async def run_steered_batch(context: SteeringContext, runner: compat.BatchRunner,
                            args: Any) -> int:
    """Check every line, run the accepted ones with vLLM's batch runner, write the output."""
    source, target = args.input_file, args.output_file
    texts = [text.strip() for text in read_input(source).split("\n")]
    async with runner.engine_client(args) as engine_client:
        lines = [prepare_line(context, text) for text in texts if text]
        for line in lines:
            if line.error is not None and line.trace is not None:
                record_completion(context, line.trace, line.error.status, None)
        refused = sum(line.error is not None for line in lines)
        logger.info("steermoe run-batch: %d lines, %d refused by the steering policy",
                    len(lines), refused)
        with tempfile.TemporaryDirectory(prefix="steermoe-batch-") as work:
            checked_in, vllm_out = Path(work) / "input.jsonl", Path(work) / "output.jsonl"
            checked_in.write_text("".join(f"{line.forwarded}\n" for line in lines
                                          if line.forwarded is not None), encoding="utf-8")
            args.input_file, args.output_file = str(checked_in), str(vllm_out)
            try:
                await runner.run(engine_client, args)
            finally:
                args.input_file, args.output_file = source, target
            produced = [json.loads(text) for text in
                        vllm_out.read_text(encoding="utf-8").splitlines() if text.strip()]
        outputs: list[dict[str, Any]] = []
        answers = iter(produced)
        for line in lines:
            if line.error is not None:
                outputs.append(error_output(line))
                continue
            output = next(answers, None)
            if output is None or output.get("custom_id") != line.custom_id:
                raise RuntimeError("vLLM's batch output does not match its input lines")
            outputs.append(await finish_line(context, line, output, engine_client))
    write_output(target, "".join(
        json.dumps(output, ensure_ascii=False, separators=(",", ":")) + "\n"
        for output in outputs))
    return 0


def find_model(runner: compat.BatchRunner | None, argv: list[str]) -> tuple[str | None, list[str]]:
    """MODEL, given first or anywhere among the options (`-i IN -o OUT MODEL`), and the rest."""
    model, rest = split_model(argv)
    if model is not None or runner is None:
        return model, rest
    bare = runner.positionals(rest)
    if len(bare) != 1 or rest.count(bare[0]) != 1:
        return None, rest
    rest.remove(bare[0])
    return bare[0], rest


def prepare(argv: Sequence[str], runner: compat.BatchRunner | None = None
            ) -> tuple[ServerConfig, list[str]]:
    """(steering config, vLLM run-batch argv) for `steermoe run-batch` arguments."""
    args, rest = build_parser().parse_known_args(list(argv))
    model, vllm_args = find_model(runner, rest)
    if args.refused_admin_token is not None or args.admin_token_file is not None:
        raise ConfigError("run-batch has no admin API: --admin-token-file is not accepted")
    if args.middleware:
        raise ConfigError("run-batch serves no HTTP: --middleware is not accepted")
    model = model or args.model_option
    if not model:
        raise ConfigError(f"give the model to run: {USAGE}")
    config = steering_config(args, model)
    compat.check_serving_setup(vllm_args)
    vllm_argv = ["--model", model, *vllm_args, "--served-model-name", *config.base_names]
    return config, vllm_argv


def run_batch_main(argv: Sequence[str]) -> int:
    """Entry point of `steermoe run-batch`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"usage: {USAGE}\n\n{__doc__}")
        return 0
    runner = compat.BatchRunner()
    try:
        config, vllm_argv = prepare(argv, runner)
    except (ConfigError, compat.ServingSetupError) as exc:
        print(f"steermoe run-batch: error: {exc}", file=sys.stderr)
        return 2
    if config.profiles_dir:
        os.environ[PROFILE_DIR_ENV] = config.profiles_dir
    # Marks the steering the policy authorised; the engine front end refuses any other.
    os.environ[SERVER_KEY_ENV] = secrets.token_hex(32)
    args = runner.parse_args(vllm_argv)
    context = SteeringContext(config, None)
    logger.info("steermoe: run-batch %s with steering config %s", config.default_name,
                config.to_json())
    return asyncio.run(run_steered_batch(context, runner, args))
