"""`benchmarks.soak`: its checks on crafted responses, and a short soak of a real server.

The unit tests feed the checker responses that leak (wrong profile in the header or the
`steering` field, a digest of another profile, routing that does not follow the digest's
version, an unsteered response with a forced pattern) and check that each is caught. The engine
test runs the soak itself (about 200 requests, concurrency 8) against `steermoe serve` on a tiny
Qwen3-MoE while the profiles change on disk: no error, no leak.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")

from benchmarks import soak  # noqa: E402

SHAPE = {"architecture": "Qwen3MoeForCausalLM", "num_layers": 4, "num_experts": 8, "top_k": 2,
         "moe_layers": [0, 1, 2, 3]}
MODEL = "/models/tiny"


def _soak() -> soak.Soak:
    args = soak.parse_args(["--requests", "300", "--seed", "1"])
    runner = soak.Soak(args, "http://127.0.0.1:1", Path("/nonexistent"), SHAPE)
    runner.model = MODEL
    for name, versions in runner.versions.items():
        for version in versions:
            runner.by_digest[f"{name}{version.label}".ljust(16, "0")] = version
    return runner


def _digest(runner: soak.Soak, name: str, label: str) -> str:
    return next(d for d, v in runner.by_digest.items() if (v.profile, v.label) == (name, label))


def _routing(version: soak.Version | None, rows: int = 4, steer: bool = True) -> dict:
    """Rows that follow `version` (or a plain pattern: experts 0 and 1 shifted per row)."""
    expert_ids = []
    for t in range(rows):
        row = []
        for layer in SHAPE["moe_layers"]:
            if version is not None and steer:
                chosen = list(version.activate[layer])
                chosen += [e for e in range(8) if e not in chosen
                           and e not in version.deactivate[layer]][:1]
            else:
                chosen = [(t + layer) % 8, (t + layer + 3) % 8]
            row.append(chosen)
        expert_ids.append(row)
    return {"moe_layers": SHAPE["moe_layers"], "expert_ids": expert_ids}


def _check(runner: soak.Soak, kind: str, api: str, status: int, headers: list[str],
           body: Any, capture: bool = False, start: float = 1.0,
           end: float = 2.0) -> dict | None:
    plan = soak.Planned(0, kind, api, 2, capture, via_xargs=False)
    outcome = soak.Outcome(plan, start=start, end=end, status=status)
    failure: list[tuple[str, str]] = []

    def fail(klass: str, reason: str) -> None:
        failure.append((klass, reason))

    text = body if isinstance(body, str) else json.dumps(body)
    runner.check(outcome, headers, text, fail)
    return {"class": failure[0][0], "reason": failure[0][1], "outcome": outcome} \
        if failure else None


def _body(runner: soak.Soak, kind: str, profile: str | None, digest: str | None,
          routing: dict | None = None) -> dict:
    locked = kind == "locked"
    steering = None if profile is None else {
        "profile": profile, "inline": False, "endpoint": "soak-safe" if locked else MODEL,
        "locked": locked, "digest": digest}
    body = {"model": "soak-safe" if locked else MODEL, "choices": [{"text": "x"}],
            "steering": steering}
    if routing is not None:
        body["routing"] = routing
    return body


def _header(profile: str, digest: str, endpoint: str = MODEL) -> str:
    return f"profile={profile}; endpoint={endpoint}; digest={digest}"


@pytest.fixture()
def runner() -> soak.Soak:
    r = _soak()
    for name, versions in r.versions.items():  # every profile at v0 from t=0 on
        r.changes.record(name, versions[0].label, 0.0)
    return r


# ---- the profile versions ----------------------------------------------------------------


def test_versions_fit_the_model_and_exclude_each_other() -> None:
    versions = soak.make_versions(SHAPE)
    patterns = set()
    for name, vs in versions.items():
        for v in vs:
            for layer in SHAPE["moe_layers"]:
                assert len(v.activate[layer]) <= SHAPE["top_k"]
                assert len(v.deactivate[layer]) <= SHAPE["num_experts"] - SHAPE["top_k"]
                assert not set(v.activate[layer]) & set(v.deactivate[layer])
            patterns.add(json.dumps([v.activate, v.deactivate]))
            doc = v.document({k: SHAPE[k] for k in ("architecture", "num_layers",
                                                    "num_experts", "top_k")})
            assert doc["name"] == name and soak.MARKER in doc["description"]
        if len(vs) == 2:  # what v0 activates, v1 deactivates: the routing tells them apart
            for layer in SHAPE["moe_layers"]:
                assert set(vs[0].activate[layer]) <= set(vs[1].deactivate[layer])
    assert len(patterns) == sum(len(vs) for vs in versions.values())
    with pytest.raises(ValueError):
        soak.make_versions({**SHAPE, "num_experts": 4})


def test_change_log_knows_what_was_on_disk() -> None:
    log = soak.ChangeLog()
    log.record("alpha", "v0", 0.0)
    log.record("alpha", "v1", 1.0)
    log.record("alpha", "v0", 2.0)
    log.record("churn", "v0", 0.0)
    log.record("churn", None, 1.5)
    assert log.labels_during("alpha", 0.2, 0.8) == {"v0"}
    assert log.labels_during("alpha", 0.5, 1.2) == {"v0", "v1"}
    assert log.labels_during("alpha", 1.1, 1.9) == {"v1"}
    assert log.labels_during("alpha", 2.5, 3.0) == {"v0"}
    assert log.labels_during("churn", 1.6, 2.0) == {None}
    assert log.labels_during("churn", 1.0, 2.0) == {"v0", None}
    assert log.labels_during("beta", 0.0, 1.0) == set()
    assert log.timeline("alpha", 0.5, 2.0) == ("v0", [(1.0, "v1"), (2.0, "v0")])
    assert log.timeline("churn", 1.6, 2.0) == (None, [])


def test_atomic_write_and_foreign_files(tmp_path: Path) -> None:
    soak.write_atomic(tmp_path / "alpha.json", {"description": soak.MARKER})
    assert [p.name for p in tmp_path.iterdir()] == ["alpha.json"]  # no temporary left
    soak.check_writable(tmp_path, ["alpha", "beta"], force=False)
    (tmp_path / "beta.json").write_text('{"description": "someone else\'s"}')
    with pytest.raises(SystemExit):
        soak.check_writable(tmp_path, ["alpha", "beta"], force=False)
    soak.check_writable(tmp_path, ["alpha", "beta"], force=True)


# ---- traffic -----------------------------------------------------------------------------


def test_plan_is_seeded_mixed_and_captures_only_without_streaming() -> None:
    runner = _soak()
    plans = runner.plan()
    assert [(p.kind, p.api, p.max_tokens) for p in plans] == \
        [(p.kind, p.api, p.max_tokens) for p in _soak().plan()]
    assert {p.kind for p in plans} == set(soak.KINDS)
    assert {p.api for p in plans} == set(soak.APIS)
    assert {p.max_tokens for p in plans} == {1, 2, 3, 4}
    captured = [p for p in plans if p.capture]
    assert captured and all(p.api != "chat_stream" for p in captured)
    non_streaming = sum(p.api != "chat_stream" for p in plans)
    assert 0.1 < len(captured) / non_streaming < 0.3  # 1 in 5
    for p in plans:
        path, body = runner.payload(p)
        assert path == ("/v1/completions" if p.api == "completions" else "/v1/chat/completions")
        assert body["model"] == ("soak-safe" if p.kind == "locked" else MODEL)
        assert body.get("stream", False) == (p.api == "chat_stream")
        fields = body.get("vllm_xargs", body)
        assert fields.get("steering_profile") == (None if p.kind in ("none", "locked")
                                                  else p.kind)
        assert bool(fields.get("capture_routing")) == p.capture
        assert "steering" not in body


def test_refuses_remote_targets_and_needs_the_profile_dir() -> None:
    for argv in (["--url", "http://10.0.0.2:8000", "--profiles", "p", "--checkpoint", "c"],
                 ["--url", "http://127.0.0.1:8000"],
                 ["--mix", "none:1,other:1"]):
        with pytest.raises(SystemExit):
            soak.parse_args(argv)
    args = soak.parse_args(["--url", "http://localhost:8000", "--profiles", "p",
                            "--checkpoint", "c"])
    assert args.requests == 10_000 and args.concurrency == 16


# ---- the checks --------------------------------------------------------------------------


def test_good_responses_pass(runner) -> None:
    alpha0 = _digest(runner, "alpha", "v0")
    guarded = _digest(runner, "guarded", "v0")
    v_alpha0 = runner.by_digest[alpha0]
    assert _check(runner, "none", "chat", 200, ["none"],
                  _body(runner, "none", None, None, _routing(None)), capture=True) is None
    result = _check(runner, "alpha", "completions", 200, [_header("alpha", alpha0)],
                    _body(runner, "alpha", "alpha", alpha0, _routing(v_alpha0)), capture=True)
    assert result is None
    assert _check(runner, "locked", "chat", 200, [_header("guarded", guarded, "soak-safe")],
                  _body(runner, "locked", "guarded", guarded)) is None
    assert _check(runner, "alpha", "chat_stream", 200, [_header("alpha", alpha0)],
                  "data: {}\ndata: [DONE]") is None
    runner.changes.record("churn", None, 0.5)
    error = {"error": {"message": "unknown steering profile 'churn'", "type": "NotFoundError",
                       "param": "steering_profile", "code": 404}}
    assert _check(runner, "churn", "chat", 404, [], error) is None


@pytest.mark.parametrize("case", [
    "header_none_for_profile", "header_other_profile", "digest_of_other_profile",
    "field_other_profile", "unsteered_header", "unsteered_field", "locked_unsteered",
    "locked_wrong_endpoint", "routing_other_version", "unsteered_routing_forced",
    "stale_version", "stale_churn_404", "deleted_churn_served",
])
def test_leaks_are_caught(runner, case: str) -> None:
    a0, a1 = _digest(runner, "alpha", "v0"), _digest(runner, "alpha", "v1")
    b0 = _digest(runner, "beta", "v0")
    guarded = _digest(runner, "guarded", "v0")
    churn = _digest(runner, "churn", "v0")
    v = runner.by_digest
    if case == "header_none_for_profile":
        r = _check(runner, "alpha", "chat_stream", 200, ["none"], "")
    elif case == "header_other_profile":
        r = _check(runner, "alpha", "chat", 200, [_header("beta", b0)],
                   _body(runner, "beta", "beta", b0))
    elif case == "digest_of_other_profile":
        r = _check(runner, "alpha", "chat", 200, [_header("alpha", b0)],
                   _body(runner, "alpha", "alpha", b0))
    elif case == "field_other_profile":
        r = _check(runner, "alpha", "chat", 200, [_header("alpha", a0)],
                   _body(runner, "beta", "beta", a0))
    elif case == "unsteered_header":
        r = _check(runner, "none", "chat", 200, [_header("alpha", a0)],
                   _body(runner, "none", None, None))
    elif case == "unsteered_field":
        r = _check(runner, "none", "completions", 200, ["none"],
                   _body(runner, "alpha", "alpha", a0))
    elif case == "locked_unsteered":
        r = _check(runner, "locked", "completions", 200, ["none"],
                   _body(runner, "locked", None, None))
    elif case == "locked_wrong_endpoint":
        r = _check(runner, "locked", "chat", 200, [_header("guarded", guarded, MODEL)],
                   _body(runner, "locked", "guarded", guarded))
    elif case == "routing_other_version":  # the header says v0, the engine ran v1
        r = _check(runner, "alpha", "chat", 200, [_header("alpha", a0)],
                   _body(runner, "alpha", "alpha", a0, _routing(v[a1])), capture=True)
    elif case == "unsteered_routing_forced":
        r = _check(runner, "none", "chat", 200, ["none"],
                   _body(runner, "none", None, None, _routing(v[b0])), capture=True)
    elif case == "stale_version":  # v1 replaced v0 before the request was sent
        runner.changes.record("alpha", "v1", 0.5)
        r = _check(runner, "alpha", "chat", 200, [_header("alpha", a0)],
                   _body(runner, "alpha", "alpha", a0))
    elif case == "stale_churn_404":
        r = _check(runner, "churn", "chat", 404, [],
                   {"error": {"message": "m", "type": "t", "param": None, "code": 404}})
    else:  # deleted_churn_served
        runner.changes.record("churn", None, 0.5)
        r = _check(runner, "churn", "chat", 200, [_header("churn", churn)],
                   _body(runner, "churn", "churn", churn))
    assert r is not None and r["class"] == "leak", r


@pytest.mark.parametrize("status,headers,body,capture", [
    (500, [], {"error": {"message": "boom"}}, False),
    (400, [], {"error": {"message": "bad", "type": "t", "param": None, "code": 400}}, False),
    (200, [], None, False),  # no steering header
    (200, ["none", "none"], None, False),
    (200, ["none"], "not json", False),
    (200, ["none"], {"model": MODEL, "choices": [{"text": "x"}]}, False),  # no steering field
    (200, ["none"], "ROUTING_MISSING", True),
])
def test_errors_are_caught(runner, status, headers, body, capture) -> None:
    if body is None:
        body = _body(runner, "none", None, None)
    if body == "ROUTING_MISSING":
        body = _body(runner, "none", None, None)
    r = _check(runner, "none", "completions", status, headers, body, capture=capture)
    assert r is not None and r["class"] == "error", r
    runner.changes.record("churn", None, 0.5)
    bad_404 = _check(runner, "churn", "chat", 404, [], {"detail": "Not Found"})
    assert bad_404 is not None and bad_404["class"] == "error"


def test_routing_helpers() -> None:
    version = soak.make_versions(SHAPE)["alpha"][0]
    routing = _routing(version)
    assert soak.follows(routing, version)
    routing["expert_ids"].insert(0, [[-1, -1]] * 4)  # a prefix-cache hit is not checked
    assert soak.follows(routing, version) and len(soak.computed_rows(routing)) == 4
    assert not soak.follows(_routing(None), version)
    assert soak.routing_problem(routing) is None
    assert soak.routing_problem(None) is not None
    assert soak.routing_problem({"moe_layers": [0], "expert_ids": [[[1], [2]]]}) is not None


# ---- a real server ---------------------------------------------------------------------------


@pytest.mark.engine
def test_short_soak_against_a_real_server(build_tiny, tmp_path: Path) -> None:
    checkpoint = build_tiny("qwen3_moe")
    out = tmp_path / "soak.json"
    code = soak.main(["--requests", "200", "--concurrency", "8", "--checkpoint",
                      str(checkpoint), "--work-dir", str(tmp_path / "work"), "--out", str(out),
                      "--max-seconds", "90", "--quiet"])
    summary = json.loads(out.read_text())
    detail = json.dumps({k: summary[k] for k in ("failure_reasons", "failures")}, indent=1)
    assert summary["errors"] == 0 and summary["leaks"] == 0, detail[:20000]
    assert code == 0 and summary["complete"] and summary["requests"] == 200
    assert set(summary["by_kind"]) == set(soak.KINDS)
    assert set(summary["by_api"]) == set(soak.APIS)
    assert summary["profile_changes"]["rewrites"] > 0
    assert summary["profile_changes"]["adds"] + summary["profile_changes"]["deletes"] > 0
    assert summary["routing_checked"] > 0
    assert summary["routing_checked_by_kind"].get("alpha", 0) \
        + summary["routing_checked_by_kind"].get("beta", 0) > 0
    assert summary["server"]["vllm_version"]

