"""What `benchmarks.gpu_check` concludes from its jobs: checks, ratios, targets, Markdown.

Pure functions over the jobs' JSON results (no vLLM, no torch), so they are tested on made-up
results (`tests/benchmarks/test_gpu_check.py`). Terms:

* a *check* passes, fails or is skipped (with the reason); any failure makes the run fail;
* a *target* (the issue's speed goals) is met, not met, or n/a; it never fails the run:
  it is a measurement.
"""

from __future__ import annotations

import math
from typing import Any

# Speed goals (docs/benchmarks.md): ratios to stock vLLM, and the routing kernel to vLLM's top-k.
IDLE_TARGET = 0.995
STEERED_TARGET = 0.98
KERNEL_TARGET = 1.1
ROUTING_AGREEMENT = 0.98

# Rows of a ratio table: (row, job role, workload in that job's rates task).
RATIO_ROWS = [
    ("stock", "stock", "stock"),
    ("plugin_idle", "plugin", "plugin_idle"),
    ("steered_100", "plugin", "steered_100"),
    ("steered_50", "plugin", "steered_50"),
    ("fused_idle", "fused", "plugin_idle"),
    ("fused_steered_100", "fused", "steered_100"),
    ("fused_steered_50", "fused", "steered_50"),
    ("authors_eager", "authors", "authors_eager"),
]
ROW_TARGETS = {
    "plugin_idle": IDLE_TARGET, "fused_idle": IDLE_TARGET,
    "steered_100": STEERED_TARGET, "fused_steered_100": STEERED_TARGET,
}
ROW_WHAT = {
    "stock": "vLLM without the plugin",
    "plugin_idle": "plugin loaded, nothing steered",
    "steered_100": "every request steered, 8 profiles mixed",
    "steered_50": "half the requests steered, 8 profiles",
    "fused_idle": "fused routing on, nothing steered",
    "fused_steered_100": "fused routing on, every request steered, 8 profiles",
    "fused_steered_50": "fused routing on, half steered, 8 profiles",
    "authors_eager": "the authors' approach: eager mode, one global mask",
}


def check(checks: list[dict[str, Any]], part: str, name: str, status: str,
          detail: str = "") -> None:
    assert status in ("pass", "fail", "skip"), status
    checks.append({"part": part, "name": name, "status": status, "detail": detail})


# ---- comparing engines ------------------------------------------------------------------------


def _gap(logprobs: list[list[float]], a: int, b: int) -> float | None:
    """|logprob(a) - logprob(b)| at one position, if both tokens are among the listed ones."""
    values = {int(t): float(v) for t, v in logprobs}
    if a in values and b in values:
        return abs(values[a] - values[b])
    return None


def compare_tokens(reference: dict[str, Any], other: dict[str, Any],
                   tie_tolerance: float) -> dict[str, Any]:
    """Greedy tokens of two engines for the same request.

    Equal, or different first at a position where the two tokens are within `tie_tolerance`
    in logprob (in either engine's top-2): a near tie that either engine may break its own way
    (after it the contexts differ, so nothing later is compared). Anything else is a mismatch.
    """
    a, b = reference["output_ids"], other["output_ids"]
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x == y:
            continue
        gaps = [g for g in (_gap(reference["logprobs"][i], x, y) if i < len(reference["logprobs"])
                            else None,
                            _gap(other["logprobs"][i], x, y) if i < len(other["logprobs"])
                            else None) if g is not None]
        gap = min(gaps) if gaps else math.inf
        return {"equal": False, "position": i, "gap": gap, "tie": gap <= tie_tolerance}
    if len(a) != len(b):
        return {"equal": False, "position": min(len(a), len(b)), "gap": math.inf, "tie": False}
    return {"equal": True}


def describe_comparison(result: dict[str, Any]) -> str:
    if result["equal"]:
        return "equal"
    gap = "not in the top-2" if math.isinf(result["gap"]) else f"logprob gap {result['gap']:.3g}"
    kind = "near tie" if result["tie"] else "MISMATCH"
    return f"{kind} at token {result['position']} ({gap})"


