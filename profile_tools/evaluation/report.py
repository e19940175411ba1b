"""Summaries of evaluation rows: per-setting rates with Wilson intervals, strength curves,
tables, charts, JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from profile_tools.evaluation.charts import finish, pyplot
from profile_tools.evaluation.curves import build_curves, curve_chart, curves_markdown
from profile_tools.evaluation.runner import Setting
from profile_tools.evaluation.stats import Rate, wilson

BEHAVIOUR, CONTROL = "behaviour", "control"


def rate_of(rows: Sequence[dict[str, Any]], setting: str, set_name: str) -> Rate:
    judged = [r for r in rows if r["setting"] == setting and r["set"] == set_name
              and r.get("error") is None and r.get("verdict") is not None]
    return wilson(sum(bool(r["verdict"]) for r in judged), len(judged))


def _entry(rows: Sequence[dict[str, Any]], setting: str | Setting) -> dict[str, Any]:
    label = setting if isinstance(setting, str) else setting.label
    errors = sum(1 for r in rows if r["setting"] == label and r.get("error"))
    entry: dict[str, Any] = {"setting": label}
    if isinstance(setting, Setting):
        entry.update(profile=setting.profile, strength=setting.strength)
    entry.update(behaviour=rate_of(rows, label, BEHAVIOUR).to_dict(), errors=errors)
    control = rate_of(rows, label, CONTROL)
    entry["control_accuracy"] = control.to_dict() if control.total else None
    return entry


def summarize(rows: Sequence[dict[str, Any]], settings: Sequence[str | Setting],
              behaviour: str) -> dict[str, Any]:
    """{"behaviour": name, "settings": [{setting, behaviour, control_accuracy, errors}],
    "curves": {profile: ...}}; settings given as Setting also carry profile and strength, and
    every profile run at a strength gets a curve (`curves.build_curves`)."""
    entries = [_entry(rows, setting) for setting in settings]
    return {"behaviour": behaviour, "settings": entries, "curves": build_curves(entries)}


def _cell(data: dict[str, Any] | None) -> str:
    if not data or not data["n"]:
        return "n/a"
    low, high = data["ci95"]
    return f"{data['rate']:.1%} [{low:.1%}, {high:.1%}] ({data['hits']}/{data['n']})"


def markdown_table(summary: dict[str, Any]) -> str:
    lines = [f"| setting | {summary['behaviour']} rate (95% CI) | control accuracy (95% CI) "
             "| errors |", "|---|---|---|---|"]
    for entry in summary["settings"]:
        lines.append(f"| {entry['setting']} | {_cell(entry['behaviour'])} | "
                     f"{_cell(entry['control_accuracy'])} | {entry['errors']} |")
    return "\n".join(lines) + "\n"


def _errorbars(entries: list[dict[str, Any] | None]) -> tuple[list[float], list[list[float]]]:
    values, low, high = [], [], []
    for data in entries:
        if data and data["n"]:
            values.append(data["rate"])
            low.append(data["rate"] - data["ci95"][0])
            high.append(data["ci95"][1] - data["rate"])
        else:
            values.append(0.0)
            low.append(0.0)
            high.append(0.0)
    return values, [low, high]


def chart(summary: dict[str, Any], path: Path, title: str = "") -> Path:
    """Grouped bars: behaviour rate and control accuracy per setting, with 95% CIs."""
    labels = [e["setting"] for e in summary["settings"]]
    positions = list(range(len(labels)))
    has_control = any(e["control_accuracy"] for e in summary["settings"])
    width = 0.38 if has_control else 0.6
    figure, axes = pyplot().subplots(figsize=(max(4.0, 1.3 * len(labels) + 1.5), 3.4),
                                     dpi=100)
    values, errors = _errorbars([e["behaviour"] for e in summary["settings"]])
    shift = -width / 2 if has_control else 0.0
    axes.bar([p + shift for p in positions], values, width, yerr=errors, capsize=3,
             label=f"{summary['behaviour']} rate", color="#c44e52")
    if has_control:
        values, errors = _errorbars([e["control_accuracy"] for e in summary["settings"]])
        axes.bar([p + width / 2 for p in positions], values, width, yerr=errors, capsize=3,
                 label="control accuracy", color="#4c72b0")
    axes.set_xticks(positions, labels)
    axes.set_ylim(0, 1.05)
    return finish(figure, axes, path, title or f"{summary['behaviour']} by steering setting")


def write_reports(summary: dict[str, Any], out_dir: Path, title: str = "") -> dict[str, Path]:
    """summary.json, summary.md (with a section per strength curve), chart.png and, when
    there are curves, curve.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "summary.json", "table": out_dir / "summary.md",
             "chart": out_dir / "chart.png"}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["table"].write_text(markdown_table(summary) + curves_markdown(summary))
    chart(summary, paths["chart"], title)
    if summary.get("curves"):
        paths["curve"] = curve_chart(summary, out_dir / "curve.png", title)
    return paths
