"""`steermoe run-batch` without an engine: each line through the steering layer's checks, the
output lines, the command line."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from server import vllm_server_compat as compat
from server.config import ConfigError, ServerConfig
from server.context import SteeringContext
from server.run_batch_command import error_output, finish_line, prepare, prepare_line
from tests.server.server_process import write_profile
from tests.server.test_middleware_asgi import MODEL, ServedModel


@pytest.fixture
def context(tmp_path) -> SteeringContext:
    directory = tmp_path / "profiles"
    directory.mkdir()
    write_profile(directory, "safety", MODEL, {1: [5]}, {2: [0]})
    write_profile(directory, "concise", MODEL, {1: [2]})
    config = ServerConfig(profiles_dir=str(directory), base_names=("m",),
                          endpoints={"m-safe": "safety"}, allow_routing_capture=True,
                          max_request_bytes=2000, audit_log=str(tmp_path / "audit.jsonl"))
    return SteeringContext(config, None, served_model=lambda: ServedModel())


def chat(custom_id: str = "a", model: str = "m", url: str = "/v1/chat/completions",
         **extra: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"model": model, "messages": [], **extra}})


def test_a_steered_line_carries_its_steering(context):
    line = prepare_line(context, chat(steering_profile="concise"))
    assert line.error is None
    forwarded = json.loads(line.forwarded)
    assert forwarded["body"]["vllm_xargs"] == {"steering_profile": "concise"}
    assert "steering_profile" not in forwarded["body"]
    assert line.trace.decision.profile == "concise"


def test_a_locked_line_runs_its_profile_on_the_base_model(context):
    line = prepare_line(context, chat(model="m-safe"))
    forwarded = json.loads(line.forwarded)
    assert forwarded["body"]["model"] == "m"
    assert forwarded["body"]["vllm_xargs"] == {"steering_profile": "safety"}


def test_capture_fixes_the_request_id(context):
    line = prepare_line(context, chat(capture_routing=True, request_id="mine"))
    body = json.loads(line.forwarded)["body"]
    assert body["request_id"].startswith("mine-")
    assert line.plan.capture_ids == (f"chatcmpl-{body['request_id']}",)


@pytest.mark.parametrize(("text", "status"), [
    (chat(model="m-safe", steering_profile=None), 403),
    (chat(steering_profile="nope"), 404),
    (chat(steering={"activate": {"1": [1]}}), 403),
    (chat(vllm_xargs={"steermoe_auth": "x"}), 400),
    (chat(url="/v1/embeddings", steering_profile="concise"), 400),
    (chat(url="/v1/embeddings", model="m-safe"), 403),
    ("{not json", 400),
    ("[]", 400),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}), 400),
    (json.dumps({"custom_id": 5, "method": "POST", "url": "/v1/chat/completions",
                 "body": {}}), 400),
    (chat(messages=[{"content": "x" * 3000}]), 413),
])
def test_refused_lines_never_reach_vllm(context, text, status):
    line = prepare_line(context, text)
    assert line.forwarded is None and line.error.status == status
    output = error_output(line)
    assert output["response"]["status_code"] == status and output["response"]["body"] is None
    assert set(output["error"]["error"]) == {"message", "type", "param", "code"}
    assert output["steering"] is None and isinstance(output["custom_id"], str)


def test_other_urls_pass_unchanged(context):
    line = prepare_line(context, chat(url="/v1/embeddings"))
    assert json.loads(line.forwarded) == json.loads(chat(url="/v1/embeddings"))


def test_finished_lines_get_their_steering(context, tmp_path):
    line = prepare_line(context, chat(model="m-safe"))
    output = {"id": "vllm-1", "custom_id": "a", "error": None, "response": {
        "status_code": 200, "request_id": "r", "body": {
            "id": "chatcmpl-1", "model": "m", "usage": {"prompt_tokens": 4,
                                                        "completion_tokens": 2}}}}
    done = asyncio.run(finish_line(context, line, output, None))
    body = done["response"]["body"]
    assert body["model"] == "m-safe" and done["steering"] == body["steering"]
    assert done["steering"]["locked"] is True and done["steering"]["profile"] == "safety"
    audit = [json.loads(text) for text in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["path"] == "run-batch:/v1/chat/completions"
    assert audit[-1]["request_id"] == "chatcmpl-1" and audit[-1]["completion_tokens"] == 2


def test_a_failed_line_keeps_vllms_error(context):
    line = prepare_line(context, chat(steering_profile="concise"))
    output = {"id": "vllm-2", "custom_id": "a", "response": {
        "status_code": 400, "request_id": "r", "body": None},
        "error": {"error": {"message": "bad", "type": "BadRequestError", "param": None,
                            "code": 400}}}
    done = asyncio.run(finish_line(context, line, output, None))
    assert done["error"] == output["error"] and done["steering"]["profile"] == "concise"
    assert line.trace.error == "bad"


def test_command_line(tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    write_profile(profiles, "safety", MODEL, {1: [5]})
    runner = compat.BatchRunner()
    config, argv = prepare(["-i", "in.jsonl", "-o", "out.jsonl", "some/model", "--dtype",
                            "float32", "--profiles", str(profiles), "--endpoint", "m-safe=safety",
                            "--allow-routing-capture"], runner)
    assert config.endpoints == {"m-safe": "safety"} and config.allow_routing_capture
    assert argv[:2] == ["--model", "some/model"]
    assert argv[-2:] == ["--served-model-name", "some/model"]
    assert "-i" in argv and "float32" in argv and "--profiles" not in argv
    for refused in (["--admin-token-file", "x"], ["--middleware", "x.Y"], []):
        args = ["-i", "in.jsonl", "-o", "out.jsonl", *refused]
        if refused:
            args.insert(0, "model")
        with pytest.raises(ConfigError):
            prepare(args, runner)