def routing_problems(request: dict[str, Any], sets: dict[str, Any] | None,
                     shape: dict[str, Any]) -> list[str]:
    """Where a request's captured routing breaks its steering or the capture's shape."""
    routing = request.get("routing")
    if routing is None:
        return ["no routing was captured"]
    rows = len(request["prompt_ids"]) + len(request["output_ids"]) - 1
    layers = list(shape["moe_layers"])
    problems = []
    if request.get("routing_layers") != layers:
        problems.append(f"capture layers {request.get('routing_layers')} != {layers}")
    dims = [len(routing), len(routing[0]) if routing else 0,
            len(routing[0][0]) if routing and routing[0] else 0]
    if dims != [rows, len(layers), shape["top_k"]]:
        problems.append(f"capture shape {dims} != {[rows, len(layers), shape['top_k']]}")
        return problems
    flat = [e for row in routing for layer in row for e in layer]
    if any(not 0 <= e < shape["num_experts"] for e in flat):
        problems.append("expert id out of range (or a row not computed)")
    for layer, (activate, deactivate) in (sets or {}).items():
        column = layers.index(int(layer))
        for t, row in enumerate(routing):
            chosen = set(row[column])
            missing = set(activate) - chosen
            forbidden = set(deactivate) & chosen
            if missing or forbidden:
                problems.append(f"row {t} layer {layer}: activated {sorted(missing)} missing, "
                                f"deactivated {sorted(forbidden)} routed")
                break
    return problems


# ---- correctness ------------------------------------------------------------------------------


