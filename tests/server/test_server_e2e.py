"""The steering server end to end: a real `steermoe serve` on a tiny Qwen3-MoE, OpenAI SDK client.

One server for the module, started with a locked endpoint, inline steering, routing capture,
an admin token, a small body limit and an audit log. Captured routing is the oracle: a steered
response's rows hold its profile's activated experts and none of its deactivated ones.
"""

from __future__ import annotations

import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from profile_tools.checkpoint_factory import model_shape
from tests.server.routing_checks import assert_follows, follows
from tests.server.server_process import CONCISE, LAYERS, SAFETY, steermoe_server, write_profile

pytestmark = pytest.mark.engine

ADMIN_TOKEN = "test-admin-token"
MAX_BODY = 64 * 1024
UNSAFE = ({layer: [3] for layer in LAYERS}, {})
INLINE = ({layer: [4] for layer in LAYERS}, {layer: [2, 3] for layer in LAYERS})
ADDED = ({1: [6], 3: [6]}, {2: [5]})
PROMPTS = [
    "Water boils at 100 degrees Celsius at sea level and freezes at",
    "The user asked the assistant for a summary of the article and",
    "Hello, world! How are you today? I am fine, thank you. Good",
    "def add(a, b): return a + b  # a tiny function in a programming",
]


def inline_body(sets: tuple[dict, dict]) -> dict[str, Any]:
    activate, deactivate = sets
    return {"activate": {str(k): v for k, v in activate.items()},
            "deactivate": {str(k): v for k, v in deactivate.items()}}


@pytest.fixture(scope="module")
def setup(build_tiny, tmp_path_factory) -> dict[str, Any]:
    checkpoint = build_tiny("qwen3_moe")
    shape = model_shape(checkpoint)
    model = {key: shape[key] for key in ("architecture", "num_layers", "num_experts", "top_k")}
    root = tmp_path_factory.mktemp("steering_server")
    profiles = root / "profiles"
    profiles.mkdir()
    write_profile(profiles, "safety", model, *SAFETY, description="keeps to safe experts")
    write_profile(profiles, "concise", model, *CONCISE)
    write_profile(profiles, "unsafe", model, *UNSAFE, tags=["lowers-safety"])
    write_profile(profiles, "olmoe-only", {"architecture": "OlmoeForCausalLM", "num_layers": 16,
                                           "num_experts": 64, "top_k": 8}, {3: [1]}, {})
    (profiles / "broken.json").write_text("{not json", encoding="utf-8")
    return {"checkpoint": checkpoint, "model": model, "root": root, "profiles": profiles}


@pytest.fixture(scope="module")
def server(setup):
    root = setup["root"]
    args = ["--profiles", str(setup["profiles"]), "--endpoint", "qwen-safe=safety",
            "--allow-inline-steering", "--allow-routing-capture",
            "--max-request-bytes", str(MAX_BODY), "--audit-log", str(root / "audit.jsonl")]
    with steermoe_server(setup["checkpoint"], args, root / "server.log",
                         env={"STEERMOE_ADMIN_TOKEN": ADMIN_TOKEN}) as running:
        yield running


@pytest.fixture(scope="module")
def base_model(setup) -> str:
    return str(setup["checkpoint"])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as session:
        yield session


def admin(token: str | None = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def complete(client: openai.OpenAI, model: str, prompt: str = PROMPTS[0], max_tokens: int = 6,
             **extra: Any) -> tuple[dict[str, Any], httpx.Headers]:
    raw = client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body=extra or None,
    )
    return raw.http_response.json(), raw.headers


def chat(client: openai.OpenAI, model: str, content: str = PROMPTS[1], max_tokens: int = 6,
         **extra: Any) -> tuple[dict[str, Any], httpx.Headers]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0, extra_body=extra or None,
    )
    return raw.http_response.json(), raw.headers


# ---- steered and unsteered calls ----------------------------------------------------------


