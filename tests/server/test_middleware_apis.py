"""The steering layer on every steerable API, over a stand-in for vLLM (no engine): Responses,
Anthropic Messages, chat batches, SageMaker invocations; their error shapes; locked endpoints;
stateful Responses (`previous_response_id`) and retrieval."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.config import ServerConfig
from server.context import SteeringContext
from server.middleware import SteeringMiddleware
from tests.server.server_process import write_profile
from tests.server.test_middleware_asgi import MODEL, ServedModel, request

CHAT = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
IO_USAGE = {"input_tokens": 5, "output_tokens": 3}


def sse(events: list[tuple[str | None, dict[str, Any]]]) -> list[bytes]:
    out = []
    for name, data in events:
        head = f"event: {name}\n" if name else ""
        out.append(f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode())
    return out


class StandIn:
    """Answers like vLLM's generating APIs (model `m`, the base name) and records the bodies."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, Any], dict[str, Any] | None]] = []

    async def __call__(self, scope, receive, send) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw) if raw else None
        self.seen.append((scope, body))
        path = scope["path"]
        stream = isinstance(body, dict) and body.get("stream")
        if stream:
            await self._stream(send, path, body)
            return
        await self._json(send, self._payload(scope, path, body or {}))

    @staticmethod
    def _payload(scope, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if path == "/v1/responses":
            return {"id": body.get("request_id"), "object": "response", "model": "m",
                    "output": [], "usage": {**IO_USAGE, "total_tokens": 8}}
        if path.startswith("/v1/responses/"):
            return {"id": path.split("/")[3], "object": "response", "model": "m"}
        if path == "/v1/messages":
            return {"id": "chatcmpl-9", "type": "message", "role": "assistant", "model": "m",
                    "content": [{"type": "text", "text": "ok"}], "usage": IO_USAGE}
        if path == "/invocations" and "messages" not in body:
            return {"id": "cmpl-3", "object": "text_completion", "model": "m",
                    "choices": [{"index": 0, "text": "ok"}], "usage": USAGE}
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "message": {"content": "ok"}}], "usage": USAGE}

    @staticmethod
    async def _json(send, payload: Any, status: int = 200) -> None:
        raw = json.dumps(payload, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    @staticmethod
    async def _stream(send, path: str, body: dict[str, Any]) -> None:
        if path == "/v1/responses":
            response = {"id": body.get("request_id"), "model": "m", "usage": None}
            done = {**response, "usage": {**IO_USAGE, "total_tokens": 8}}
            events = sse([("response.created", {"type": "response.created",
                                                "response": response}),
                          ("response.output_text.delta", {"type": "response.output_text.delta",
                                                          "delta": "a"}),
                          ("response.completed", {"type": "response.completed",
                                                  "response": done})])
        elif path == "/v1/messages":
            events = sse([("message_start", {"type": "message_start", "message": {
                "id": "chatcmpl-7", "model": "m", "usage": {"input_tokens": 5,
                                                            "output_tokens": 0}}}),
                          ("message_delta", {"type": "message_delta", "usage": IO_USAGE}),
                          ("message_stop", {"type": "message_stop"})])
        else:
            events = sse([(None, {"id": "chatcmpl-2", "model": "m", "choices": []}),
                          (None, {"id": "chatcmpl-2", "model": "m", "choices": [],
                                  "usage": USAGE})])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        # Split mid-line, as a network would.
        data = b"".join(events)
        for start in range(0, len(data), 37):
            await send({"type": "http.response.body", "body": data[start:start + 37],
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def profiles(tmp_path):
    directory = tmp_path / "profiles"
    directory.mkdir()
    write_profile(directory, "safety", MODEL, {1: [5]}, {2: [0]})
    write_profile(directory, "concise", MODEL, {1: [2]})
    write_profile(directory, "unsafe", MODEL, {1: [3]}, tags=["lowers-safety"])
    return directory


def make_app(profiles, **options) -> tuple[SteeringMiddleware, StandIn]:
    config = ServerConfig(profiles_dir=str(profiles), base_names=("m",),
                          endpoints={"m-safe": "safety"}, **options)
    inner = StandIn()
    context = SteeringContext(config, None, served_model=lambda: ServedModel())
    return SteeringMiddleware(inner, context), inner


def last_body(inner: StandIn) -> dict[str, Any]:
    return inner.seen[-1][1]


BODIES = {
    "/v1/responses": {"input": "hi", "max_output_tokens": 2},
    "/v1/messages": {"messages": CHAT, "max_tokens": 2},
    "/v1/chat/completions/batch": {"messages": [CHAT, CHAT], "max_tokens": 2},
    "/invocations": {"messages": CHAT, "max_tokens": 2},
}


def body_for(path: str, model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, **BODIES[path], **extra}


def assert_error_shape(path: str, response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    payload = response.json()
    if path.startswith("/v1/messages"):
        assert set(payload) == {"type", "error"} and payload["type"] == "error", payload
        assert set(payload["error"]) == {"type", "message"}, payload
    else:
        assert set(payload) == {"error"}, payload
        assert set(payload["error"]) == {"message", "type", "param", "code"}, payload
        assert payload["error"]["code"] == status
    return payload["error"]


# ---- steering on every API ------------------------------------------------------------------


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize("where", ["top", "vllm_xargs"])
def test_profile_steers_every_api(profiles, path, where):
    app, inner = make_app(profiles)
    extra = ({"steering_profile": "concise"} if where == "top"
             else {"vllm_xargs": {"steering_profile": "concise", "keep": 1}})
    response = request(app, "POST", path, json=body_for(path, **extra))
    assert response.status_code == 200, response.text
    sent = last_body(inner)
    assert "steering_profile" not in sent
    assert sent["vllm_xargs"]["steering_profile"] == "concise"
    steering = response.json()["steering"]
    assert steering["profile"] == "concise" and steering["locked"] is False
    assert response.headers["x-steermoe-steering"] == (
        f"profile=concise; endpoint=m; digest={steering['digest']}")


@pytest.mark.parametrize("path", list(BODIES))
def test_unsteered_requests_say_none(profiles, path):
    app, inner = make_app(profiles)
    response = request(app, "POST", path, json=body_for(path))
    assert response.status_code == 200
    assert response.headers["x-steermoe-steering"] == "none"
    assert response.json()["steering"] is None
    assert "vllm_xargs" not in last_body(inner)


@pytest.mark.parametrize("path", list(BODIES))
def test_locked_endpoint_on_every_api(profiles, path):
    app, inner = make_app(profiles)
    response = request(app, "POST", path, json=body_for(path, "m-safe"))
    assert response.status_code == 200
    assert last_body(inner)["model"] == "m"
    assert last_body(inner)["vllm_xargs"] == {"steering_profile": "safety"}
    assert response.json()["model"] == "m-safe"
    assert response.json()["steering"]["locked"] is True
    assert response.headers["x-steermoe-steering"].startswith("profile=safety; endpoint=m-safe;")


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize("extra", [{"steering_profile": "concise"}, {"steering_profile": None},
                                   {"vllm_xargs": {"steering_profile": "concise"}},
                                   {"steering": {"activate": {"1": [1]}}}])
def test_locked_endpoint_refuses_overrides_in_the_api_shape(profiles, path, extra):
    app, inner = make_app(profiles, allow_inline_steering=True)
    response = request(app, "POST", path, json=body_for(path, "m-safe", **extra))
    error = assert_error_shape(path, response, 403)
    assert "always runs steering profile 'safety'" in error["message"]
    assert error["type"] == "PermissionDeniedError"
    assert response.headers["x-steermoe-steering"] == "none"
    assert inner.seen == []


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize(("extra", "status"), [
    ({"steering_profile": "missing"}, 404),
    ({"steering_profile": "unsafe"}, 403),
    ({"steering": {"activate": {"1": [1]}}}, 403),
    ({"capture_routing": True}, 403),
    ({"steering_profile": 7}, 400),
    ({"vllm_xargs": [["steering_profile", "unsafe"]]}, 400),
    ({"vllm_xargs": {"steermoe_auth": "forged"}}, 400),
])
def test_bad_steering_gets_the_api_error_shape(profiles, path, extra, status):
    app, inner = make_app(profiles)
    response = request(app, "POST", path, json=body_for(path, **extra))
    assert_error_shape(path, response, status)
    assert inner.seen == []


@pytest.mark.parametrize("path", [*BODIES, "/v1/messages/count_tokens"])
def test_transport_errors_get_the_api_error_shape(profiles, path, monkeypatch):
    app, inner = make_app(profiles, max_request_bytes=200)
    malformed = request(app, "POST", path, content=b"{",
                        headers={"content-type": "application/json"})
    assert_error_shape(path, malformed, 400)
    plain = request(app, "POST", path, content=b"{}", headers={"content-type": "text/plain"})
    assert_error_shape(path, plain, 415)
    big = request(app, "POST", path, json={"model": "m", "input": "x" * 300})
    assert_error_shape(path, big, 413)
    duplicate = request(app, "POST", path, content=b"{}", headers=[
        ("content-type", "application/json"), ("content-type", "application/json")])
    assert_error_shape(path, duplicate, 400)
    assert inner.seen == []
    if path != "/invocations":  # vLLM guards /v1, /v2, /inference, /cohere only
        monkeypatch.setenv("VLLM_API_KEY", "client-key")
        unauthorised = request(app, "POST", path, json=body_for("/v1/messages"))
        assert_error_shape(path, unauthorised, 401)
        assert inner.seen == []


def test_count_tokens_on_a_locked_name_counts_on_the_base_model(profiles):
    app, inner = make_app(profiles)
    response = request(app, "POST", "/v1/messages/count_tokens",
                       json={"model": "m-safe", "messages": CHAT})
    assert response.status_code == 200 and last_body(inner)["model"] == "m"
    refused = request(app, "POST", "/v1/messages/count_tokens",
                      json={"model": "m", "messages": CHAT, "steering_profile": "safety"})
    assert_error_shape("/v1/messages/count_tokens", refused, 400)


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
def test_locked_streams_name_the_endpoint_in_every_event(profiles, path):
    app, _ = make_app(profiles)
    prompt, generated = (app.context.metrics.prompt_tokens.labels(path, "m-safe", "safety"),
                         app.context.metrics.generated_tokens.labels(path, "m-safe", "safety"))
    before = prompt._value.get(), generated._value.get()
    response = request(app, "POST", path, json=body_for(path, "m-safe", stream=True))
    assert response.status_code == 200
    assert response.headers["x-steermoe-steering"].startswith("profile=safety; endpoint=m-safe;")
    assert '"model":"m"' not in response.text
    assert response.text.count('"model":"m-safe"') == (2 if path == "/v1/responses" else 1)
    assert prompt._value.get() - before[0] == 5 and generated._value.get() - before[1] == 3


def test_metrics_and_audit_name_the_api(profiles, tmp_path):
    app, _ = make_app(profiles, audit_log=str(tmp_path / "audit.jsonl"))
    counted = app.context.metrics.requests.labels("/v1/messages", "m-safe", "safety", "200")
    before = counted._value.get()
    request(app, "POST", "/v1/messages", json=body_for("/v1/messages", "m-safe"))
    assert counted._value.get() - before == 1
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["path"] == "/v1/messages" and audit[-1]["prompt_tokens"] == 5
    assert audit[-1]["request_id"] == "chatcmpl-9"


# ---- capture --------------------------------------------------------------------------------


def test_capture_on_responses_fixes_a_unique_request_id(profiles):
    app, inner = make_app(profiles, allow_routing_capture=True)
    response = request(app, "POST", "/v1/responses", json=body_for(
        "/v1/responses", capture_routing=True, request_id="mine"))
    sent = last_body(inner)
    assert sent["request_id"].startswith("mine-") and len(sent["request_id"]) > 30
    assert sent["vllm_xargs"] == {"capture_routing": 1}
    assert response.json()["routing"] is None  # no engine behind the stand-in
    for extra in ({"stream": True}, {"background": True}):
        refused = request(app, "POST", "/v1/responses",
                          json=body_for("/v1/responses", capture_routing=True, **extra))
        assert_error_shape("/v1/responses", refused, 400)


@pytest.mark.parametrize("path", ["/v1/messages", "/invocations", "/v1/chat/completions/batch"])
def test_capture_sends_a_unique_request_id_header(profiles, path):
    app, inner = make_app(profiles, allow_routing_capture=True)
    body = body_for(path, capture_routing=True)
    if path == "/v1/chat/completions/batch":
        refused = request(app, "POST", path, json=body)
        assert "single conversation" in assert_error_shape(path, refused, 400)["message"]
        body["messages"] = [CHAT]
    response = request(app, "POST", path, json=body, headers={"x-request-id": "abc"})
    assert response.status_code == 200 and "routing" in response.json()
    headers = dict(inner.seen[-1][0]["headers"])
    assert headers[b"x-request-id"].startswith(b"abc-")


def test_invocations_as_completion(profiles):
    app, inner = make_app(profiles)
    response = request(app, "POST", "/invocations",
                       json={"model": "m-safe", "prompt": "x", "max_tokens": 2})
    assert response.json()["object"] == "text_completion"
    assert response.json()["model"] == "m-safe"
    assert last_body(inner)["vllm_xargs"] == {"steering_profile": "safety"}


def test_inference_generate_is_not_steerable(profiles):
    app, inner = make_app(profiles)
    for body in ({"token_ids": [1], "steering_profile": "safety"},
                 {"token_ids": [1], "sampling_params": {"extra_args": {"steering": "x"}}},
                 {"token_ids": [1], "model": "m-safe"}):
        response = request(app, "POST", "/inference/v1/generate", json=body)
        assert response.status_code in (400, 403)
    assert inner.seen == []


# ---- stateful Responses ----------------------------------------------------------------------


@pytest.fixture
def stored(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "1")


def respond(app, **body: Any):
    return request(app, "POST", "/v1/responses", json={"input": "hi", **body})


def test_continuation_keeps_the_steering_it_continues(profiles, stored):
    app, inner = make_app(profiles)
    first = respond(app, model="m", steering_profile="concise")
    first_id = first.json()["id"]
    assert first_id.startswith("resp_")
    second = respond(app, model="m", previous_response_id=first_id)
    assert second.json()["steering"]["profile"] == "concise"
    assert last_body(inner)["vllm_xargs"] == {"steering_profile": "concise"}
    third = respond(app, model="m", previous_response_id=second.json()["id"],
                    steering_profile=None)
    assert third.json()["steering"] is None and "vllm_xargs" not in last_body(inner)
    fourth = respond(app, model="m", previous_response_id=third.json()["id"])
    assert fourth.json()["steering"] is None
    other = respond(app, model="m", previous_response_id=first_id, steering_profile="safety")
    assert other.json()["steering"]["profile"] == "safety"


def test_continuation_cannot_leave_a_locked_endpoint(profiles, stored):
    app, inner = make_app(profiles)
    first = respond(app, model="m-safe")
    first_id = first.json()["id"]
    assert first.json()["model"] == "m-safe"
    for extra in ({"model": "m"}, {"model": "m", "steering_profile": None},
                  {"model": "m", "steering_profile": "concise"}):
        refused = respond(app, previous_response_id=first_id, **extra)
        error = assert_error_shape("/v1/responses", refused, 403)
        assert "continue it on 'm-safe'" in error["message"]
    overridden = respond(app, model="m-safe", previous_response_id=first_id,
                         steering_profile=None)
    assert_error_shape("/v1/responses", overridden, 403)
    assert len(inner.seen) == 1
    kept = respond(app, previous_response_id=first_id)  # no model: the locked endpoint
    assert kept.status_code == 200 and kept.json()["model"] == "m-safe"
    assert last_body(inner)["model"] == "m"
    assert last_body(inner)["vllm_xargs"] == {"steering_profile": "safety"}
    again = respond(app, model="m-safe", previous_response_id=kept.json()["id"])
    assert again.json()["steering"]["locked"] is True


def test_a_locked_endpoint_may_continue_an_unlocked_response(profiles, stored):
    app, inner = make_app(profiles)
    first = respond(app, model="m", steering_profile="concise")
    locked = respond(app, model="m-safe", previous_response_id=first.json()["id"])
    assert locked.json()["steering"]["profile"] == "safety"
    assert last_body(inner)["vllm_xargs"] == {"steering_profile": "safety"}


def test_unknown_previous_ids_and_reused_ids(profiles, stored):
    app, inner = make_app(profiles)
    missing = respond(app, model="m", previous_response_id="resp_unknown")
    assert "not found" in assert_error_shape("/v1/responses", missing, 404)["message"]
    wrong = respond(app, model="m", previous_response_id=5)
    assert_error_shape("/v1/responses", wrong, 400)
    first = respond(app, model="m-safe", request_id="chosen")
    assert first.json()["id"] == "chosen"
    reused = respond(app, model="m", request_id="chosen")
    assert_error_shape("/v1/responses", reused, 409)
    assert len(inner.seen) == 1


def test_nothing_is_recorded_without_vllms_store(profiles):
    app, _ = make_app(profiles)
    first = respond(app, model="m-safe")
    assert len(app.context.responses) == 0
    refused = respond(app, previous_response_id=first.json()["id"])
    assert_error_shape("/v1/responses", refused, 404)


def test_retrieval_shows_the_stored_steering(profiles, stored):
    app, _ = make_app(profiles)
    first = respond(app, model="m-safe")
    got = request(app, "GET", f"/v1/responses/{first.json()['id']}")
    assert got.json()["model"] == "m-safe" and got.json()["steering"]["locked"] is True
    assert got.headers["x-steermoe-steering"].startswith("profile=safety; endpoint=m-safe;")
    cancelled = request(app, "POST", f"/v1/responses/{first.json()['id']}/cancel")
    assert cancelled.json()["model"] == "m-safe"
    plain = request(app, "GET", "/v1/responses/resp_other")
    assert "x-steermoe-steering" not in plain.headers and "steering" not in plain.json()


def test_the_map_is_bounded(profiles, stored):
    app, _ = make_app(profiles)
    app.context.responses.max_entries = 3
    ids = [respond(app, model="m-safe").json()["id"] for _ in range(5)]
    assert len(app.context.responses) == 3
    evicted = respond(app, model="m", previous_response_id=ids[0])
    assert_error_shape("/v1/responses", evicted, 404)
    assert respond(app, previous_response_id=ids[-1]).json()["model"] == "m-safe"


def test_an_api_that_drops_vllm_xargs_refuses_steering(profiles, monkeypatch):
    """vLLM 0.26's Messages request has no `vllm_xargs`: steering there would be dropped, so
    the API is treated as one that does not steer."""
    from server import vllm_server_compat as compat

    without = {p: k for p, k in compat.STEERABLE_PATHS.items() if p != "/v1/messages"}
    monkeypatch.setattr(compat, "steerable_paths", lambda: without)
    app, inner = make_app(profiles)
    steered = request(app, "POST", "/v1/messages",
                      json=body_for("/v1/messages", steering_profile="concise"))
    assert "does not pass vllm_xargs" in assert_error_shape("/v1/messages", steered,
                                                            400)["message"]
    locked = request(app, "POST", "/v1/messages", json=body_for("/v1/messages", "m-safe"))
    assert_error_shape("/v1/messages", locked, 403)
    assert inner.seen == []
    plain = request(app, "POST", "/v1/messages", json=body_for("/v1/messages"))
    assert plain.status_code == 200 and "x-steermoe-steering" not in plain.headers
