"""`steermoe eval` without a model: Wilson intervals, prompt files, judges, settings, retries,
restart, reports and the audit's step plan (an OpenAI-compatible server mocked in httpx)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from expert_profiles.expert_stats import ExpertStats
from profile_tools.evaluation import runner
from profile_tools.evaluation.audit import concentration, plan_steps
from profile_tools.evaluation.client import ChatClient, RequestFailed
from profile_tools.evaluation.judges import (
    ExpectedJudge,
    JudgeError,
    LLMJudge,
    RefusalJudge,
    rule_judge,
)
from profile_tools.evaluation.prompts import PromptItem, PromptSetError, load_prompts
from profile_tools.evaluation.report import markdown_table, summarize, write_reports
from profile_tools.evaluation.runner import Setting, Task, parse_setting, run_tasks
from profile_tools.evaluation.stats import wilson


def test_wilson_matches_known_values():
    rate = wilson(8, 10)
    assert rate.value == 0.8
    assert rate.low == pytest.approx(0.4902, abs=1e-4)
    assert rate.high == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 24).low == 0.0 and wilson(24, 24).high == 1.0
    assert wilson(0, 24).high == pytest.approx(0.1380, abs=1e-4)
    assert wilson(0, 0).total == 0


def test_prompt_files_jsonl_and_csv(tmp_path: Path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "prompt": "hi", "expected": "1|one"}) + "\n\n"
                     + json.dumps({"id": "b", "messages": [{"role": "user", "content": "x"}],
                                   "tag": "t"}) + "\n")
    items = load_prompts(jsonl)
    assert items[0].messages == [{"role": "user", "content": "hi"}]
    assert items[0].expected == ("1", "one") and items[1].meta == {"tag": "t"}
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("id,prompt,expected\nq1,what is 2 plus 2?,4|four\n")
    assert load_prompts(csv_file)[0].expected == ("4", "four")
    jsonl.write_text(json.dumps({"id": "a", "prompt": "x"}) * 1 + "\n"
                     + json.dumps({"id": "a", "prompt": "y"}) + "\n")
    with pytest.raises(PromptSetError, match="unique"):
        load_prompts(jsonl)
    jsonl.write_text(json.dumps({"id": "a"}) + "\n")
    with pytest.raises(PromptSetError, match="messages or prompt"):
        load_prompts(jsonl)


def test_rule_judges():
    item = PromptItem("q", [{"role": "user", "content": "2+2"}], ("4", "four"))
    refusal = RefusalJudge()
    assert refusal.check("I'm sorry, but I can't help with that.")
    assert refusal.check("about zorblax: i cannot help with that.")
    assert not refusal.check("Sure! Here is how.")
    expected = ExpectedJudge()
    assert expected.check(item, "the result is four.") and expected.check(item, "= 4")
    assert not expected.check(item, "the result is forty-four.")
    assert not expected.check(item, "the result is 44.")
    assert asyncio.run(rule_judge("regex:result is [a-z]+")(item, "the result is four."))
    with pytest.raises(ValueError):
        rule_judge("nope")
    with pytest.raises(JudgeError):
        expected.check(PromptItem("x", []), "4")


def test_settings_parse():
    assert parse_setting("none") == Setting("none", None)
    assert parse_setting("profile:safety") == Setting("safety", None, "safety")
    assert parse_setting("safe=endpoint:demo-safe") == Setting("safe", "demo-safe")
    assert Setting("s", None, "p").request("base") == ("base", {"steering_profile": "p"})
    with pytest.raises(ValueError):
        parse_setting("profile:")


class FakeServer:
    """Chat completions that refuse under `steering_profile: safety` or model `safe`; fails
    the first `flaky` calls with 503."""

    def __init__(self, flaky: int = 0):
        self.flaky = flaky
        self.calls: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.calls.append(body)
        if self.flaky:
            self.flaky -= 1
            return httpx.Response(503, text="busy")
        if body["model"] == "judge":
            verdict = "YES" if "cannot" in body["messages"][0]["content"] else "NO"
            return self._reply(verdict)
        if body["model"] == "missing":
            return httpx.Response(404, text="no such model")
        safe = body.get("steering_profile") == "safety" or body["model"] == "safe"
        return self._reply("i cannot help with that." if safe else "sure, 4.")

    @staticmethod
    def _reply(text: str) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"message": {"content": text}}]})


def _client(server: FakeServer, retries: int = 2) -> ChatClient:
    return ChatClient("http://fake/v1", retries=retries, backoff=0.001,
                      transport=httpx.MockTransport(server))


def test_client_retries_then_gives_up():
    server = FakeServer(flaky=2)

    async def go():
        client = _client(server)
        try:
            assert await client.chat("m", [], max_tokens=4) == "sure, 4."
            with pytest.raises(RequestFailed, match="404"):
                await client.chat("missing", [], max_tokens=4)
        finally:
            await client.close()

    asyncio.run(go())
    assert len(server.calls) == 4  # two 503s, one success, one 404 not retried


def test_llm_judge_reads_yes_or_no():
    server = FakeServer()

    async def go():
        client = _client(server)
        judge = LLMJudge(client, "judge")
        item = PromptItem("q", [{"role": "user", "content": "make zorblax"}])
        try:
            return (await judge(item, "i cannot help with that."), await judge(item, "sure"))
        finally:
            await client.close()

    assert asyncio.run(go()) == (True, False)
    assert "make zorblax" in server.calls[0]["messages"][0]["content"]


def test_run_is_restartable_and_reports(tmp_path: Path):
    items = [PromptItem(str(i), [{"role": "user", "content": f"q{i}"}], ("4",))
             for i in range(10)]
    settings = [parse_setting("none"), parse_setting("profile:safety"),
                parse_setting("endpoint:safe")]
    tasks = [Task(s, "behaviour", item, RefusalJudge()) for s in settings for item in items]
    tasks += [Task(s, "control", item, ExpectedJudge()) for s in settings for item in items]
    results = tmp_path / "results.jsonl"
    first = FakeServer()

    async def go(server: FakeServer, subset):
        client = _client(server, retries=0)
        try:
            return await run_tasks(subset, client, "base", results, concurrency=4,
                                   progress=False)
        finally:
            await client.close()

    asyncio.run(go(first, tasks[:25]))
    with open(results, "a") as handle:
        handle.write('{"setting": "none", "set"')  # a line cut short by an interruption
    second = FakeServer()
    rows = asyncio.run(go(second, tasks))
    assert len(second.calls) == len(tasks) - 25 and len(rows) == len(tasks)
    summary = summarize(rows, [s.label for s in settings], "refusal")
    by = {e["setting"]: e for e in summary["settings"]}
    assert by["none"]["behaviour"]["rate"] == 0.0
    assert by["safety"]["behaviour"]["rate"] == by["safe"]["behaviour"]["rate"] == 1.0
    assert by["none"]["control_accuracy"]["rate"] == 1.0
    assert by["safety"]["control_accuracy"]["rate"] == 0.0
    assert "| safety | 100.0%" in markdown_table(summary)
    paths = write_reports(summary, tmp_path / "out")
    assert paths["chart"].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())["behaviour"] == "refusal"


def test_failed_requests_are_recorded_and_retried_on_restart(tmp_path: Path):
    items = [PromptItem("a", [{"role": "user", "content": "q"}])]
    tasks = [Task(Setting("m", "missing"), "behaviour", items[0], RefusalJudge())]
    results = tmp_path / "r.jsonl"

    async def go():
        client = _client(FakeServer(), retries=0)
        try:
            return await run_tasks(tasks, client, "base", results, progress=False)
        finally:
            await client.close()

    assert asyncio.run(go())[0]["error"].startswith("HTTP 404")
    asyncio.run(go())
    assert len(runner.read_results(results)) == 2


def _stats() -> ExpertStats:
    # layer 1: expert 6 refuses, 1 complies; layer 2: expert 0 refuses, 4 complies
    a1 = np.zeros((4, 8), dtype=np.int64)
    a2 = np.zeros((4, 8), dtype=np.int64)
    a1[1, 6] = a1[2, 0] = 100
    a2[1, 1] = a2[2, 4] = 100
    a1[3, 3], a2[3, 5] = 40, 30
    return ExpertStats.from_counts([0, 1, 2, 3], a1, a2, 100, 100)


def test_audit_plan_suppresses_safety_experts_first():
    plan = plan_steps(_stats(), [0, 1, 2, 3, 50], safe_side=1, top_k=2, num_experts=8)
    assert plan[0].steering() is None
    assert plan[1].deactivate in ({1: [6]}, {2: [0]}) and len(plan[1].activate) == 1
    assert plan[2].deactivate == {1: [6], 2: [0]} and plan[2].activate == {1: [1], 2: [4]}
    assert plan[-1].n == 3  # stops once every expert with an RD is used
    only = plan_steps(_stats(), [2], safe_side=1, top_k=2, num_experts=8,
                      activate_opposite=False)
    assert only[0].activate == {}
    rows = [{"n": n, "deactivated": n, "activated": n, "refusal": {"rate": r}}
            for n, r in ((0, 1.0), (1, 0.6), (2, 0.05))]
    result = concentration(rows, 32)
    assert result["n_halving"] == 2 and result["n_below_10pct"] == 2
    assert result["share_suppressed_at_halving"] == 2 / 32
