"""`steermoe eval` without a model: Wilson intervals, prompt files, judges, settings, retries,
restart, reports, strength curves and the audit's step plan (an OpenAI-compatible server
mocked in httpx)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from expert_profiles.expert_stats import ExpertStats
from profile_tools.evaluation import cli, runner
from profile_tools.evaluation.audit import concentration, plan_steps
from profile_tools.evaluation.client import ChatClient, RequestFailed
from profile_tools.evaluation.curves import build_curves, curve_point, monotonic
from profile_tools.evaluation.judges import (
    ExpectedJudge,
    JudgeError,
    LLMJudge,
    RefusalJudge,
    rule_judge,
)
from profile_tools.evaluation.prompts import PromptItem, PromptSetError, load_prompts
from profile_tools.evaluation.report import markdown_table, summarize, write_reports
from profile_tools.evaluation.runner import (
    Setting,
    Task,
    check_settings,
    expand_strengths,
    parse_setting,
    parse_strengths,
    run_tasks,
)
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
    """Chat completions that refuse under `steering_profile: safety` (at a
    `steering_strength` of 0.5 or more, 1 when not sent) or model `safe`; fails the first
    `flaky` calls with 503."""

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
        strength = body.get("steering_strength", 1.0)
        safe = (body.get("steering_profile") == "safety" and strength >= 0.5
                or body["model"] == "safe")
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


def test_strengths_parse_strictly():
    assert parse_strengths("1,0,0.5") == [0.0, 0.5, 1.0]
    assert parse_strengths(".25, 0.75") == [0.25, 0.75]
    assert len(parse_strengths(",".join(f"{i / 20:g}" for i in range(21)))) == 21
    for bad, message in (("", "decimal number"), ("0,,1", "decimal number"),
                         ("1.5", r"\[0, 1\]"), ("-0.1", "decimal"), ("nan", "decimal"),
                         ("1e-1", "decimal"), ("+0.5", "decimal"), ("0.5,0.50", "twice"),
                         (",".join(["0"] * 22), "at most 21")):
        with pytest.raises(ValueError, match=message):
            parse_strengths(bad)


def test_settings_with_a_strength_parse_strictly():
    assert parse_setting("profile:words@0.5") == Setting("words@0.5", None, "words", 0.5)
    assert parse_setting("w=profile:words@1") == Setting("w", None, "words", 1.0)
    assert parse_setting("profile:a+b@.5") == Setting("a+b@0.5", None, "a+b", 0.5)
    assert Setting("w@0", None, "words", 0.0).request("base") == (
        "base", {"steering_profile": "words", "steering_strength": 0.0})
    assert "steering_strength" not in parse_setting("profile:words").request("base")[1]
    assert parse_setting("endpoint:org/model@main") == Setting("org/model@main", "org/model@main")
    for bad in ("profile:words@", "profile:words@2", "profile:@0.5", "profile:a@b@0.5",
                "profile:words@0.5x", "profile:words@1e0", "endpoint:safe@0.5", "none@0.5"):
        with pytest.raises(ValueError, match="setting"):
            parse_setting(bad)


def test_strengths_expand_profile_settings_only():
    settings = [parse_setting(text) for text in
                ("none", "profile:words", "s=profile:safety", "profile:digits@0.25",
                 "endpoint:safe")]
    expanded = expand_strengths(settings, [0.0, 1.0])
    assert [s.label for s in expanded] == ["none", "words@0", "words@1", "s@0", "s@1",
                                           "digits@0.25", "safe"]
    assert [s.strength for s in expanded if s.profile == "safety"] == [0.0, 1.0]
    kept = expand_strengths(settings[1:2], [0.5], keep_unscaled=True)
    assert kept == [Setting("words", None, "words"), Setting("words@0.5", None, "words", 0.5)]
    check_settings(expanded)
    with pytest.raises(ValueError, match="labels must differ"):
        check_settings(expand_strengths([*settings[1:2], parse_setting("profile:words@1")],
                                        [1.0]))
    with pytest.raises(ValueError, match="twice at strength 0.5"):
        check_settings([parse_setting("a=profile:words@0.5"),
                        parse_setting("b=profile:words@.5")])


def _rate(hits: int, n: int) -> dict:
    return wilson(hits, n).to_dict()


def _entry(label: str, strength: float | None, hits: int, n: int = 10,
           control: dict | None = None) -> dict:
    return {"setting": label, "profile": "p", "strength": strength,
            "behaviour": _rate(hits, n), "control_accuracy": control, "errors": 0}


def test_curves_are_built_per_profile_and_monotonic_from_measured_points():
    entries = [{"setting": "none", "profile": None, "strength": None,
                "behaviour": _rate(0, 10), "control_accuracy": None, "errors": 0},
               _entry("p@1", 1.0, 9), _entry("p@0", 0.0, 1), _entry("p", None, 9),
               _entry("p@0.5", 0.5, 0, n=0)]
    curve = build_curves(entries)["p"]
    assert [pt["strength"] for pt in curve["curve"]] == [0.0, 0.5, 1.0]
    assert curve["curve"][1] == curve_point(0.5, None) and curve["curve"][1]["rate"] is None
    low, high = wilson(9, 10).low, wilson(9, 10).high
    assert curve["curve"][2] == {"strength": 1.0, "rate": 0.9, "ci_low": low, "ci_high": high,
                                 "n": 10, "hits": 9}
    assert curve["monotonic"] is True and curve["control_curve"] is None
    assert curve["unscaled"]["setting"] == "p" and curve["settings"] == ["p@0", "p@0.5", "p@1"]
    assert build_curves(entries[:1]) == {}
    points = [curve_point(s, _rate(h, n)) for s, h, n in ((0, 1, 3), (0.5, 2, 6), (1, 1, 2))]
    assert monotonic(points) is True  # 1/3 == 2/6 exactly, then 1/2
    assert monotonic(points[::-1]) is False
    assert monotonic(points[:1]) is None and monotonic([]) is None


def test_report_of_a_falling_curve(tmp_path: Path):
    control = _rate(10, 10)
    entries = [_entry("p@0", 0.0, 2, control=control), _entry("p@0.5", 0.5, 8, control=control),
               _entry("p@1", 1.0, 5, control=_rate(7, 10))]
    summary = {"behaviour": "words", "settings": entries, "curves": build_curves(entries)}
    assert summary["curves"]["p"]["monotonic"] is False
    paths = write_reports(summary, tmp_path)
    text = paths["table"].read_text()
    assert "## p: words rate by steering strength" in text
    assert "| 0.5 | 80.0% [49.0%, 94.3%] (8/10) | 100.0%" in text
    assert "Monotonic: no. The words rate falls from 80.0% at strength 0.5 to 50.0% at 1" in text
    assert paths["curve"].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())["curves"]["p"]["monotonic"] is False
    assert "curve" not in write_reports({**summary, "curves": {}}, tmp_path / "flat")


def _eval_argv(tmp_path: Path, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"q{i}", "expected": "4"})
                               + "\n" for i in range(6)))
    return ["--base-url", "http://fake/v1", "--model", "base", "--prompts", str(prompts),
            "--control", str(prompts), "--out", str(tmp_path / "out"), "--no-progress",
            "--retries", "0", *extra]


def test_eval_cli_runs_a_strength_curve(tmp_path: Path, monkeypatch, capsys):
    server = FakeServer()
    monkeypatch.setattr(cli, "ChatClient", lambda *args, **kwargs: ChatClient(
        *args, backoff=0.001, transport=httpx.MockTransport(server), **kwargs))
    argv = _eval_argv(tmp_path, "--setting", "none", "--setting", "profile:safety",
                      "--setting", "endpoint:safe", "--strengths", "1,0,0.25,0.5",
                      "--with-unscaled")
    assert cli.main(argv) == 0
    sent = sorted({(c["model"], c.get("steering_profile"), c.get("steering_strength"))
                   for c in server.calls}, key=str)
    assert sent == sorted({("base", None, None), ("safe", None, None),
                           ("base", "safety", None), *(("base", "safety", s)
                                                       for s in (0.0, 0.25, 0.5, 1.0))},
                          key=str)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert [e["setting"] for e in summary["settings"]] == [
        "none", "safety", "safety@0", "safety@0.25", "safety@0.5", "safety@1", "safe"]
    curve = summary["curves"]["safety"]
    assert [(p["strength"], p["rate"], p["n"]) for p in curve["curve"]] == [
        (0.0, 0.0, 6), (0.25, 0.0, 6), (0.5, 1.0, 6), (1.0, 1.0, 6)]
    assert [p["rate"] for p in curve["control_curve"]] == [1.0, 1.0, 0.0, 0.0]
    assert curve["curve"][0]["ci_high"] == pytest.approx(wilson(0, 6).high)
    assert curve["monotonic"] is True and curve["unscaled"]["behaviour"]["rate"] == 1.0
    text = (out / "summary.md").read_text()
    assert "| 0.25 | 0.0% [0.0%, 39.0%] (0/6) | 100.0% [61.0%, 100.0%] (6/6) |" in text
    assert "Monotonic: yes" in text and "| unscaled (safety) | 100.0%" in text
    assert (out / "curve.png").stat().st_size > 1000
    assert "curve: " in capsys.readouterr().out
    rows = runner.read_results(out / "results.jsonl")
    assert {r.get("steering_strength") for r in rows if r["setting"] == "safety@0.25"} == {0.25}


@pytest.mark.parametrize(("extra", "message"), [
    (("--setting", "endpoint:safe@0.5"), "endpoints take no strength"),
    (("--setting", "none", "--strengths", "0,1"), "needs a profile:NAME setting"),
    (("--setting", "profile:p", "--with-unscaled"), "needs --strengths"),
    (("--setting", "profile:p@0.5", "--setting", "profile:p", "--strengths", "0.5"),
     "labels must differ"),
])
def test_eval_cli_refuses_bad_settings(tmp_path: Path, capsys, extra, message):
    assert cli.main(_eval_argv(tmp_path, *extra)) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("strengths", ["0,1.5", "0,x", "0,0", ",".join(["0.5"] * 30)])
def test_eval_cli_refuses_bad_strengths(tmp_path: Path, capsys, strengths):
    with pytest.raises(SystemExit) as exited:
        cli.main(_eval_argv(tmp_path, "--setting", "profile:p", "--strengths", strengths))
    assert exited.value.code == 2
    assert "--strengths: " in capsys.readouterr().err


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
