"""The demo model's visible behaviours through every steerable API of a real `steermoe serve`:
the `words` profile answers arithmetic in number words, `demo-safe` refuses the made-up
restricted topics. Responses (OpenAI SDK), Anthropic Messages (Anthropic SDK), chat batches
and SageMaker `/invocations`; a stored response's continuation keeps its steering.

The demo is built and its profiles detected once (cached with the other checkpoints; ~2 min
the first time, see tests/profile_tools/test_demo_server.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from profile_tools.demo import task
from profile_tools.demo.prepare import prepare
from profile_tools.demo.serve import SAFE_ENDPOINT, SERVED_NAME, steering_args
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
    env = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    with steermoe_server(model_dir, steering_args(root), log, env=env) as server, \
            httpx.Client(base_url=server.base_url, timeout=120) as http:
        yield {
            "oai": openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none",
                                 max_retries=0, timeout=120),
            "claude": anthropic.Anthropic(base_url=server.base_url, api_key="none",
                                          max_retries=0, timeout=120),
            "http": http,
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