def correctness_checks(family: str, plan: dict[str, Any], jobs: dict[str, dict[str, Any]],
                       checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Checks of one family's engines; returns a summary table row per comparison."""
    part = "correctness"
    shape = plan["shape"]
    requests = plan["requests"]
    tol = plan["tie_tolerance"]
    roles = plan["roles"]  # role -> job name
    summary: dict[str, str] = {}

    def result(role: str) -> dict[str, Any] | None:
        job = jobs.get(roles.get(role, ""))
        if job is None or job.get("status") == "skipped":
            return None
        return job

    def mixed(role: str) -> dict[str, Any] | None:
        job = result(role)
        return (job or {}).get("result", {}).get("tasks", {}).get("mixed")

    for role, name in roles.items():
        job = jobs.get(name)
        label = f"{family} {role}"
        if job is None or job.get("status") == "skipped":
            reason = (job or {}).get("reason", "not run")
            check(checks, part, f"{label}: engine ran", "skip", reason)
            summary[f"{role}: engine"] = f"skipped ({reason})"
            continue
        ok = job.get("status") == "ok" and mixed(role) is not None
        detail = job.get("error") or job.get("status", "")
        check(checks, part, f"{label}: engine ran the mixed batch", "pass" if ok else "fail",
              "" if ok else detail)
        summary[f"{role}: engine"] = "ok" if ok else f"FAILED: {detail}"
        if not ok or role == "stock":
            continue
        batch = mixed(role)
        problems = []
        for request in requests:
            got = batch["requests"][request["name"]]
            for problem in routing_problems(got, request.get("sets"), shape):
                problems.append(f"{request['name']}: {problem}")
        dtype = plan["dtypes"].get(role, "")
        check(checks, part, f"{label}: routing capture shows every activated expert in every "
              f"row and no deactivated one ({dtype})", "fail" if problems else "pass",
              "; ".join(problems[:3]))
        summary[f"{role}: steering in the capture ({dtype})"] = (
            "ok" if not problems else f"FAILED: {problems[0]}")

    fused = result("fused")
    if fused is not None and fused.get("status") == "ok":
        info = (fused.get("result") or {}).get("engine_info") or {}
        layers = info.get("fused_routing_layers")
        if layers is None:
            status, detail = "fail", ("engine.json has no fused_routing_layers: the fused "
                                      "routing is not wired into vllm_compat yet")
        elif sorted(layers) != sorted(shape["moe_layers"]):
            status, detail = "fail", f"fused on layers {layers} of {shape['moe_layers']}"
        else:
            status, detail = "pass", f"{len(layers)} layers"
        check(checks, part, f"{family} fused: the fused routing serves every MoE layer",
              status, detail)
        summary["fused: routing kernel installed"] = detail if status == "fail" else "ok"

    def compare(name: str, base_role: str, other_role: str, names: list[str]) -> None:
        base, other = mixed(base_role), mixed(other_role)
        if base is None or other is None:
            missing = base_role if base is None else other_role
            check(checks, part, f"{family}: {name}", "skip", f"no {missing} result")
            summary[name] = f"skipped (no {missing} result)"
            return
        outcomes = {n: compare_tokens(base["requests"][n], other["requests"][n], tol)
                    for n in names}
        bad = {n: o for n, o in outcomes.items() if not o["equal"] and not o["tie"]}
        ties = {n: o for n, o in outcomes.items() if not o["equal"] and o["tie"]}
        detail = "; ".join(f"{n}: {describe_comparison(o)}" for n, o in {**bad, **ties}.items())
        check(checks, part, f"{family}: {name}", "fail" if bad else "pass", detail)
        summary[name] = ("FAILED: " + detail) if bad else (
            "equal" if not ties else f"equal up to near ties ({detail})")

    every = [r["name"] for r in requests]
    plain = [r["name"] for r in requests if not r.get("sets")]
    if "eager" in roles:
        compare("greedy tokens: CUDA graphs == eager mode", "graph", "eager", every)
    if "fused" in roles:
        compare("greedy tokens: fused routing == edit + vLLM top-k", "graph", "fused", every)
    base_role = "graph" if "graph" in roles else "plugin"
    if "stock" in roles:
        compare("unsteered tokens: plugin == stock vLLM", "stock", base_role, plain)
        if "fused" in roles:
            compare("unsteered tokens: fused routing == stock vLLM", "stock", "fused", plain)
    if plan.get("reference_role"):
        reference_checks(family, plan, result(plan["reference_role"]), checks, summary)
    return summary


def reference_checks(family: str, plan: dict[str, Any], job: dict[str, Any] | None,
                     checks: list[dict[str, Any]], summary: dict[str, str]) -> None:
    part = "correctness"
    name = f"{family}: matches transformers with the SteerMoE edit ({plan['reference_dtype']})"
    if job is None:
        check(checks, part, name, "skip", "the reference engine did not run")
        summary["reference"] = "skipped"
        return
    res = job.get("result") or {}
    ref = res.get("reference")
    if ref is None:
        detail = res.get("reference_error") or job.get("error") or "no reference result"
        check(checks, part, name, "fail", detail)
        summary["reference"] = f"FAILED: {detail}"
        return
    problems = []
    worst_lp = max((r["max_logprob_diff"] for r in ref.values()), default=0.0)
    agreement = min((r.get("routing_agreement", 1.0) for r in ref.values()), default=1.0)
    for request, r in ref.items():
        if not r["tokens_ok"]:
            problems.append(f"{request}: greedy token differs at "
                            f"{[d['position'] for d in r['token_differences']]}")
        if r.get("routing_agreement", 1.0) < ROUTING_AGREEMENT:
            problems.append(f"{request}: routing agreement {r['routing_agreement']:.3f}")
    if worst_lp > plan["logprob_tolerance"]:
        problems.append(f"logprob difference {worst_lp:.2e} > {plan['logprob_tolerance']:.0e}")
    detail = (f"routing agreement >= {agreement:.3f}, largest logprob difference {worst_lp:.2e}"
              + (f"; {'; '.join(problems)}" if problems else ""))
    check(checks, part, name, "fail" if problems else "pass", detail)
    summary["reference"] = ("FAILED: " if problems else "ok: ") + detail


def capture_checks(part: str, info: dict[str, Any], jobs: dict[str, dict[str, Any]],
                   checks: list[dict[str, Any]]) -> dict[str, str]:
    """Steering in the routing capture of the timed engines' mixed batch (real shapes)."""
    out = {}
    for role, name in info["roles"].items():
        job = jobs.get(name) or {}
        batch = (((job.get("result") or {}).get("tasks") or {}).get("mixed"))
        if role == "stock" or job.get("status") in (None, "skipped", "planned"):
            continue
        label = f"{name}: routing capture shows every activated expert in every row and no " \
                "deactivated one (bf16, dummy weights)"
        if batch is None:
            check(checks, part, label, "fail", job.get("error") or job.get("reason") or
                  "no mixed batch result")
            out[role] = "FAILED: no result"
            continue
        problems = [f"{r['name']}: {p}" for r in info["requests"]
                    for p in routing_problems(batch["requests"][r["name"]], r.get("sets"),
                                              info["shape"])]
        check(checks, part, label, "fail" if problems else "pass", "; ".join(problems[:3]))
        out[role] = "ok" if not problems else f"FAILED: {problems[0]}"
    return out


# ---- ratios -----------------------------------------------------------------------------------


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def ratio_rows(shape_label: str, roles: dict[str, str], jobs: dict[str, dict[str, Any]],
               device: str) -> dict[str, Any]:
    """The ratio table of one shape: absolute rates, ratios to stock, targets."""
    rows = []
    measured: dict[str, dict[str, Any]] = {}
    for row, role, workload in RATIO_ROWS:
        job = jobs.get(roles.get(role, ""))
        if job is None:
            continue
        rates = (((job.get("result") or {}).get("tasks") or {}).get("rates") or {})
        data = (rates.get("workloads") or {}).get(workload)
        if data is None:
            status = job.get("status", "not run")
            reason = job.get("reason") or job.get("error")
            if status == "ok" and not reason:
                status = "not measured"
            rows.append({"row": row, "what": ROW_WHAT[row], "job": roles[role],
                         "status": f"{status}: {reason}" if reason else status})
            continue
        measured[row] = data
        rows.append({"row": row, "what": ROW_WHAT[row], "job": roles[role], "status": "ok",
                     "partial": bool(rates.get("partial")),
                     "throughput_tok_s": data["throughput_tok_s"],
                     "decode_tok_s": data["decode_tok_s"]})
    stock = measured.get("stock", {})
    for entry in rows:
        if entry["status"] != "ok":
            continue
        entry["throughput_x_stock"] = _ratio(entry["throughput_tok_s"],
                                             stock.get("throughput_tok_s"))
        entry["decode_x_stock"] = _ratio(entry["decode_tok_s"], stock.get("decode_tok_s"))
        target = ROW_TARGETS.get(entry["row"])
        if target is not None:
            entry["target"] = target
            entry["target_met"] = target_status(
                [entry["throughput_x_stock"], entry["decode_x_stock"]], target, device)
    fused_vs_edit = {}
    for fused_row, edit_row in (("fused_idle", "plugin_idle"),
                                ("fused_steered_100", "steered_100"),
                                ("fused_steered_50", "steered_50")):
        f, e = measured.get(fused_row), measured.get(edit_row)
        if f and e:
            fused_vs_edit[fused_row] = {
                "throughput": _ratio(f["throughput_tok_s"], e["throughput_tok_s"]),
                "decode": _ratio(f["decode_tok_s"], e["decode_tok_s"]),
            }
    return {"shape": shape_label, "rows": rows, "fused_vs_edit": fused_vs_edit}


def target_status(ratios: list[float | None], target: float, device: str,
                  higher_is_better: bool = True) -> str:
    if device != "cuda":
        return "n/a (not a GPU)"
    values = [r for r in ratios if r is not None]
    if len(values) < len(ratios) or not values:
        return "not measured"
    ok = all(v >= target for v in values) if higher_is_better else all(
        v <= target for v in values)
    return "met" if ok else "not met"


# ---- kernels ----------------------------------------------------------------------------------


def kernel_summary(bench: dict[str, Any] | None, device: str,
                   checks: list[dict[str, Any]]) -> dict[str, Any]:
    part = "kernels"
    if bench is None:
        check(checks, part, "routing microbenchmark ran", "skip", "no result")
        return {}
    rows = bench.get("rows", [])
    for key, what in (("triton_matches", "Triton edit kernel == torch edit, bit for bit"),
                      ("fused_matches", "fused steered top-k == edit + top-k")):
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            check(checks, part, what, "skip", "the Triton kernel did not run here")
        else:
            bad = [f"T{r['tokens']}/E{r['experts']}" for r in rows if r.get(key) is False]
            check(checks, part, what, "fail" if bad else "pass",
                  f"{len(values)} shapes" + (f"; differs at {', '.join(bad)}" if bad else ""))
    # Interpreted Triton (CPU) is checked above but not timed: its times mean nothing.
    compiled = bench.get("meta", {}).get("triton_edit") == "compiled"
    edit = "triton_edit" if compiled else "torch_edit"
    table = []
    for r in rows:
        fused = r.get("fused/topk") if compiled else None
        table.append({
            "tokens": r["tokens"], "experts": r["experts"],
            "vllm_topk_us": r.get("vllm_topk_us"),
            "edit": "Triton" if compiled else "torch",
            "edit_then_topk_us": r.get(f"{edit}+vllm_us"),
            "fused_us": r.get("fused_us") if compiled else None,
            "fused_torch_us": r.get("fused_torch_us"),
            "edit_then_topk_x": r.get(f"({edit}+topk)/topk"),
            "fused_x": fused,
            "target": target_status([fused], KERNEL_TARGET, device, higher_is_better=False)
            if r.get("vllm_topk_us") is not None else "not measured",
        })
    return {"meta": bench.get("meta", {}), "rows": table}


# ---- Markdown ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text: Any) -> str:
    """Text for a Markdown table cell (one line, no column separator)."""
    return " ".join(str(text).split()).replace("|", "/")


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    summary = report["summary"]
    title = "# GPU check (dry run: planned, nothing ran)" if meta.get("dry_run") else "# GPU check"
    lines = [
        title,
        "",
        f"- device: {meta.get('device')} ({meta.get('device_name')}); vLLM "
        f"{meta.get('vllm')}, torch {meta.get('torch')}, triton {meta.get('triton')}",
        f"- started {meta.get('started')}, took {_fmt(meta.get('elapsed_s'), 0)} s of a "
        f"{_fmt(meta.get('budget_s'), 0)} s budget; commit {meta.get('commit')}",
        f"- checks: **{summary['passed']} passed, {summary['failed']} failed, "
        f"{summary['skipped']} skipped** ({'OK' if summary['ok'] else 'FAILED'})",
        "",
    ]
    if meta.get("device") != "cuda":
        lines += ["Not a GPU run: the figures below show that the check runs end to end; they "
                  "say nothing about the GPU targets.", ""]
    skipped = report.get("skipped", [])
    if skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in skipped] + [""]
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    if failed:
        lines += ["## Failed checks", ""]
        lines += [f"- [{c['part']}] {c['name']}: {c['detail']}" for c in failed] + [""]
    if report.get("correctness"):
        lines += ["## Correctness", ""]
        for family, info in report["correctness"].items():
            lines += [f"### {family}", "", f"Engines: {info.get('engines', '')}", "",
                      "| check | result |", "|---|---|"]
            lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in info["summary"].items()] + [""]
    for table in report.get("ratios", {}).values():
        lines += [f"## Ratios: {table['shape']}", "", table.get("workload", ""), "",
                  "| config | what | gen tok/s | x stock | decode tok/s | x stock | target |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for r in table["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['row']} | {r['what']} | - | - | - | - | {_cell(r['status'])} |")
                continue
            target = (f">= {r['target']}: {r['target_met']}" if "target" in r else "")
            partial = " (partial)" if r.get("partial") else ""
            lines.append(
                f"| {r['row']}{partial} | {r['what']} | {_fmt(r['throughput_tok_s'])} | "
                f"{_fmt(r.get('throughput_x_stock'), 3)} | {_fmt(r['decode_tok_s'])} | "
                f"{_fmt(r.get('decode_x_stock'), 3)} | {target} |")
        if table.get("capture"):
            lines += ["", "Steering in the routing capture at these shapes (mixed batch before "
                      "the timed runs): " + ", ".join(f"{k} {_cell(v)}"
                                                      for k, v in table["capture"].items())]
        if table.get("fused_vs_edit"):
            lines += ["", "Fused routing / edit + vLLM top-k (same workload):", "",
                      "| config | throughput | decode |", "|---|---:|---:|"]
            lines += [f"| {k} | {_fmt(v['throughput'], 3)} | {_fmt(v['decode'], 3)} |"
                      for k, v in table["fused_vs_edit"].items()]
        lines.append("")
    kernels = report.get("kernels") or {}
    if kernels.get("rows"):
        m = kernels.get("meta", {})
        lines += ["## Routing microbenchmark", "",
                  f"{m.get('dtype')} logits, top-{m.get('top_k')}, half the rows steered over "
                  f"4 profiles; median microseconds per call; vLLM top-k: {m.get('vllm_topk')}; "
                  f"Triton: {m.get('triton_edit')}.", "",
                  f"| T | E | vLLM top-k | edit ({kernels['rows'][0]['edit']}) + top-k | "
                  "fused (Triton) | fused (torch) | "
                  "(edit + top-k) / top-k | fused / top-k | target <= 1.1 |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in kernels["rows"]:
            lines.append(
                f"| {r['tokens']} | {r['experts']} | {_fmt(r['vllm_topk_us'])} | "
                f"{_fmt(r['edit_then_topk_us'])} | {_fmt(r['fused_us'])} | "
                f"{_fmt(r['fused_torch_us'])} | {_fmt(r['edit_then_topk_x'], 2)} | "
                f"{_fmt(r['fused_x'], 2)} | {r['target']} |")
        lines.append("")
    lines += ["## Jobs", "", "| job | status | start-up s | wall s | note |",
              "|---|---|---:|---:|---|"]
    for name, job in report.get("jobs", {}).items():
        note = job.get("reason") or job.get("error") or ""
        lines.append(f"| {_cell(name)} | {job.get('status')} | {_fmt(job.get('startup_s'), 0)} | "
                     f"{_fmt(job.get('seconds'), 0)} | {_cell(note)[:160]} |")
    lines.append("")
    return "\n".join(lines)
