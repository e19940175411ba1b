"""A real server with the defaults locked down: API keys, no admin token, no inline steering
or routing capture, an explicit client profile list, and two API server processes (so the
`steermoe:` metrics go through Prometheus' multiprocess collection)."""

from __future__ import annotations

import httpx
import openai
import pytest

from profile_tools.checkpoint_factory import model_shape
from tests.server.server_process import steermoe_server, write_profile

pytestmark = pytest.mark.engine

API_KEY = "client-key"


@pytest.fixture(scope="module")
def server(build_tiny, tmp_path_factory):
    checkpoint = build_tiny("qwen3_moe")
    shape = model_shape(checkpoint)
    model = {key: shape[key] for key in ("architecture", "num_layers", "num_experts", "top_k")}
    root = tmp_path_factory.mktemp("locked_down_server")
    profiles = root / "profiles"
    profiles.mkdir()
    write_profile(profiles, "safety", model, {1: [5]})
    write_profile(profiles, "concise", model, {1: [2]})
    write_profile(profiles, "unsafe", model, {1: [3]}, tags=["lowers-safety"])
    args = ["--profiles", str(profiles), "--client-profiles", "safety,unsafe",
            "--api-key", API_KEY, "--api-server-count", "2"]
    with steermoe_server(checkpoint, args, root / "server.log",
                         env={"STEERMOE_ADMIN_TOKEN": ""}) as running:
        running.model = str(checkpoint)
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


def ask(client: openai.OpenAI, model: str, **extra):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Water boils at"}], max_tokens=3,
        extra_body=extra or None,
    )


def test_api_key_is_required_everywhere(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        body = {"model": server.model, "messages": [{"role": "user", "content": "hi"}],
                "steering_profile": "safety"}
        assert http.post("/v1/chat/completions", json=body).status_code == 401
        assert http.get("/v1/steering/profiles").status_code == 401
        keyed = http.get("/v1/steering/profiles", headers={"authorization": f"Bearer {API_KEY}"})
        assert {entry["id"] for entry in keyed.json()["data"]} == {"safety", "unsafe"}


def test_operator_listed_profiles_only(client, server):
    raw = ask(client, server.model, steering_profile="unsafe")
    assert raw.headers["x-steermoe-steering"].startswith("profile=unsafe;")
    with pytest.raises(openai.PermissionDeniedError):
        ask(client, server.model, steering_profile="concise")


@pytest.mark.parametrize("extra", [
    {"steering": {"activate": {"1": [1]}}},
    {"capture_routing": True},
])
def test_inline_steering_and_capture_are_off_by_default(client, server, extra):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        ask(client, server.model, **extra)
    assert "--allow-" in caught.value.body["message"]


def test_admin_api_is_disabled(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        response = http.delete("/v1/steering/profiles/concise",
                               headers={"authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 403
        assert "disabled" in response.json()["error"]["message"]


def _safety_requests(base_url: str) -> tuple[float, str]:
    text = httpx.get(f"{base_url}/metrics", timeout=60).text
    total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("steermoe:requests_total{") and 'profile="safety"' in line)
    return total, text


def test_metrics_of_both_api_servers_are_collected(client, server):
    before, _ = _safety_requests(server.base_url)
    for _ in range(6):
        ask(client, server.model, steering_profile="safety")
    after, text = _safety_requests(server.base_url)
    assert after - before == 6  # requests land on either API server; every one is counted
    assert "vllm:" in text