def test_models_lists_base_and_locked_endpoint(client, base_model):
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {base_model, "qwen-safe"}
    assert cards["qwen-safe"].model_extra["steering"] == {"locked": True, "profile": "safety"}
    assert cards[base_model].model_extra["steering"] == {"locked": False, "profile": None}


def test_unsteered_chat_says_none(client, base_model):
    body, headers = chat(client, base_model, capture_routing=True)
    assert headers["x-steermoe-steering"] == "none"
    assert body["steering"] is None
    assert body["choices"][0]["message"]["content"] is not None
    assert not follows(body["routing"], *SAFETY) and not follows(body["routing"], *CONCISE)


def test_profile_steers_completion(client, base_model):
    body, headers = complete(client, base_model, steering_profile="safety",
                             capture_routing=True)
    assert re.fullmatch(rf"profile=safety; endpoint={re.escape(base_model)}; digest=\w+",
                        headers["x-steermoe-steering"])
    assert body["steering"]["profile"] == "safety" and body["steering"]["locked"] is False
    assert body["steering"]["digest"] in headers["x-steermoe-steering"]
    assert_follows(body["routing"], *SAFETY)
    rows = len(body["routing"]["expert_ids"])
    usage = body["usage"]
    assert rows == usage["prompt_tokens"] + usage["completion_tokens"] - 1


def test_profile_steers_chat_through_vllm_xargs(client, base_model):
    body, headers = chat(client, base_model,
                         vllm_xargs={"steering_profile": "concise", "capture_routing": True})
    assert headers["x-steermoe-steering"].startswith("profile=concise;")
    assert_follows(body["routing"], *CONCISE)


def test_inline_steering(client, base_model):
    body, headers = chat(client, base_model, steering=inline_body(INLINE),
                         capture_routing=True)
    assert headers["x-steermoe-steering"].startswith("inline;")
    assert body["steering"]["inline"] is True and body["steering"]["profile"] is None
    assert_follows(body["routing"], *INLINE)


def test_steering_strength_scales_a_profile_from_nothing_to_all_of_it(client, base_model):
    """Strength 0 routes exactly as unsteered, 1 as the profile; each has its own digest."""
    prompt = "A strength of zero must route this sentence exactly as if it were unsteered"
    plain, _ = complete(client, base_model, prompt, capture_routing=True)
    results = {}
    for strength in (0.0, 0.5, 1.0):
        body, headers = complete(client, base_model, prompt, steering_profile="safety",
                                 steering_strength=strength, capture_routing=True)
        assert f"strength={strength:g}" in headers["x-steermoe-steering"]
        assert body["steering"]["strength"] == strength
        results[strength] = body
    assert results[0.0]["routing"]["expert_ids"] == plain["routing"]["expert_ids"]
    assert not follows(results[0.0]["routing"], *SAFETY)
    assert_follows(results[1.0]["routing"], *SAFETY)
    assert len({body["steering"]["digest"] for body in results.values()}) == 3
    full, _ = complete(client, base_model, PROMPTS[2], steering_profile="safety")
    assert full["steering"]["digest"] == results[1.0]["steering"]["digest"]


def test_inline_bias_steers_through_the_server(client, base_model):
    """A large bias puts its expert in every token's top-k, in every layer."""
    sets = {"bias": {str(layer): {"4": 40.0} for layer in LAYERS}}
    body, headers = chat(client, base_model, steering=sets, capture_routing=True)
    assert headers["x-steermoe-steering"].startswith("inline;")
    assert_follows(body["routing"], {layer: [4] for layer in LAYERS}, {})
    weak, _ = chat(client, base_model, steering=sets, steering_strength=0.0,
                   capture_routing=True)
    assert not follows(weak["routing"], {layer: [4] for layer in LAYERS}, {})


