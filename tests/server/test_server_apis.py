"""Steering on every API vLLM serves, against a real `steermoe serve` (tiny Qwen3-MoE): the
Responses API (OpenAI SDK, stateful continuations included), the Anthropic Messages API
(Anthropic SDK), chat batches, SageMaker `/invocations`; `/inference/v1/generate` refuses it.

One server for the module (a locked endpoint, inline steering, routing capture, vLLM's
Responses store on). Captured routing is the oracle: a steered response's rows hold its
profile's activated experts and none of its deactivated ones.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.server.routing_checks import assert_follows, follows
from tests.server.server_process import (
    CONCISE,
    LAYERS,
    SAFETY,
    steermoe_server,
    tiny_qwen_with_profiles,
)

pytestmark = pytest.mark.engine

LOCKED = "qwen-safe"
INLINE = ({layer: [4] for layer in LAYERS}, {layer: [2, 3] for layer in LAYERS})
SETS = {"safety": SAFETY, "concise": CONCISE, "inline": INLINE}
PROMPT = "Water boils at 100 degrees Celsius at sea level and freezes at"
CHAT = [{"role": "user", "content": PROMPT}]


def inline_body(sets: tuple[dict, dict]) -> dict[str, Any]:
    activate, deactivate = sets
    return {"activate": {str(k): v for k, v in activate.items()},
            "deactivate": {str(k): v for k, v in deactivate.items()}}


def assert_unsteered(routing: dict[str, Any]) -> None:
    for name, sets in SETS.items():
        assert not follows(routing, *sets), f"an unsteered answer's routing follows {name!r}"


@pytest.fixture(scope="module")
def setup(build_tiny, tmp_path_factory) -> dict[str, Any]:
    return tiny_qwen_with_profiles(build_tiny, tmp_path_factory.mktemp("steering_apis"))


@pytest.fixture(scope="module")
def server(setup):
    root = setup["root"]
    args = ["--served-model-name", "tiny", "--profiles", str(setup["profiles"]),
            "--endpoint", f"{LOCKED}=safety", "--allow-inline-steering",
            "--allow-routing-capture", "--audit-log", str(root / "audit.jsonl")]
    with steermoe_server(setup["checkpoint"], args, root / "server.log",
                         env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0,
                               timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as session:
        yield session


def respond(oai: openai.OpenAI, model: str = "tiny", text: str = PROMPT, **extra: Any
            ) -> tuple[dict[str, Any], httpx.Headers]:
    raw = oai.responses.with_raw_response.create(
        model=model, input=text, max_output_tokens=4, temperature=0, extra_body=extra or None)
    return raw.http_response.json(), raw.headers


def message(claude: anthropic.Anthropic, model: str = "tiny", **extra: Any
            ) -> tuple[dict[str, Any], httpx.Headers]:
    raw = claude.messages.with_raw_response.create(
        model=model, max_tokens=4, messages=CHAT, extra_body=extra or None)
    return raw.http_response.json(), raw.headers


# ---- Responses API (OpenAI SDK) ------------------------------------------------------------


def test_responses_steered_and_unsteered_routing(oai):
    plain, headers = respond(oai, capture_routing=True)
    assert headers["x-steermoe-steering"] == "none" and plain["steering"] is None
    assert_unsteered(plain["routing"])
    steered, headers = respond(oai, steering_profile="concise", capture_routing=True)
    assert headers["x-steermoe-steering"].startswith("profile=concise; endpoint=tiny;")
    assert steered["steering"]["profile"] == "concise"
    assert_follows(steered["routing"], *CONCISE)
    usage = steered["usage"]
    assert len(steered["routing"]["expert_ids"]) == (
        usage["input_tokens"] + usage["output_tokens"] - 1)
    inline, _ = respond(oai, vllm_xargs={"steering": json.dumps(inline_body(INLINE)),
                                         "capture_routing": 1})
    assert inline["steering"]["inline"] is True
    assert_follows(inline["routing"], *INLINE)
    sdk = oai.responses.create(model="tiny", input=PROMPT, max_output_tokens=3,
                               extra_body={"steering_profile": "concise"})
    assert sdk.model_extra["steering"]["profile"] == "concise"


def test_responses_locked_endpoint(oai):
    body, headers = respond(oai, LOCKED, capture_routing=True)
    assert body["model"] == LOCKED and body["steering"]["locked"] is True
    assert headers["x-steermoe-steering"].startswith(f"profile=safety; endpoint={LOCKED};")
    assert_follows(body["routing"], *SAFETY)


def test_responses_locked_stream_names_the_endpoint_in_every_event(oai):
    raw = oai.responses.with_raw_response.create(model=LOCKED, input=PROMPT,
                                                 max_output_tokens=4, stream=True)
    assert raw.headers["x-steermoe-steering"].startswith(f"profile=safety; endpoint={LOCKED};")
    events = list(raw.parse())
    models = {event.response.model for event in events if getattr(event, "response", None)}
    assert models == {LOCKED}
    assert events[-1].type in ("response.completed", "response.incomplete")


@pytest.mark.parametrize("extra", [{"steering_profile": "concise"}, {"steering_profile": None},
                                   {"steering": inline_body(INLINE)}])
def test_responses_locked_endpoint_refuses_overrides(oai, extra):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        respond(oai, LOCKED, **extra)
    assert caught.value.body["code"] == 403
    assert "always runs steering profile 'safety'" in caught.value.body["message"]


@pytest.mark.parametrize(("extra", "error", "param"), [
    ({"steering_profile": "nope"}, openai.NotFoundError, "steering_profile"),
    ({"steering_profile": "unsafe"}, openai.PermissionDeniedError, "steering_profile"),
    ({"steering": {"activate": {"1": [1, 2, 3]}}}, openai.BadRequestError, "steering"),
    ({"capture_routing": True, "stream": True}, openai.BadRequestError, "capture_routing"),
])
def test_responses_bad_steering_in_openai_shape(oai, extra, error, param):
    with pytest.raises(error) as caught:
        respond(oai, **extra)
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param


def test_responses_continuation_keeps_its_steering(oai):
    first, _ = respond(oai, steering_profile="concise")
    second, headers = respond(oai, text="and then?", previous_response_id=first["id"],
                              capture_routing=True)
    assert headers["x-steermoe-steering"].startswith("profile=concise;")
    assert_follows(second["routing"], *CONCISE)
    third, headers = respond(oai, text="and then?", previous_response_id=second["id"],
                             steering_profile=None, capture_routing=True)
    assert headers["x-steermoe-steering"] == "none"
    assert_unsteered(third["routing"])
    sdk = oai.responses.create(model="tiny", input="more", max_output_tokens=3,
                               previous_response_id=first["id"])
    assert sdk.model_extra["steering"]["profile"] == "concise"


def test_responses_continuation_cannot_leave_the_locked_endpoint(oai, http):
    first, _ = respond(oai, LOCKED)
    for extra in ({}, {"steering_profile": None}):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            respond(oai, "tiny", previous_response_id=first["id"], **extra)
        assert f"continue it on '{LOCKED}'" in caught.value.body["message"]
    response = http.post("/v1/responses", json={
        "input": "and then?", "max_output_tokens": 4, "previous_response_id": first["id"],
        "capture_routing": True})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == LOCKED
    assert_follows(response.json()["routing"], *SAFETY)
    stored = http.get(f"/v1/responses/{first['id']}")
    assert stored.json()["model"] == LOCKED and stored.json()["steering"]["locked"] is True
    assert stored.headers["x-steermoe-steering"].startswith("profile=safety;")
    missing = http.post("/v1/responses", json={"model": "tiny", "input": "x",
                                                "previous_response_id": "resp_nothing"})
    assert missing.status_code == 404


# ---- Anthropic Messages API (Anthropic SDK) --------------------------------------------------


def test_messages_steered_and_unsteered_routing(claude):
    plain, headers = message(claude, capture_routing=True)
    assert headers["x-steermoe-steering"] == "none"
    assert_unsteered(plain["routing"])
    steered, headers = message(claude, steering_profile="concise", capture_routing=True)
    assert headers["x-steermoe-steering"].startswith("profile=concise; endpoint=tiny;")
    assert steered["type"] == "message" and steered["steering"]["profile"] == "concise"
    assert_follows(steered["routing"], *CONCISE)
    sdk = claude.messages.create(model="tiny", max_tokens=3, messages=CHAT,
                                 extra_body={"steering": inline_body(INLINE)})
    assert sdk.model_extra["steering"]["inline"] is True


def test_messages_locked_endpoint_and_stream(claude):
    body, _ = message(claude, LOCKED, capture_routing=True)
    assert body["model"] == LOCKED
    assert_follows(body["routing"], *SAFETY)
    with claude.messages.stream(model=LOCKED, max_tokens=4, messages=CHAT) as stream:
        final = stream.get_final_message()
        header = stream.response.headers["x-steermoe-steering"]
    assert final.model == LOCKED
    assert header.startswith(f"profile=safety; endpoint={LOCKED};")


@pytest.mark.parametrize(("model", "extra", "error", "status"), [
    (LOCKED, {"steering_profile": "concise"}, anthropic.PermissionDeniedError, 403),
    (LOCKED, {"steering_profile": None}, anthropic.PermissionDeniedError, 403),
    ("tiny", {"steering_profile": "nope"}, anthropic.NotFoundError, 404),
    ("tiny", {"steering": {"activate": {"9": [1]}}}, anthropic.BadRequestError, 400),
    ("tiny", {"vllm_xargs": {"steermoe_auth": "forged"}}, anthropic.BadRequestError, 400),
])
def test_messages_errors_have_anthropics_shape(claude, model, extra, error, status):
    with pytest.raises(error) as caught:
        message(claude, model, **extra)
    body = caught.value.body
    assert caught.value.status_code == status
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body


# ---- chat batches, SageMaker, token-level generate ----------------------------------------


def test_chat_batch(http):
    one = http.post("/v1/chat/completions/batch", json={
        "model": "tiny", "messages": [CHAT], "max_tokens": 3, "temperature": 0,
        "steering_profile": "concise", "capture_routing": True})
    assert one.status_code == 200, one.text
    assert_follows(one.json()["routing"], *CONCISE)
    locked = http.post("/v1/chat/completions/batch", json={
        "model": LOCKED, "messages": [CHAT, [{"role": "user", "content": "hi"}]],
        "max_tokens": 3})
    assert locked.status_code == 200 and locked.json()["model"] == LOCKED
    assert len(locked.json()["choices"]) == 2
    assert locked.headers["x-steermoe-steering"].startswith("profile=safety;")
    refused = http.post("/v1/chat/completions/batch", json={
        "model": LOCKED, "messages": [CHAT], "max_tokens": 3, "steering_profile": None})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == 403


@pytest.mark.parametrize("shape", ["chat", "completion"])
def test_invocations(http, shape):
    body = ({"messages": CHAT} if shape == "chat" else {"prompt": PROMPT})
    steered = http.post("/invocations", json={
        "model": "tiny", "max_tokens": 3, "temperature": 0, "steering_profile": "concise",
        "capture_routing": True, **body})
    assert steered.status_code == 200, steered.text
    assert steered.json()["object"] == ("chat.completion" if shape == "chat"
                                        else "text_completion")
    assert_follows(steered.json()["routing"], *CONCISE)
    locked = http.post("/invocations", json={"model": LOCKED, "max_tokens": 3,
                                             "capture_routing": True, **body})
    assert locked.json()["model"] == LOCKED
    assert_follows(locked.json()["routing"], *SAFETY)
    refused = http.post("/invocations", json={"model": LOCKED, "max_tokens": 3,
                                              "steering_profile": "concise", **body})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == \
        "PermissionDeniedError"


def test_inference_generate_cannot_steer(http):
    for body in ({"token_ids": [1, 2], "sampling_params": {"max_tokens": 2,
                                                            "extra_args": {"steering_profile":
                                                                           "concise"}}},
                 {"token_ids": [1, 2], "steering_profile": "concise"}):
        response = http.post("/inference/v1/generate", json=body)
        assert response.status_code == 400
        assert "cannot be steered" in response.json()["error"]["message"]
    locked = http.post("/inference/v1/generate", json={"model": LOCKED, "token_ids": [1]})
    assert locked.status_code == 403


# ---- all at once ----------------------------------------------------------------------------


def test_concurrent_mixed_apis_each_follow_their_own_steering(oai, claude, http):
    jobs = [(api, kind) for api in ("responses", "messages", "batch", "invocations")
            for kind in ("none", "concise", "inline", "locked")] * 2
    random.Random(5).shuffle(jobs)

    def run(job: tuple[str, str]) -> dict[str, Any]:
        api, kind = job
        extra: dict[str, Any] = {"capture_routing": True}
        model = LOCKED if kind == "locked" else "tiny"
        if kind == "concise":
            extra["steering_profile"] = "concise"
        elif kind == "inline":
            extra["steering"] = inline_body(INLINE)
        if api == "responses":
            return respond(oai, model, **extra)[0]
        if api == "messages":
            return message(claude, model, **extra)[0]
        path, conversations = (("/v1/chat/completions/batch", [CHAT]) if api == "batch"
                               else ("/invocations", CHAT))
        response = http.post(path, json={"model": model, "messages": conversations,
                                         "max_tokens": 3, **extra})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(run, jobs))
    expected = {"concise": CONCISE, "inline": INLINE, "locked": SAFETY}
    for (api, kind), body in zip(jobs, results, strict=True):
        if kind == "none":
            assert body["steering"] is None, (api, kind)
            assert_unsteered(body["routing"])
        else:
            assert_follows(body["routing"], *expected[kind])


# ---- metrics and audit ----------------------------------------------------------------------


def _locked_safety_counts(text: str) -> dict[str, float]:
    """steermoe:requests_total of the locked endpoint (profile safety, 200) per API path."""
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if (line.startswith("steermoe:requests_total{") and f'endpoint="{LOCKED}"' in line
                and 'profile="safety"' in line and 'status="200"' in line):
            path = line.split('path="', 1)[1].split('"', 1)[0]
            counts[path] = counts.get(path, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _audit_lines(setup, request_id: str) -> tuple[list[dict], list[dict]]:
    """(all audit lines, those of request_id), waiting briefly for request_id's line (a line
    follows the reply); request_id "" reads the lines as they are."""
    deadline = time.monotonic() + (10 if request_id else 0)
    while True:
        lines = [json.loads(line)
                 for line in (setup["root"] / "audit.jsonl").read_text().splitlines()]
        mine = [line for line in lines if line["request_id"] == request_id]
        if mine or time.monotonic() > deadline:
            return lines, mine
        time.sleep(0.2)


def test_metrics_and_audit_name_each_api(setup, http, oai, claude):
    """This test's own requests, one per API on the locked endpoint, each counted under its
    path (compared before and after); a continuation's audit line says it inherited."""
    paths = ("/v1/responses", "/v1/messages", "/v1/chat/completions/batch", "/invocations")
    before = _locked_safety_counts(http.get("/metrics").text)
    first, _ = respond(oai, LOCKED)
    body, _ = message(claude, LOCKED)
    for path, messages in (("/v1/chat/completions/batch", [CHAT]), ("/invocations", CHAT)):
        response = http.post(path, json={"model": LOCKED, "messages": messages,
                                         "max_tokens": 2})
        assert response.status_code == 200, response.text
    deadline = time.monotonic() + 10  # a request is counted as its reply ends
    while True:
        after = _locked_safety_counts(http.get("/metrics").text)
        delta = {path: after.get(path, 0.0) - before.get(path, 0.0) for path in paths}
        if all(delta.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert delta == dict.fromkeys(paths, 1.0), delta

    _, mine = _audit_lines(setup, body["id"])
    assert len(mine) == 1 and mine[0]["path"] == "/v1/messages"
    assert mine[0]["locked"] is True and mine[0]["prompt_tokens"] == body["usage"]["input_tokens"]
    written = len(_audit_lines(setup, body["id"])[0])
    steered, _ = respond(oai, steering_profile="concise")
    continued, headers = respond(oai, text="and then?", previous_response_id=steered["id"])
    assert headers["x-steermoe-steering"].startswith("profile=concise;")
    deadline = time.monotonic() + 10
    while True:
        new = _audit_lines(setup, "")[0][written:]  # this test's lines after the message
        if len(new) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted((line["path"], line["profile"], line["inherited"]) for line in new) == [
        ("/v1/responses", "concise", False), ("/v1/responses", "concise", True)], new
