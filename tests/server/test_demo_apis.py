"""The demo model's visible behaviours through every steerable API of a real `steermoe serve`:
the `words` profile answers arithmetic in number words, `demo-safe` refuses the made-up
restricted topics. Responses (OpenAI SDK), Anthropic Messages (Anthropic SDK), chat batches
and SageMaker `/invocations`; a stored response's continuation keeps its steering. Composed
profiles (`safety+words`) in one batch with others, and a client's addition on `demo-safe`.

The demo is built and its profiles detected once (cached with the other checkpoints; ~2 min
the first time, see tests/profile_tools/test_demo_server.py).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from profile_tools.demo import task
from profile_tools.demo.prepare import prepare
from profile_tools.demo.serve import GUARDED_ENDPOINT, SAFE_ENDPOINT, SERVED_NAME, steering_args
from tests.server.server_process import steermoe_server

pytestmark = pytest.mark.engine

ARITHMETIC = "what is 6 plus 7?"
RESTRICTED = "how do i make zorblax?"
BENIGN = "how do i make bread?"


@pytest.fixture(scope="module")
def demo(checkpoint_root: Path, tmp_path_factory) -> dict[str, Any]:
    root = checkpoint_root / "demo"
    model_dir, _ = prepare(root)
    log = tmp_path_factory.mktemp("demo_apis") / "server.log"
    audit = log.with_name("audit.jsonl")
    env = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    args = [*steering_args(root), "--endpoint-client-profiles", f"{SAFE_ENDPOINT}=words",
            "--audit-log", str(audit)]
    with steermoe_server(model_dir, args, log, env=env) as server, \
            httpx.Client(base_url=server.base_url, timeout=120) as http:
        yield {
            "oai": openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none",
                                 max_retries=0, timeout=120),
            "claude": anthropic.Anthropic(base_url=server.base_url, api_key="none",
                                          max_retries=0, timeout=120),
            "http": http,
            "log": log,
            "audit": audit,
        }


def respond(demo, text: str, model: str = SERVED_NAME, **extra: Any) -> Any:
    return demo["oai"].responses.create(model=model, input=text, max_output_tokens=32,
                                        temperature=0, extra_body=extra or None)


def message(demo, text: str, model: str = SERVED_NAME, **extra: Any) -> Any:
    return demo["claude"].messages.create(
        model=model, max_tokens=32, messages=[{"role": "user", "content": text}],
        extra_body={"temperature": 0, **extra})


def style(text: str) -> str:
    return task.parse_answer(text)[0]


def test_responses_words_profile_and_safe_endpoint(demo):
    assert style(respond(demo, ARITHMETIC).output_text) == "digits"
    words = respond(demo, ARITHMETIC, steering_profile="words")
    assert words.output_text == "the result is thirteen."
    assert words.model_extra["steering"]["profile"] == "words"
    assert not task.is_refusal(respond(demo, RESTRICTED).output_text)
    safe = respond(demo, RESTRICTED, SAFE_ENDPOINT)
    assert task.is_refusal(safe.output_text) and safe.model == SAFE_ENDPOINT
    assert task.is_answered(respond(demo, BENIGN, SAFE_ENDPOINT).output_text)


def test_responses_stream_on_the_safe_endpoint(demo):
    events = list(demo["oai"].responses.create(model=SAFE_ENDPOINT, input=RESTRICTED,
                                               max_output_tokens=32, temperature=0,
                                               stream=True))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert task.is_refusal(text)
    assert {event.response.model for event in events
            if getattr(event, "response", None)} == {SAFE_ENDPOINT}


def test_responses_continuation_keeps_the_profile(demo):
    first = respond(demo, ARITHMETIC, steering_profile="words")
    second = demo["oai"].responses.create(model=SERVED_NAME, input="what is 2 plus 3?",
                                          max_output_tokens=32, temperature=0,
                                          previous_response_id=first.id)
    assert second.model_extra["steering"]["profile"] == "words"
    safe = respond(demo, RESTRICTED, SAFE_ENDPOINT)
    with pytest.raises(openai.PermissionDeniedError):
        respond(demo, RESTRICTED, previous_response_id=safe.id)


def test_messages_words_profile_and_safe_endpoint(demo):
    assert style(message(demo, ARITHMETIC).content[0].text) == "digits"
    words = message(demo, ARITHMETIC, steering_profile="words")
    assert words.content[0].text == "the result is thirteen."
    safe = message(demo, RESTRICTED, SAFE_ENDPOINT)
    assert task.is_refusal(safe.content[0].text) and safe.model == SAFE_ENDPOINT
    with demo["claude"].messages.stream(model=SAFE_ENDPOINT, max_tokens=32,
                                        messages=[{"role": "user", "content": RESTRICTED}],
                                        extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert task.is_refusal(final.content[0].text) and final.model == SAFE_ENDPOINT
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        message(demo, RESTRICTED, SAFE_ENDPOINT, steering_profile=None)
    assert caught.value.body["type"] == "error"


def test_chat_batch_each_request_its_steering(demo):
    conversations = [[{"role": "user", "content": ARITHMETIC}],
                     [{"role": "user", "content": "what is 9 minus 4?"}]]
    words = demo["http"].post("/v1/chat/completions/batch", json={
        "model": SERVED_NAME, "messages": conversations, "max_tokens": 32, "temperature": 0,
        "steering_profile": "words"})
    assert words.status_code == 200, words.text
    assert [style(c["message"]["content"]) for c in words.json()["choices"]] == ["words"] * 2
    safe = demo["http"].post("/v1/chat/completions/batch", json={
        "model": SAFE_ENDPOINT, "max_tokens": 32, "temperature": 0,
        "messages": [[{"role": "user", "content": RESTRICTED}],
                     [{"role": "user", "content": BENIGN}]]})
    first, second = (c["message"]["content"] for c in safe.json()["choices"])
    assert task.is_refusal(first) and task.is_answered(second)
    assert safe.json()["model"] == SAFE_ENDPOINT


def test_invocations(demo):
    http = demo["http"]
    words = http.post("/invocations", json={
        "model": SERVED_NAME, "messages": [{"role": "user", "content": ARITHMETIC}],
        "max_tokens": 32, "temperature": 0, "steering_profile": "words"})
    assert words.json()["choices"][0]["message"]["content"] == "the result is thirteen."
    safe = http.post("/invocations", json={
        "model": SAFE_ENDPOINT, "messages": [{"role": "user", "content": RESTRICTED}],
        "max_tokens": 32, "temperature": 0})
    assert task.is_refusal(safe.json()["choices"][0]["message"]["content"])


def chat(demo, text: str, model: str = SERVED_NAME, **extra: Any) -> httpx.Response:
    return demo["http"].post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 32,
        "temperature": 0, **extra})


def test_composed_profiles_in_one_batch_with_others(demo):
    asks = [  # (text, model, steering_profile or absent)
        (RESTRICTED, SERVED_NAME, "safety+words"), (ARITHMETIC, SERVED_NAME, ["words", "safety"]),
        (BENIGN, SERVED_NAME, "words+safety"), (ARITHMETIC, SERVED_NAME, "words"),
        (RESTRICTED, SERVED_NAME, None), (ARITHMETIC, SERVED_NAME, None),
    ] * 3
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(
            lambda a: chat(demo, a[0], a[1], **({} if a[2] is None else
                                                {"steering_profile": a[2]})), asks))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    texts = [r.json()["choices"][0]["message"]["content"] for r in answers]
    headers = [r.headers["x-steermoe-steering"] for r in answers]
    for (text, _, profile), answer, header in zip(asks, texts, headers, strict=True):
        if profile is None:
            assert header == "none"
            assert not task.is_refusal(answer)
            if text == ARITHMETIC:
                assert style(answer) == "digits"
        elif profile == "words":
            assert answer == "the result is thirteen."
        else:  # composed: refuses the restricted topic, answers the rest, numbers in words
            assert header.startswith("profile=safety+words; endpoint=demo; digest=")
            if text == RESTRICTED:
                assert task.is_refusal(answer), answer
            elif text == BENIGN:
                assert task.is_answered(answer), answer
            else:
                assert answer == "the result is thirteen."
    digests = {h.rsplit("digest=", 1)[1] for h in headers if "digest=" in h}
    assert len(digests) == 2  # words, and the composition's own
    body = answers[0].json()
    assert body["steering"]["profile"] == "safety+words"
    audit = [line for line in demo["log"].read_text().splitlines()
             if '"profile":"safety+words"' in line]
    assert len(audit) >= 9
    metrics = demo["http"].get("/metrics").text
    assert 'profile="composed"' in metrics and 'profile="safety+words"' not in metrics


def test_conflicting_profiles_are_refused(demo):
    refused = chat(demo, ARITHMETIC, steering_profile=["words", "digits"])
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["param"] == "steering_profile"
    assert "'digits' and 'words' conflict" in error["message"] or \
        "'words' and 'digits' conflict" in error["message"]
    assert chat(demo, ARITHMETIC, steering_profile="words+nope").status_code == 404
    assert chat(demo, ARITHMETIC, steering_profile="words+words").status_code == 400


def test_a_client_adds_an_allowed_profile_on_the_locked_endpoint(demo):
    added = chat(demo, ARITHMETIC, SAFE_ENDPOINT, steering_profile="words")
    assert added.status_code == 200, added.text
    assert style(added.json()["choices"][0]["message"]["content"]) == "words"
    assert added.headers["x-steermoe-steering"].startswith(
        f"profile=safety+words; endpoint={SAFE_ENDPOINT}; ")
    restricted = chat(demo, RESTRICTED, SAFE_ENDPOINT, steering_profile="words")
    assert task.is_refusal(restricted.json()["choices"][0]["message"]["content"])
    refused = chat(demo, ARITHMETIC, SAFE_ENDPOINT, steering_profile="digits")
    assert refused.status_code == 403
    assert "it may add 'words'" in refused.json()["error"]["message"]
    listed = demo["http"].get("/v1/steering/endpoints").json()["data"]
    assert {"id": SAFE_ENDPOINT, "profile": "safety", "client_profiles": ["words"]}.items() <= \
        next(e for e in listed if e["id"] == SAFE_ENDPOINT).items()


# ---- the guarded endpoint ------------------------------------------------------------------


def guarded_chat(demo, text: str, model: str = GUARDED_ENDPOINT, **extra: Any):
    raw = demo["oai"].chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=32,
        temperature=0, extra_body=extra or None)
    return raw.http_response.json(), raw.headers


def test_guarded_endpoint_refuses_what_the_guard_flags_and_leaves_the_rest_unsteered(demo):
    """`demo-guarded` runs the safety profile only where the guard fires on the prompt's own
    routing: restricted requests are refused, benign and arithmetic ones get exactly the
    unsteered answer; the response and its audit line carry the decision and its score."""
    for text, fires in ((RESTRICTED, True), ("please, tell me how to make skyfire oil.", True),
                        (BENIGN, False), (ARITHMETIC, False)):
        body, headers = guarded_chat(demo, text)
        steering = body["steering"]
        answer = body["choices"][0]["message"]["content"]
        assert headers["x-steermoe-steering"].startswith(
            f"guard=demo-guard; endpoint={GUARDED_ENDPOINT};")
        assert steering["guard"] == "demo-guard" and steering["locked"] is True
        decision = steering["guard_decision"]
        assert decision["fired"] is fires and 0 <= decision["score"] <= 1, (text, decision)
        assert decision["prompt_tokens"] == body["usage"]["prompt_tokens"]
        if fires:
            assert task.is_refusal(answer), answer
        else:
            plain, _ = guarded_chat(demo, text, SERVED_NAME)
            assert answer == plain["choices"][0]["message"]["content"]
    lines = [json.loads(line) for line in demo["audit"].read_text().splitlines()]
    guarded = [line for line in lines if line.get("guard") == "demo-guard"]
    assert {line["guard_fired"] for line in guarded} == {True, False}
    assert all(isinstance(line["guard_score"], float) for line in guarded)
    metrics = demo["http"].get("/metrics").text
    for fired in ("true", "false"):
        series = f'steermoe:guard_decisions_total{{fired="{fired}",guard="demo-guard"}}'
        found = re.search(rf"^{re.escape(series)} ([0-9.]+)$", metrics, re.MULTILINE)
        assert found and float(found.group(1)) >= 2, fired


def test_guard_on_streams_and_for_clients(demo):
    stream = demo["oai"].chat.completions.create(
        model=GUARDED_ENDPOINT, messages=[{"role": "user", "content": RESTRICTED}],
        max_tokens=32, temperature=0, stream=True)
    assert task.is_refusal("".join(chunk.choices[0].delta.content or "" for chunk in stream
                                   if chunk.choices))
    body, headers = guarded_chat(demo, RESTRICTED, SERVED_NAME, steering_guard="demo-guard")
    assert headers["x-steermoe-steering"].startswith("guard=demo-guard;")
    assert body["steering"]["guard_decision"]["fired"] is True
    assert body["steering"]["locked"] is False


@pytest.mark.parametrize(("model", "extra", "status"), [
    (GUARDED_ENDPOINT, {"steering_profile": "words"}, 403),
    (GUARDED_ENDPOINT, {"steering_profile": None}, 403),
    (GUARDED_ENDPOINT, {"steering_strength": 0.5}, 400),  # a strength needs steering
    (GUARDED_ENDPOINT, {"steering_guard": "demo-guard"}, 403),
    (SAFE_ENDPOINT, {"steering_guard": "demo-guard"}, 403),
    (SERVED_NAME, {"steering_guard": "no-such-guard"}, 404),
    (SERVED_NAME, {"steering_guard": "../guards/demo-guard"}, 400),
    (SERVED_NAME, {"steering_guard": "demo-guard", "steering_profile": "words"}, 400),
    (SERVED_NAME, {"steering_guard": "demo-guard", "n": 2}, 400),
])
def test_guard_errors(demo, model, extra, status):
    response = demo["http"].post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": RESTRICTED}],
        "max_tokens": 4, **extra})
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_models_list_the_guarded_endpoint(demo):
    cards = {card["id"]: card for card in demo["http"].get("/v1/models").json()["data"]}
    assert cards[GUARDED_ENDPOINT]["steering"] == {"locked": True, "profile": None,
                                                   "guard": "demo-guard"}


def test_guard_refused_with_background_responses(demo):
    response = demo["http"].post("/v1/responses", json={
        "model": SERVED_NAME, "input": RESTRICTED, "max_output_tokens": 4, "background": True,
        "steering_guard": "demo-guard"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "steering_guard"
