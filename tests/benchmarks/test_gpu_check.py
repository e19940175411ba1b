"""`benchmarks.gpu_check`: its verdicts on made-up results, its clock, and the CPU run itself.

The unit tests feed the report functions engine results that pass and results that must fail
(tokens that differ beyond a near tie, a deactivated expert in the capture, the fused routing
not wired, a reference that disagrees) and run the job scheduler on short commands against a
small budget. The engine test runs `python -m benchmarks.gpu_check --device cpu` end to end
(tiny shapes, about two minutes on two cores), so the GPU command cannot rot between GPU runs.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_check, gpu_check_report
from benchmarks.gpu_check_report import compare_tokens, routing_problems

SHAPE = {"architecture": "OlmoeForCausalLM", "num_layers": 2, "num_experts": 8, "top_k": 2,
         "moe_layers": [0, 1]}


def _request(output: list[int], logprobs: list[list[list[float]]] | None = None,
             routing: list | None = None, prompt: int = 3) -> dict[str, Any]:
    if logprobs is None:
        logprobs = [[[t, -0.1], [t + 1, -3.0]] for t in output]
    return {"prompt_ids": list(range(prompt)), "output_ids": output, "logprobs": logprobs,
            "routing": routing, "routing_layers": [0, 1]}


# ---- comparisons ---------------------------------------------------------------------------


def test_equal_tokens():
    assert compare_tokens(_request([5, 6, 7]), _request([5, 6, 7]), 0.1) == {"equal": True}


def test_a_near_tie_is_allowed_a_clear_difference_is_not():
    tie = _request([5, 6, 7], [[[5, -0.1]], [[6, -0.70], [9, -0.72]], [[7, -0.1]]])
    other = _request([5, 9, 1])
    result = compare_tokens(tie, other, 0.1)
    assert result == {"equal": False, "position": 1, "gap": pytest.approx(0.02), "tie": True}
    clear = _request([5, 6, 7], [[[5, -0.1]], [[6, -0.1], [9, -2.5]], [[7, -0.1]]])
    result = compare_tokens(clear, other, 0.1)
    assert not result["tie"] and "MISMATCH at token 1" in gpu_check_report.describe_comparison(
        result)


def test_a_token_outside_both_top2_is_a_mismatch():
    a = _request([5, 6], [[[5, -0.1], [4, -0.2]], [[6, -0.1], [1, -0.2]]])
    b = _request([5, 7], [[[5, -0.1], [4, -0.2]], [[7, -0.1], [2, -0.2]]])
    result = compare_tokens(a, b, 10.0)
    assert result["position"] == 1 and not result["tie"]
    assert "not in the top-2" in gpu_check_report.describe_comparison(result)


def test_different_lengths_are_a_mismatch():
    assert not compare_tokens(_request([1, 2]), _request([1, 2, 3]), 1.0)["tie"]


def _routing(rows: int, pattern: list[list[int]]) -> list:
    return [[list(layer) for layer in pattern] for _ in range(rows)]


def test_routing_problems():
    sets = {"0": [[0], [1, 2]], "1": [[], [3]]}
    good = _request([4, 4], routing=_routing(4, [[0, 5], [6, 7]]))
    assert routing_problems(good, sets, SHAPE) == []
    missing = _request([4, 4], routing=_routing(4, [[4, 5], [6, 7]]))
    assert "activated [0] missing" in routing_problems(missing, sets, SHAPE)[0]
    forbidden = _request([4, 4], routing=_routing(4, [[0, 5], [3, 7]]))
    assert "deactivated [3] routed" in routing_problems(forbidden, sets, SHAPE)[0]
    short = _request([4, 4], routing=_routing(3, [[0, 5], [6, 7]]))
    assert "capture shape" in routing_problems(short, sets, SHAPE)[0]
    assert routing_problems(_request([4]), sets, SHAPE) == ["no routing was captured"]
    uncomputed = _request([4, 4], routing=_routing(4, [[-1, -1], [6, 7]]))
    assert "out of range" in routing_problems(uncomputed, None, SHAPE)[0]


def test_mixed_requests_are_valid_steering_for_the_shape():
    from expert_profiles.request_steering import ResolvedSteering
    from vllm_patches.steering_table import applicable_problem

    for shape in (SHAPE, {**SHAPE, "num_experts": 64, "top_k": 8, "moe_layers": [0, 1, 2]}):
        requests = gpu_check.mixed_requests(shape)
        assert [r["name"] for r in requests if r.get("sets")] == ["profile_a", "inline",
                                                                  "profile_b"]
        for request in requests:
            if not request.get("sets"):
                continue
            sets = request["sets"]
            steering = ResolvedSteering(
                request["name"], "d", {int(k): a for k, (a, _) in sets.items() if a},
                {int(k): d for k, (_, d) in sets.items() if d}, gpu_check.EPS)
            assert applicable_problem(steering, shape["moe_layers"], shape["num_experts"],
                                      shape["top_k"]) is None


def test_profiles_written_for_the_served_model(tmp_path):
    requests = gpu_check.mixed_requests(SHAPE)
    directory = gpu_check.write_profiles(tmp_path, SHAPE, requests)
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["check-a.json", "check-b.json"]
    document = json.loads((directory / "check-a.json").read_text())
    assert document["model"]["num_experts"] == 8 and document["activate"] == {"0": [0],
                                                                              "1": [0]}


# ---- correctness verdicts --------------------------------------------------------------------


def _mixed_result(fused_layers: list[int] | None = None) -> dict[str, Any]:
    requests = {}
    for request in gpu_check.mixed_requests(SHAPE):
        pattern = [[5, 6], [6, 7]]
        for layer, (activate, deactivate) in (request.get("sets") or {}).items():
            row = [e for e in range(8) if e not in deactivate and e not in activate]
            pattern[int(layer)] = (activate + row)[:2]
        requests[request["name"]] = _request([4, 4, 4], routing=_routing(5, pattern))
    info = {"fused_routing_layers": fused_layers} if fused_layers is not None else {}
    return {"status": "ok", "part": "correctness",
            "result": {"tasks": {"mixed": {"requests": requests}}, "engine_info": info}}


def _plan() -> dict[str, Any]:
    roles = {r: f"olmoe/{r}" for r in ("graph", "stock", "eager", "fused", "reference")}
    return {"shape": SHAPE, "requests": gpu_check.mixed_requests(SHAPE), "roles": roles,
            "dtypes": {r: "bfloat16" for r in roles}, "tie_tolerance": 0.1,
            "reference_dtype": "float32", "logprob_tolerance": 0.02,
            "reference_role": "reference"}


def _reference(ok: bool = True) -> dict[str, Any]:
    entry = {"token_differences": [] if ok else [{"position": 1, "gap": 2.0}],
             "tokens_ok": ok, "max_logprob_diff": 1e-3, "routing_agreement": 1.0}
    return {name: dict(entry) for name, _ in gpu_check.PROMPTS}


def _jobs() -> dict[str, dict[str, Any]]:
    jobs = {f"olmoe/{r}": _mixed_result() for r in ("graph", "stock", "eager")}
    jobs["olmoe/fused"] = _mixed_result(fused_layers=[0, 1])
    jobs["olmoe/reference"] = _mixed_result()
    jobs["olmoe/reference"]["result"]["reference"] = _reference()
    return jobs


def _verdicts(jobs) -> tuple[list[dict[str, Any]], dict[str, str]]:
    checks: list[dict[str, Any]] = []
    summary = gpu_check_report.correctness_checks("olmoe", _plan(), jobs, checks)
    return checks, summary


def test_a_good_run_passes_every_check():
    checks, summary = _verdicts(_jobs())
    assert [c for c in checks if c["status"] != "pass"] == []
    names = " / ".join(c["name"] for c in checks)
    for expected in ("CUDA graphs == eager mode", "fused routing == edit + vLLM top-k",
                     "plugin == stock vLLM", "fused routing serves every MoE layer",
                     "matches transformers", "no deactivated one (bfloat16)"):
        assert expected in names
    assert summary["reference"].startswith("ok")


@pytest.mark.parametrize("breakage", ["eager_tokens", "deactivated", "not_wired", "reference",
                                      "stock_tokens", "engine_error"])
def test_each_breakage_fails(breakage):
    jobs = copy.deepcopy(_jobs())
    if breakage == "eager_tokens":
        jobs["olmoe/eager"]["result"]["tasks"]["mixed"]["requests"]["inline"]["output_ids"] = [
            4, 1, 1]
    elif breakage == "deactivated":
        routing = jobs["olmoe/graph"]["result"]["tasks"]["mixed"]["requests"]["profile_a"]
        routing["routing"][2][0] = [0, 1]
    elif breakage == "not_wired":
        jobs["olmoe/fused"]["result"]["engine_info"] = {}
    elif breakage == "reference":
        jobs["olmoe/reference"]["result"]["reference"] = _reference(ok=False)
    elif breakage == "stock_tokens":
        jobs["olmoe/stock"]["result"]["tasks"]["mixed"]["requests"]["plain_b"]["output_ids"] = [
            9, 9, 9]
    else:
        jobs["olmoe/eager"] = {"status": "error", "error": "RuntimeError: boom", "result": {}}
    checks, _ = _verdicts(jobs)
    assert [c for c in checks if c["status"] == "fail"], breakage


def test_skipped_engines_skip_their_checks():
    jobs = _jobs()
    jobs["olmoe/fused"] = {"status": "skipped", "reason": "needs about 80 s, 10 s left"}
    checks, summary = _verdicts(jobs)
    assert not [c for c in checks if c["status"] == "fail"]
    skipped = [c for c in checks if c["status"] == "skip"]
    assert any("needs about 80 s" in c["detail"] for c in skipped)
    assert summary["fused: engine"].startswith("skipped")


# ---- ratios and kernels ----------------------------------------------------------------------


def _rates_job(workloads: dict[str, tuple[float, float]], partial=False) -> dict[str, Any]:
    data = {name: {"throughput_tok_s": t, "decode_tok_s": d}
            for name, (t, d) in workloads.items()}
    return {"status": "ok", "result": {"tasks": {"rates": {"partial": partial,
                                                          "workloads": data}}}}


def test_ratio_table_and_targets():
    roles = {"stock": "s", "plugin": "p", "fused": "f", "authors": "a"}
    jobs = {
        "s": _rates_job({"stock": (1000.0, 200.0)}),
        "p": _rates_job({"plugin_idle": (998.0, 199.5), "steered_100": (970.0, 199.0),
                         "steered_50": (990.0, 199.0)}),
        "f": {"status": "skipped", "reason": "needs about 110 s, 20 s left"},
        "a": _rates_job({"authors_eager": (400.0, 10.0)}),
    }
    table = gpu_check_report.ratio_rows("OLMoE", roles, jobs, "cuda")
    rows = {r["row"]: r for r in table["rows"]}
    assert rows["plugin_idle"]["throughput_x_stock"] == pytest.approx(0.998)
    assert rows["plugin_idle"]["target_met"] == "met"
    assert rows["steered_100"]["target_met"] == "not met"  # 0.97 < 0.98
    assert "needs about 110 s" in rows["fused_idle"]["status"]
    assert rows["authors_eager"]["decode_x_stock"] == pytest.approx(0.05)
    cpu = gpu_check_report.ratio_rows("tiny", roles, jobs, "cpu")
    assert {r.get("target_met") for r in cpu["rows"] if "target" in r} == {"n/a (not a GPU)"}


def test_fused_against_edit():
    roles = {"stock": "s", "plugin": "p", "fused": "f"}
    jobs = {"s": _rates_job({"stock": (100.0, 10.0)}),
            "p": _rates_job({"plugin_idle": (100.0, 10.0), "steered_100": (90.0, 9.0)}),
            "f": _rates_job({"plugin_idle": (100.0, 10.0), "steered_100": (99.0, 9.9)})}
    table = gpu_check_report.ratio_rows("x", roles, jobs, "cuda")
    assert table["fused_vs_edit"]["fused_steered_100"]["throughput"] == pytest.approx(1.1)


def test_kernel_summary():
    bench = {"meta": {"triton_edit": "compiled", "dtype": "bfloat16", "top_k": 8},
             "rows": [{"tokens": 1, "experts": 64, "vllm_topk_us": 4.0, "fused_us": 4.2,
                       "fused/topk": 1.05, "triton_edit+vllm_us": 7.0,
                       "(triton_edit+topk)/topk": 1.75, "triton_matches": True,
                       "fused_matches": True},
                      {"tokens": 16, "experts": 64, "vllm_topk_us": 4.0, "fused_us": 5.0,
                       "fused/topk": 1.25, "triton_matches": True, "fused_matches": False}]}
    checks: list[dict[str, Any]] = []
    summary = gpu_check_report.kernel_summary(bench, "cuda", checks)
    assert [r["target"] for r in summary["rows"]] == ["met", "not met"]
    assert {c["name"]: c["status"] for c in checks} == {
        "Triton edit kernel == torch edit, bit for bit": "pass",
        "fused steered top-k == edit + top-k": "fail"}


# ---- the clock ------------------------------------------------------------------------------


def _job(name: str, seconds: float, estimate: float) -> gpu_check.Job:
    return gpu_check.Job(name, "test", estimate,
                         command=[sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_jobs_that_do_not_fit_are_skipped_and_overruns_stopped(tmp_path):
    clock = gpu_check.Clock(budget_s=4.0, reserve_s=0.0)
    quick, slow, big = _job("quick", 0.1, 1.0), _job("slow", 30.0, 0.4), _job("big", 0.1, 60.0)
    part = gpu_check.Part("test", "test", lambda: [], parallel=1, first_job_s=1.0,
                          jobs=[quick, slow, big])
    gpu_check.run_part(part, clock, tmp_path, lambda: None)
    assert quick.status == "ok"
    assert slow.status == "timeout" and slow.seconds < 10  # 2.5 x its estimate
    assert big.status == "skipped" and "needs about" in big.reason
    assert clock.elapsed() < 15


def test_a_failing_command_is_an_error(tmp_path):
    job = gpu_check.Job("bad", "test", 5.0,
                        command=[sys.executable, "-c", "raise SystemExit('ValueError: nope')"])
    part = gpu_check.Part("test", "test", lambda: [], parallel=2, first_job_s=1.0, jobs=[job])
    gpu_check.run_part(part, gpu_check.Clock(30.0), tmp_path, lambda: None)
    assert job.status == "error" and "nope" in job.reason


def test_arguments():
    args = gpu_check.parse_args(["--out", "x", "--device", "cpu"])
    assert args.parts == ("kernels", "correctness") and args.families == ("qwen3_moe",)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--device", "cpu", "--parts", "qwen3"])


def test_markdown_of_a_report():
    jobs = _jobs()
    checks: list[dict[str, Any]] = []
    summary = gpu_check_report.correctness_checks("olmoe", _plan(), jobs, checks)
    report = {
        "meta": {"device": "cuda", "device_name": "H100", "budget_s": 420, "elapsed_s": 400},
        "summary": {"ok": True, "passed": len(checks), "failed": 0, "skipped": 0},
        "skipped": ["qwen3/fused: needs about 170 s, 12 s left"], "checks": checks,
        "correctness": {"olmoe": {"engines": "graphs", "summary": summary}},
        "ratios": {}, "kernels": {}, "jobs": {"a|b": {"status": "ok", "reason": "x | y"}},
    }
    text = gpu_check_report.render_markdown(report)
    assert "## Skipped" in text and "qwen3/fused: needs about 170 s" in text
    assert "| a|b |" not in text.replace("a/b", "")  # no stray column separators in cells


# ---- the GPU plan, built here -------------------------------------------------------------


def test_the_gpu_plan_builds_on_any_machine(tmp_path):
    """`--device cuda --dry-run`: every checkpoint, profile and job spec the GPU call uses."""
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_check.main(["--device", "cuda", "--dry-run", "--out", str(out),
                           "--work-dir", str(work)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    jobs = report["jobs"]
    assert all(job["status"] == "planned" for job in jobs.values())
    for family in ("olmoe", "qwen2_moe", "gpt_oss"):
        roles = {name.split("/")[1]: job for name, job in jobs.items()
                 if name.startswith(f"{family}-tiny/")}
        assert set(roles) == {"graph", "stock", "eager", "fused", "reference"}
        assert roles["stock"]["env"]["VLLM_PLUGINS"] == ""
        assert roles["fused"]["env"]["STEERMOE_FUSED_ROUTING"] == "1"
        assert roles["eager"]["engine_args"]["enforce_eager"] is True
        assert roles["graph"]["engine_args"]["enforce_eager"] is False
        assert roles["reference"]["engine_args"]["dtype"] == "float32"
        for job in roles.values():
            assert job["engine_args"]["attention_backend"] == "TRITON_ATTN"
            assert job["env"]["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    for shape in ("olmoe", "qwen3"):
        names = sorted(n.split("/")[1] for n in jobs if n.startswith(f"{shape}-real/"))
        assert names == ["authors", "fused", "plugin", "stock"]
        assert jobs[f"{shape}-real/authors"]["engine_args"]["enforce_eager"] is True
        assert jobs[f"{shape}-real/plugin"]["engine_args"]["load_format"] == "dummy"
    spec = json.loads((work / "jobs" / "qwen3-real_plugin" / "spec.json").read_text())
    assert [t["kind"] for t in spec["tasks"]] == ["mixed", "rates"]
    assert [w["name"] for w in spec["tasks"][1]["workloads"]] == ["plugin_idle", "steered_100",
                                                                  "steered_50"]
    assert len(spec["tasks"][1]["profiles"]) == 8
    assert "GPU check (dry run" in (out / "gpu_check.md").read_text()


# ---- the CPU run, end to end ----------------------------------------------------------------


@pytest.mark.engine
def test_cpu_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(out),
         "--budget-s", "600"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=900,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    failed = [c for c in report["checks"] if c["status"] != "pass"]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], failed)
    assert failed == [] and report["skipped"] == []
    names = " / ".join(c["name"] for c in report["checks"])
    for expected in ("routing capture shows every activated expert", "plugin == stock vLLM",
                     "matches transformers", "fused steered top-k == edit + top-k",
                     "Triton edit kernel == torch edit"):
        assert expected in names, names
    rows = report["ratios"]["cpu_tiny"]["rows"]
    assert [r["row"] for r in rows] == ["stock", "plugin_idle", "steered_100", "steered_50",
                                        "authors_eager"]
    assert all(r["status"] == "ok" and r["throughput_tok_s"] > 0 for r in rows)
    markdown = (out / "gpu_check.md").read_text()
    assert "Not a GPU run" in markdown and "## Ratios" in markdown
    assert sorted(p.name for p in (out / "logs").iterdir())
