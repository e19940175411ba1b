"""`SteeringMiddleware` over a stand-in for vLLM's app (no engine): rewriting, policy, answers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from expert_profiles.model_shape import ModelShape
from server.config import ServerConfig
from server.context import SteeringContext
from server.middleware import SteeringMiddleware
from tests.server.server_process import write_profile

MODEL = {"architecture": "Qwen3MoeForCausalLM", "num_layers": 4, "num_experts": 8, "top_k": 2}
SHAPE = ModelShape("Qwen3MoeForCausalLM", 4, 8, 2, (0, 1, 2, 3))
TOKEN = "admin-secret"
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


class ServedModel:
    eps = 0.01

    def served_shape(self) -> tuple[ModelShape | None, str | None]:
        return SHAPE, None


def _wants_stream(body: bytes) -> bool:
    try:
        return bool(json.loads(body).get("stream"))
    except (ValueError, AttributeError):
        return False


class StandInVLLM:
    """Records what reaches it and answers like vLLM's completion and model routes."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, Any], bytes]] = []

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((scope, body))
        if scope["path"] == "/v1/models":
            payload: Any = {"object": "list", "data": [{"id": "m"}]}  # vLLM serves base names
        elif _wants_stream(body):
            await self._stream(send)
            return
        else:
            payload = {"id": "cmpl-1", "object": "text_completion", "usage": USAGE,
                       "choices": [{"index": 0, "text": "ok"}]}
        raw = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    @staticmethod
    async def _stream(send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        events = [{"id": "cmpl-2", "choices": [{"text": "a"}]},
                  {"id": "cmpl-2", "choices": [], "usage": USAGE}]
        for event in events:
            line = f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
            await send({"type": "http.response.body", "body": line, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


@pytest.fixture
def profiles(tmp_path):
    directory = tmp_path / "profiles"
    directory.mkdir()
    write_profile(directory, "safety", MODEL, {1: [5]}, {2: [0]})
    write_profile(directory, "concise", MODEL, {1: [2]})
    write_profile(directory, "unsafe", MODEL, {1: [3]}, tags=["lowers-safety"])
    return directory


def make_app(profiles, admin_token: str | None = TOKEN, served: Any = ServedModel,
             **options) -> tuple[SteeringMiddleware, StandInVLLM]:
    config = ServerConfig(profiles_dir=str(profiles), base_names=("m",),
                          endpoints={"m-safe": "safety"}, **options)
    inner = StandInVLLM()
    context = SteeringContext(config, admin_token,
                              served_model=(lambda: served()) if served else (lambda: None))
    return SteeringMiddleware(inner, context), inner


def request(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def forwarded(inner: StandInVLLM) -> dict[str, Any]:
    scope, body = inner.seen[-1]
    length = dict(scope["headers"])[b"content-length"]
    assert int(length) == len(body)
    return json.loads(body)


def test_profile_moves_into_vllm_xargs_and_response_is_marked(profiles):
    app, inner = make_app(profiles)
    response = request(app, "POST", "/v1/completions", json={
        "model": "m", "prompt": "hi", "steering_profile": "safety",
        "vllm_xargs": {"keep": "me"}})
    assert response.status_code == 200
    assert forwarded(inner) == {"model": "m", "prompt": "hi",
                                "vllm_xargs": {"keep": "me", "steering_profile": "safety"}}
    steering = response.json()["steering"]
    assert steering["profile"] == "safety" and steering["endpoint"] == "m"
    assert response.headers["x-steermoe-steering"] == (
        f"profile=safety; endpoint=m; digest={steering['digest']}")
    assert int(response.headers["content-length"]) == len(response.content)


def test_unsteered_request_passes_with_none(profiles):
    app, inner = make_app(profiles)
    response = request(app, "POST", "/v1/chat/completions", json={"model": "m", "messages": []})
    assert forwarded(inner) == {"model": "m", "messages": []}
    assert response.headers["x-steermoe-steering"] == "none"
    assert response.json()["steering"] is None


def test_locked_endpoint_gets_its_profile(profiles):
    app, inner = make_app(profiles)
    response = request(app, "POST", "/v1/chat/completions", json={"model": "m-safe"})
    assert forwarded(inner)["vllm_xargs"] == {"steering_profile": "safety"}
    assert response.json()["steering"]["locked"] is True
    beam = request(app, "POST", "/v1/chat/completions",
                   json={"model": "m-safe", "use_beam_search": True})
    assert beam.status_code == 400 and len(inner.seen) == 1


def test_capture_gets_a_unique_request_id(profiles):
    app, inner = make_app(profiles, allow_routing_capture=True)
    response = request(app, "POST", "/v1/completions", headers={"x-request-id": "mine"},
                       json={"model": "m", "prompt": "hi", "capture_routing": True})
    scope, _ = inner.seen[-1]
    request_ids = [v for k, v in scope["headers"] if k == b"x-request-id"]
    assert len(request_ids) == 1 and request_ids[0].startswith(b"mine-")
    assert forwarded(inner)["vllm_xargs"] == {"capture_routing": 1}
    assert response.json()["routing"] is None  # no engine behind the stand-in


@pytest.mark.parametrize(("options", "body", "status"), [
    ({}, {"steering": {"activate": {"1": [1]}}}, 403),
    ({}, {"capture_routing": True}, 403),
    ({}, {"steering_profile": "unsafe"}, 403),
    ({"client_profiles": ("unsafe",)}, {"steering_profile": "safety"}, 403),
    ({"client_profiles": ()}, {"steering_profile": "concise"}, 403),
    ({}, {"steering_profile": "missing"}, 404),
    ({"allow_inline_steering": True}, {"steering": {"activate": {"1": [1, 2, 3]}}}, 400),
    ({}, {"steering_profile": "safety", "use_beam_search": True}, 400),
    # inline steering as JSON text too deep, or with a number too long, to parse
    ({}, {"steering": "[" * 100_000}, 400),
    ({}, {"vllm_xargs": {"steering": "9" * 5000}}, 400),
    ({}, {"capture_routing": None}, 400),
])
def test_refused_requests_never_reach_vllm(profiles, options, body, status):
    app, inner = make_app(profiles, **options)
    response = request(app, "POST", "/v1/completions", json={"model": "m", "prompt": "x", **body})
    assert response.status_code == status
    assert response.json()["error"]["code"] == status
    assert response.headers["x-steermoe-steering"] == "none"
    assert inner.seen == []


def test_operator_can_open_a_lowers_safety_profile(profiles):
    app, inner = make_app(profiles, client_profiles=("unsafe",))
    response = request(app, "POST", "/v1/completions", json={"model": "m",
                                                             "steering_profile": "unsafe"})
    assert response.status_code == 200
    assert forwarded(inner)["vllm_xargs"] == {"steering_profile": "unsafe"}


def test_profile_for_another_model_is_409(profiles):
    write_profile(profiles, "olmoe", {"architecture": "OlmoeForCausalLM", "num_layers": 16,
                                      "num_experts": 64, "top_k": 8}, {1: [5]})
    app, _ = make_app(profiles)
    response = request(app, "POST", "/v1/completions", json={"model": "m",
                                                             "steering_profile": "olmoe"})
    assert response.status_code == 409
    assert response.json()["error"]["type"] == "ConflictError"


def test_body_limits(profiles):
    app, inner = make_app(profiles, max_request_bytes=100)
    big = {"model": "m", "prompt": "x" * 200}
    assert request(app, "POST", "/v1/completions", json=big).status_code == 413

    async def chunks():
        for _ in range(4):
            yield b" " * 40

    response = request(app, "POST", "/v1/completions", content=chunks(),
                       headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert request(app, "POST", "/v1/responses", json=big).status_code == 413
    assert inner.seen == []


def test_malformed_json_and_other_media_types(profiles):
    app, inner = make_app(profiles)
    bad = request(app, "POST", "/v1/completions", content=b"{",
                  headers={"content-type": "application/json"})
    assert bad.status_code == 400 and inner.seen == []
    plain = request(app, "POST", "/v1/completions", content=b"{",
                    headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and inner.seen == []  # never forwarded unchecked


def test_streaming_passes_through_with_the_header(profiles):
    app, _ = make_app(profiles)
    response = request(app, "POST", "/v1/completions", json={
        "model": "m-safe", "prompt": "hi", "stream": True})
    assert response.headers["x-steermoe-steering"].startswith("profile=safety; endpoint=m-safe")
    assert response.text.endswith("data: [DONE]\n\n")
    tokens = app.context.metrics.generated_tokens.labels("/v1/completions", "m-safe", "safety")
    assert tokens._value.get() >= 3


def test_other_paths_are_policed(profiles):
    app, inner = make_app(profiles)
    steering = request(app, "POST", "/v1/embeddings", json={"model": "m", "input": "x",
                                                            "steering_profile": "safety"})
    assert steering.status_code == 400
    forged = request(app, "POST", "/inference/v1/generate", json={
        "sampling_params": {"extra_args": {"steermoe": {"activate": {}}}}})
    assert forged.status_code == 400
    assert "cannot be steered" in forged.json()["error"]["message"]
    generate = request(app, "POST", "/inference/v1/generate", json={
        "token_ids": [1], "sampling_params": {"extra_args": {"steering_profile": "safety"}}})
    assert generate.status_code == 400
    locked = request(app, "POST", "/v1/embeddings", json={"model": "m-safe", "input": "x"})
    assert locked.status_code == 403
    assert inner.seen == []
    assert request(app, "POST", "/tokenize", json={"model": "m-safe", "prompt": "x"}).is_success
    assert request(app, "POST", "/v1/audio/transcriptions", files={"file": b"x"}).is_success
    assert len(inner.seen) == 2


def test_models_are_marked(profiles):
    app, _ = make_app(profiles)
    cards = request(app, "GET", "/v1/models").json()["data"]
    assert cards == [{"id": "m", "steering": {"locked": False, "profile": None}},
                     {"id": "m-safe", "root": None,
                      "steering": {"locked": True, "profile": "safety"}}]


def test_profile_api_for_clients(profiles):
    app, _ = make_app(profiles)
    listing = request(app, "GET", "/v1/steering/profiles").json()
    assert {entry["id"] for entry in listing["data"]} == {"safety", "concise"}
    assert "errors" not in listing
    assert request(app, "GET", "/v1/steering/profiles/unsafe").status_code == 404
    assert request(app, "GET", "/v1/steering/profiles/concise").json()["profile"]["activate"] == {
        "1": [2]}
    assert request(app, "GET", "/v1/steering/nothing").status_code == 404
    wrong = request(app, "POST", "/v1/steering/profiles")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"


def test_admin_api_disabled_without_a_token(profiles):
    app, _ = make_app(profiles, admin_token=None)
    for method in ("PUT", "DELETE"):
        response = request(app, method, "/v1/steering/profiles/concise",
                           headers={"authorization": "Bearer anything"},
                           **({"json": {"model": MODEL}} if method == "PUT" else {}))
        assert response.status_code == 403
        assert "disabled" in response.json()["error"]["message"]
    assert (profiles / "concise.json").exists()


def test_admin_writes_go_through_the_store(profiles):
    app, _ = make_app(profiles)
    auth = {"authorization": f"Bearer {TOKEN}"}
    put = request(app, "PUT", "/v1/steering/profiles/fresh", headers=auth,
                  json={"model": MODEL, "activate": {"2": [1]}, "tags": ["lowers-safety"]})
    assert put.status_code == 201
    stored = json.loads((profiles / "fresh.json").read_text())
    assert stored["name"] == "fresh" and stored["format"] == "steermoe-profile/1"
    assert put.json()["client_selectable"] is False
    assert not list(profiles.glob(".*.tmp"))
    listing = request(app, "GET", "/v1/steering/profiles", headers=auth).json()
    assert "fresh" in {entry["id"] for entry in listing["data"]}
    assert request(app, "DELETE", "/v1/steering/profiles/fresh", headers=auth).status_code == 200
    assert not (profiles / "fresh.json").exists()


def test_admin_writes_reach_requests_through_one_store(profiles):
    """The admin API and requests read the directory through one ProfileStore (one cache):
    a replaced profile steers the next request, a deleted one is unknown to it."""
    app, inner = make_app(profiles)
    assert app.context.store is app.context.profiles.store
    auth = {"authorization": f"Bearer {TOKEN}"}
    steer = {"model": "m", "prompt": "hi", "steering_profile": "concise"}
    first = request(app, "POST", "/v1/completions", json=steer).json()["steering"]["digest"]
    assert request(app, "PUT", "/v1/steering/profiles/concise", headers=auth,
                   json={"model": MODEL, "activate": {"3": [7]}}).status_code == 200
    second = request(app, "POST", "/v1/completions", json=steer).json()["steering"]["digest"]
    assert second != first
    assert forwarded(inner)["vllm_xargs"] == {"steering_profile": "concise"}
    assert request(app, "DELETE", "/v1/steering/profiles/concise", headers=auth).status_code \
        == 200
    assert request(app, "POST", "/v1/completions", json=steer).status_code == 404


def test_vllm_api_keys_guard_steering_paths(profiles, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "client-key")
    app, inner = make_app(profiles)
    assert request(app, "GET", "/v1/steering/profiles").status_code == 401
    ok = request(app, "GET", "/v1/steering/profiles",
                 headers={"authorization": "Bearer client-key"})
    assert ok.status_code == 200
    refused = request(app, "POST", "/v1/completions",
                      json={"model": "m", "steering_profile": "nope"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == 401
    assert inner.seen == []  # answered by the steering layer, never forwarded


def test_steering_needs_the_plugin(profiles):
    app, inner = make_app(profiles, served=None)
    response = request(app, "POST", "/v1/completions", json={"model": "m",
                                                             "steering_profile": "safety"})
    assert response.status_code == 503
    assert request(app, "POST", "/v1/completions", json={"model": "m"}).is_success