def test_streaming_carries_the_header(client, base_model):
    raw = client.chat.completions.with_raw_response.create(
        model=base_model, messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=5,
        stream=True, stream_options={"include_usage": True},
        extra_body={"steering_profile": "concise"},
    )
    assert raw.headers["x-steermoe-steering"].startswith("profile=concise;")
    chunks = list(raw.parse())
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_streaming_completion_on_locked_endpoint(client):
    raw = client.completions.with_raw_response.create(
        model="qwen-safe", prompt=PROMPTS[3], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["x-steermoe-steering"].startswith("profile=safety; endpoint=qwen-safe;")
    chunks = list(raw.parse())
    assert chunks and all(chunk.model == "qwen-safe" for chunk in chunks)
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text, "the stream carried no text"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    # The same request unstreamed (greedy) on the locked endpoint gives the same text.
    body, _ = complete(client, "qwen-safe", prompt=PROMPTS[3], max_tokens=4)
    assert body["choices"][0]["text"] == text


# ---- the locked endpoint ------------------------------------------------------------------


def test_locked_endpoint_always_runs_its_profile(client):
    body, headers = chat(client, "qwen-safe", capture_routing=True)
    assert headers["x-steermoe-steering"].startswith("profile=safety; endpoint=qwen-safe;")
    assert body["steering"]["locked"] is True and body["steering"]["endpoint"] == "qwen-safe"
    assert_follows(body["routing"], *SAFETY)
    same, _ = complete(client, "qwen-safe", steering_profile="safety", capture_routing=True)
    assert_follows(same["routing"], *SAFETY)


@pytest.mark.parametrize("extra", [
    {"steering_profile": "concise"},
    {"steering_profile": None},
    {"vllm_xargs": {"steering_profile": "concise"}},
    {"steering": inline_body(INLINE)},
    {"steering_profile": "safety", "steering_strength": 0.0},
])
def test_locked_endpoint_refuses_other_steering(client, extra):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        chat(client, "qwen-safe", **extra)
    assert caught.value.body["code"] == 403
    assert "always runs steering profile 'safety'" in caught.value.body["message"]


def test_locked_endpoint_on_other_apis(http):
    """The steerable APIs run it with its profile (tests/server/test_server_apis.py); routes
    that generate without steering refuse it."""
    response = http.post("/v1/responses", json={"model": "qwen-safe", "input": "hi",
                                                "max_output_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.headers["x-steermoe-steering"].startswith("profile=safety;")
    assert response.json()["model"] == "qwen-safe"
    refused = http.post("/v1/embeddings", json={"model": "qwen-safe", "input": "hi"})
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "PermissionDeniedError"


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "error", "status", "param"), [
    ({"steering_profile": "nope"}, openai.NotFoundError, 404, "steering_profile"),
    ({"steering_profile": "unsafe"}, openai.PermissionDeniedError, 403, "steering_profile"),
    ({"steering_profile": "olmoe-only"}, openai.ConflictError, 409, "steering_profile"),
    ({"steering_profile": "broken"}, openai.InternalServerError, 500, "steering_profile"),
    ({"steering": {"activate": {"9": [1]}}}, openai.BadRequestError, 400, "steering"),
    ({"steering": {"activate": {"1": [1, 2, 3]}}}, openai.BadRequestError, 400, "steering"),
    ({"steering": "not an object"}, openai.BadRequestError, 400, "steering"),
    ({"steering_profile": 7}, openai.BadRequestError, 400, "steering_profile"),
    ({"steering_profile": "safety", "steering": {"activate": {"1": [1]}}},
     openai.BadRequestError, 400, "steering"),
    ({"vllm_xargs": {"steermoe": "forged"}}, openai.BadRequestError, 400, "vllm_xargs"),
    ({"capture_routing": "yes"}, openai.BadRequestError, 400, "capture_routing"),
    ({"steering_strength": 0.5}, openai.BadRequestError, 400, "steering_strength"),
    ({"steering_profile": "safety", "steering_strength": 1.5}, openai.BadRequestError, 400,
     "steering_strength"),
    ({"steering_profile": "safety", "steering_strength": True}, openai.BadRequestError, 400,
     "steering_strength"),
    ({"steering": {"bias": {"1": {"2": "big"}}}}, openai.BadRequestError, 400, "steering"),
    ({"steering": {"bias": {"1": {"99": 1.0}}}}, openai.BadRequestError, 400, "steering"),
    ({"steering": {"bias": {"1": {"2": 10**400}}}}, openai.BadRequestError, 400, "steering"),
    ({"steering_profile": "safety", "steering_strength": 10**400}, openai.BadRequestError, 400,
     "steering_strength"),
    ({"steering_guard": "no-such-guard"}, openai.NotFoundError, 404, "steering_guard"),
    ({"steering_guard": "../x"}, openai.BadRequestError, 400, "steering_guard"),
    ({"capture_routing": True, "n": 2}, openai.BadRequestError, 400, "capture_routing"),
])
def test_steering_errors(client, base_model, extra, error, status, param):
    with pytest.raises(error) as caught:
        chat(client, base_model, **extra)
    body = caught.value.body
    assert body["code"] == status and body["param"] == param
    assert set(body) == {"message", "type", "param", "code"}


def test_capture_refused_for_streams(http, base_model):
    response = http.post("/v1/completions", json={
        "model": base_model, "prompt": "hi", "max_tokens": 2, "stream": True,
        "capture_routing": True})
    assert response.status_code == 400
    assert "non-streaming" in response.json()["error"]["message"]


def test_malformed_json_and_large_body(http, base_model):
    bad = http.post("/v1/chat/completions", content=b'{"model": ',
                    headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequestError"
    big = http.post("/v1/completions", json={"model": base_model, "prompt": "x" * MAX_BODY})
    assert big.status_code == 413
    assert big.json()["error"] == {"message": f"the request body exceeds {MAX_BODY} bytes",
                                   "type": "RequestTooLargeError", "param": None, "code": 413}


def test_vllm_errors_keep_their_format(client, base_model):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, base_model, max_tokens=100000, steering_profile="safety")
    assert caught.value.body["code"] == 400


# ---- profile API --------------------------------------------------------------------------


def test_client_profile_listing(http):
    listing = http.get("/v1/steering/profiles").json()
    names = {entry["id"] for entry in listing["data"]}
    assert names == {"safety", "concise"}  # not lowers-safety, not for another model
    one = http.get("/v1/steering/profiles/safety").json()
    assert one["endpoints"] == ["qwen-safe"] and one["profile"]["activate"]["1"] == [5]
    assert http.get("/v1/steering/profiles/unsafe").status_code == 404
    endpoints = http.get("/v1/steering/endpoints").json()
    assert {"id": "qwen-safe", "object": "steering_endpoint", "profile": "safety",
            "locked": True, "client_profiles": []} in endpoints["data"]


def test_admin_listing_shows_everything(http):
    listing = http.get("/v1/steering/profiles", headers=admin()).json()
    assert {entry["id"] for entry in listing["data"]} == {"safety", "concise", "unsafe"}
    assert set(listing["errors"]) == {"broken.json", "olmoe-only.json"}


def test_admin_api_needs_the_token(http, setup):
    profile = {"model": setup["model"], "activate": {"1": [6]}}
    for headers, status in ((admin(None), 401), (admin("wrong"), 401)):
        response = http.put("/v1/steering/profiles/new-one", json=profile, headers=headers)
        assert response.status_code == status
        assert response.json()["error"]["type"] == "AuthenticationError"
        assert response.headers["www-authenticate"] == "Bearer"
    assert http.delete("/v1/steering/profiles/concise").status_code == 401
    assert http.post("/v1/steering/profiles:reload").status_code == 401
    assert not (setup["profiles"] / "new-one.json").exists()


def test_admin_puts_uses_and_deletes_a_profile(http, client, base_model, setup):
    activate, deactivate = ADDED
    profile = {"model": setup["model"], **inline_body(ADDED), "description": "added over HTTP"}
    created = http.put("/v1/steering/profiles/added", json=profile, headers=admin())
    assert created.status_code == 201, created.text
    assert created.json()["client_selectable"] is True
    body, _ = complete(client, base_model, steering_profile="added", capture_routing=True)
    assert_follows(body["routing"], activate, deactivate)
    replaced = http.put("/v1/steering/profiles/added",
                        json={**profile, "activate": {"1": [7]}}, headers=admin())
    assert replaced.status_code == 200
    body, _ = complete(client, base_model, steering_profile="added", capture_routing=True)
    assert_follows(body["routing"], {1: [7]}, deactivate)
    deleted = http.delete("/v1/steering/profiles/added", headers=admin())
    assert deleted.json() == {"id": "added", "object": "steering_profile", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        complete(client, base_model, steering_profile="added")
    assert http.delete("/v1/steering/profiles/added", headers=admin()).status_code == 404


@pytest.mark.parametrize(("name", "profile", "status"), [
    ("wrong-model", {"model": {"architecture": "OlmoeForCausalLM", "num_layers": 16,
                               "num_experts": 64, "top_k": 8}, "activate": {"1": [1]}}, 409),
    ("too-many", {"activate": {"1": [1, 2, 3]}}, 400),
    ("mismatch", {"name": "other", "activate": {"1": [1]}}, 400),
    ("bad name!", {"activate": {"1": [1]}}, 400),
])
def test_admin_put_validates(http, setup, name, profile, status):
    body = {"model": setup["model"], **profile}
    response = http.put(f"/v1/steering/profiles/{name}", json=body, headers=admin())
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == status


def test_admin_cannot_delete_a_locked_profile(http, setup):
    response = http.delete("/v1/steering/profiles/safety", headers=admin())
    assert response.status_code == 409
    assert (setup["profiles"] / "safety.json").exists()


def test_admin_reload_reports_errors(http):
    response = http.post("/v1/steering/profiles:reload", headers=admin())
    assert response.status_code == 200
    data = response.json()
    assert {"safety", "concise", "unsafe"} <= set(data["loaded"])
    assert "broken.json" in data["errors"]


# ---- many requests at once ----------------------------------------------------------------


def test_concurrent_mixed_requests_each_follow_their_own_steering(client, base_model):
    kinds = ["none", "safety", "concise", "inline", "locked", "none", "unknown", "malformed"] * 6
    random.Random(0).shuffle(kinds)

    def run(index: int) -> tuple[str, Any]:
        kind = kinds[index]
        prompt = f"{PROMPTS[index % len(PROMPTS)]} {index}"
        extra: dict[str, Any] = {"capture_routing": True}
        model = base_model
        if kind in ("safety", "concise"):
            extra["steering_profile"] = kind
        elif kind == "inline":
            extra["steering"] = inline_body(INLINE)
        elif kind == "locked":
            model = "qwen-safe"
        elif kind == "unknown":
            extra["steering_profile"] = f"missing-{index}"
        elif kind == "malformed":
            extra["steering"] = {"activate": {"1": [1, 2, 3]}}
        try:
            send = chat if index % 2 else complete
            body, headers = send(client, model, prompt, max_tokens=5, **extra)
            return kind, (body, headers)
        except openai.APIStatusError as exc:
            return kind, exc

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(run, range(len(kinds))))

    expected = {"safety": SAFETY, "concise": CONCISE, "inline": INLINE, "locked": SAFETY}
    for kind, result in results:
        if kind in ("unknown", "malformed"):
            refused = openai.NotFoundError if kind == "unknown" else openai.BadRequestError
            assert isinstance(result, refused), result
            continue
        assert not isinstance(result, Exception), (kind, result)
        body, headers = result
        if kind == "none":
            assert headers["x-steermoe-steering"] == "none"
            for sets in expected.values():
                assert not follows(body["routing"], *sets)
        else:
            assert headers["x-steermoe-steering"] != "none"
            assert_follows(body["routing"], *expected[kind])


# ---- metrics and audit --------------------------------------------------------------------


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metrics_text(http) -> str:
    return http.get("/metrics").text


def test_metrics(http, client, base_model, setup):
    """Counts are compared before and after this test's own requests."""
    series = {
        "locked": ("steermoe:requests_total",
                   {"endpoint": "qwen-safe", "profile": "safety", "status": "200"}),
        "plain": ("steermoe:requests_total",
                  {"endpoint": base_model, "profile": "none", "status": "200"}),
        "rejected": ("steermoe:requests_total", {"profile": "rejected", "status": "404"}),
        "tokens": ("steermoe:generated_tokens_total", {"profile": "safety"}),
        "latency": ("steermoe:request_latency_seconds_count", {"profile": "concise"}),
        "put": ("steermoe:admin_operations_total", {"operation": "put"}),
    }

    def values() -> dict[str, float]:
        text = metrics_text(http)
        return {key: metric_value(text, name, **labels) for key, (name, labels) in series.items()}

    before = values()
    chat(client, "qwen-safe", max_tokens=3)
    complete(client, "qwen-safe", max_tokens=3)
    chat(client, base_model, max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        chat(client, base_model, steering_profile="not-there")
    chat(client, base_model, max_tokens=3, steering_profile="concise")
    put = http.put("/v1/steering/profiles/metrics-probe",
                   json={"model": setup["model"], "activate": {"1": [6]}}, headers=admin())
    assert put.status_code == 201, put.text
    assert http.delete("/v1/steering/profiles/metrics-probe", headers=admin()).status_code == 200
    expected = {"locked": 2, "plain": 1, "rejected": 1, "latency": 1, "put": 1}
    deadline = time.monotonic() + 10  # a request is counted as its reply ends
    while True:
        after = values()
        delta = {key: after[key] - before[key] for key in series}
        if all(delta[key] >= n for key, n in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {key: delta[key] for key in expected} == expected, delta
    assert delta["tokens"] > 0, delta
    text = metrics_text(http)
    assert "vllm:" in text  # vLLM's own metrics are still there
    # Gauges: safety, concise, unsafe loaded; broken.json and olmoe-only.json fail to load.
    assert metric_value(text, "steermoe:profiles_loaded") == 3
    assert metric_value(text, "steermoe:profile_load_errors") == 2


def audit_lines(path: Path, request_id: str) -> tuple[list[dict], list[dict]]:
    """(all lines, lines of request_id), waiting briefly: a line is written after the reply."""
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        mine = [line for line in lines if line["request_id"] == request_id]
        if mine or time.monotonic() > deadline:
            return lines, mine
        time.sleep(0.1)


def test_audit_log_has_one_line_per_steered_request(setup, client):
    path = setup["root"] / "audit.jsonl"
    written_before = len(path.read_text().splitlines())
    with pytest.raises(openai.PermissionDeniedError):
        chat(client, "qwen-safe", steering_profile="concise", max_tokens=3)
    body, _ = chat(client, "qwen-safe", max_tokens=3)
    lines, mine = audit_lines(path, body["id"])
    lines = lines[written_before:]  # this test's own lines
    assert len(mine) == 1
    record = mine[0]
    assert record["endpoint"] == "qwen-safe" and record["profile"] == "safety"
    assert record["locked"] is True and record["status"] == 200
    assert record["digest"] == body["steering"]["digest"] and record["strength"] is None
    assert record["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert record["completion_tokens"] == body["usage"]["completion_tokens"]
    refused = [line for line in lines if line["status"] == 403]
    assert refused and all(line["error"] for line in refused)
    assert all("time" in line and line["event"] == "steered_request" for line in lines)
