"""`benchmarks.http_load` against a small fake OpenAI-compatible streaming server.

The fake server (Starlette on uvicorn, 127.0.0.1, a thread of this process) streams
`max_tokens` chunks: the first after TTFT_S, then one every ITL_S. Profile `missing` gets a
404, `broken` a stream that fails after two tokens. This checks the load tester's counting,
timing and error handling, not a model server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
uvicorn = pytest.importorskip("uvicorn")
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from benchmarks import http_load  # noqa: E402

TTFT_S = 0.05
ITL_S = 0.01
MODEL = "fake-moe"


def _fake_app(received: list[dict]) -> Starlette:
    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def completions(request: Request):
        body = await request.json()
        received.append({"path": request.url.path, **body})
        chat = request.url.path.endswith("chat/completions")
        profile = body.get("steering_profile")
        if profile == "missing":
            return JSONResponse(
                {"error": {"message": "unknown steering profile 'missing'", "code": 404}},
                status_code=404,
            )

        async def stream():
            if chat:
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            await asyncio.sleep(TTFT_S)
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(ITL_S)
                if profile == "broken" and i == 2:
                    yield _sse({"error": {"message": "engine died", "code": 500}})
                    return
                piece = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
                yield _sse({"choices": [{"index": 0, **piece}]})
            yield _sse({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", completions, methods=["POST"]),
    ])


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, list[dict]]]:
    received: list[dict] = []
    port = _free_port()
    config = uvicorn.Config(_fake_app(received), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", received
    srv.should_exit = True
    thread.join(timeout=10)


def _run(argv: list[str]) -> dict:
    args = http_load.parse_args([*argv, "--no-progress"])
    return asyncio.run(http_load.run(args))


def test_counts_profiles_and_timings(server) -> None:
    url, received = server
    received.clear()
    report = _run(["--url", url, "--concurrency", "1,4", "--requests", "12",
                   "--profiles", "none:1,calm:1,missing:1", "--max-tokens", "8", "--seed", "3"])
    assert report["settings"]["model"] == MODEL  # taken from GET /v1/models
    assert len(received) == 24 and all(r["model"] == MODEL for r in received)
    sent = Counter(r.get("steering_profile", "none") for r in received)
    assert set(sent) == {"none", "calm", "missing"}  # all three drawn with this seed
    for r in received:
        assert r["stream"] is True and r["ignore_eos"] is True and r["max_tokens"] == 8
        assert "steering_profile" not in r or r["steering_profile"] != "none"

    levels = report["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 4]
    total_missing = 0
    for lv in levels:
        per = lv["per_profile"]
        assert lv["requests"] == 12 == sum(p["requests"] for p in per.values())
        missing = per.get("missing", {"requests": 0, "errors": 0})
        assert missing["errors"] == missing["requests"]
        total_missing += missing["requests"]
        assert lv["errors"] == missing["requests"] and lv["ok"] == 12 - missing["requests"]
        if lv["errors"]:
            (kind,) = lv["error_kinds"]
            assert kind.startswith("HTTP 404: unknown steering profile 'missing'")
        assert lv["output_tokens"] == 8 * lv["ok"]
        assert lv["output_tokens_per_s"] == pytest.approx(lv["output_tokens"] / lv["duration_s"])
        # How long things took depends on the machine: only the summaries' shape is checked
        # here (their arithmetic: test_summary_percentiles_and_tpot).
        for timing in (lv["ttft_ms"], lv["tpot_ms"], lv["itl_ms"]):
            assert 0 < timing["p50"] <= timing["p90"] <= timing["p99"] <= timing["max"]
    assert total_missing == sent["missing"]


def test_stream_error_and_refused_connection(server) -> None:
    url, _ = server
    report = _run(["--url", url, "--concurrency", "2", "--requests", "4", "--endpoint", "chat",
                   "--profiles", "broken", "--max-tokens", "5"])
    (level,) = report["levels"]
    assert level["errors"] == 4 and level["ok"] == 0
    assert list(level["error_kinds"]) == ["stream error: engine died"]
    assert level["ttft_ms"]["p50"] is None and level["output_tokens_per_s"] == 0.0

    closed = f"http://127.0.0.1:{_free_port()}"
    report = _run(["--url", closed, "--model", "x", "--concurrency", "1", "--requests", "2"])
    (level,) = report["levels"]
    assert level["errors"] == 2 and level["ok"] == 0
    assert "Connect" in next(iter(level["error_kinds"]))


def test_chat_duration_mode_writes_json_and_png(server, tmp_path: Path, capsys) -> None:
    url, received = server
    received.clear()
    out_json, out_png = tmp_path / "load.json", tmp_path / "load.png"
    code = http_load.main(["--url", url, "--endpoint", "chat", "--concurrency", "1,2",
                           "--duration", "0.4", "--max-tokens", "4", "--no-progress",
                           "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert all(r["path"] == "/v1/chat/completions" and r["messages"] for r in received)
    for lv in report["levels"]:
        # Each request takes ~80 ms; none starts after 0.4 s, so the count is bounded.
        assert 1 <= lv["requests"] <= lv["concurrency"] * 6 and lv["errors"] == 0
        assert lv["output_tokens"] == 4 * lv["ok"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT p50/90/99 ms" in capsys.readouterr().out


def test_prompts_are_unique_per_request() -> None:
    source = http_load.PromptSource(words=8, path=None, seed=0)
    prompts = [source.next() for _ in range(50)]
    assert len(set(prompts)) == 50
    assert len({p.split(":")[0] for p in prompts}) == 50  # they differ from the first words


def test_refuses_remote_targets_without_flag() -> None:
    for url in ("http://10.1.2.3:8000", "https://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(SystemExit):
            http_load.parse_args(["--url", url])
    for url in ("http://127.0.0.1:8000", "http://localhost:9000", "http://[::1]:8000"):
        assert http_load.parse_args(["--url", url]).url == url
    assert http_load.parse_args(["--url", "http://10.1.2.3:8000", "--allow-remote"])


def test_summary_percentiles_and_tpot() -> None:
    R = http_load.RequestResult  # noqa: N806
    results = [
        R("none", True, 0.0, latency=1.0, ttft=0.1, output_tokens=10, itl=[0.1] * 9),
        R("none", True, 0.0, latency=2.0, ttft=0.2, output_tokens=10, itl=[0.2] * 9),
        R("calm", True, 0.0, latency=3.0, ttft=0.3, output_tokens=1, itl=[]),
        R("calm", False, 0.0, latency=0.5, error="HTTP 500: boom"),
    ]
    summary = http_load.summarize(results, wall=4.0)
    assert (summary["requests"], summary["ok"], summary["errors"]) == (4, 3, 1)
    assert summary["request_throughput"] == pytest.approx(0.75)
    assert summary["output_tokens_per_s"] == pytest.approx(21 / 4)
    assert summary["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert summary["ttft_ms"]["p90"] == pytest.approx(280.0)  # linear interpolation
    # TPOT only where there are two or more tokens: (1.0-0.1)/9 and (2.0-0.2)/9.
    assert summary["tpot_ms"]["p50"] == pytest.approx(150.0)
    assert summary["itl_ms"]["p50"] == pytest.approx(150.0)
    assert summary["error_kinds"] == {"HTTP 500: boom": 1}
    level = http_load.summarize_level(results, 4.0, concurrency=2)
    assert level["per_profile"]["calm"]["errors"] == 1
    assert level["per_profile"]["none"]["tpot_ms"]["p50"] == pytest.approx(150.0)


def test_profile_mix_parsing() -> None:
    assert http_load.parse_profiles("none:2, calm") == [("none", 2.0), ("calm", 1.0)]
    with pytest.raises(ValueError):
        http_load.parse_profiles("none:0")


def test_weighted_mixes_of_known_names() -> None:
    assert http_load.parse_weighted("a:3,b", "kind", ("a", "b")) == [("a", 3.0), ("b", 1.0)]
    with pytest.raises(ValueError, match="unknown kind 'c'"):
        http_load.parse_weighted("a,c", "kind", ("a", "b"))
    with pytest.raises(ValueError, match="negative weight for kind 'a'"):
        http_load.parse_weighted("a:-1,b", "kind", ("a", "b"))
