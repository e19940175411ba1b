"""Strength curves: the behaviour rate and control accuracy of a profile as its
`steering_strength` grows, from the per-setting entries of a summary; tables and a chart."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from profile_tools.evaluation.charts import finish, pyplot

Point = dict[str, Any]


def curve_point(strength: float, data: dict[str, Any] | None) -> Point:
    """{strength, rate, ci_low, ci_high, n, hits} of a rate dict (`Rate.to_dict()`); rate
    and interval are None where nothing was judged."""
    if not data or not data["n"]:
        return {"strength": strength, "rate": None, "ci_low": None, "ci_high": None,
                "n": 0, "hits": 0}
    low, high = data["ci95"]
    return {"strength": strength, "rate": data["rate"], "ci_low": low, "ci_high": high,
            "n": data["n"], "hits": data["hits"]}


def monotonic(points: Sequence[Point]) -> bool | None:
    """Whether the measured rates (exact fractions, in order of strength) never fall; None
    with fewer than two measured points."""
    measured = [Fraction(p["hits"], p["n"]) for p in points if p["n"]]
    if len(measured) < 2:
        return None
    return all(b >= a for a, b in zip(measured, measured[1:], strict=False))


def first_drop(points: Sequence[Point]) -> tuple[Point, Point] | None:
    """The first pair of consecutive measured points whose rate falls."""
    measured = [p for p in points if p["n"]]
    for a, b in zip(measured, measured[1:], strict=False):
        if Fraction(b["hits"], b["n"]) < Fraction(a["hits"], a["n"]):
            return a, b
    return None


def _curve(profile: str, entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scaled = sorted((e for e in entries if e["strength"] is not None),
                    key=lambda e: e["strength"])
    unscaled = next((e for e in entries if e["strength"] is None), None)
    curve = [curve_point(e["strength"], e["behaviour"]) for e in scaled]
    has_control = any(e["control_accuracy"] for e in scaled)
    return {
        "profile": profile,
        "settings": [e["setting"] for e in scaled],
        "curve": curve,
        "control_curve": ([curve_point(e["strength"], e["control_accuracy"]) for e in scaled]
                          if has_control else None),
        "monotonic": monotonic(curve),
        "unscaled": ({key: unscaled[key] for key in ("setting", "behaviour", "control_accuracy")}
                     if unscaled else None),
    }


def build_curves(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One curve per profile run at some strength: {profile: {profile, settings, curve,
    control_curve, monotonic, unscaled}}; `unscaled` is the profile's setting without a
    strength, if the run had one."""
    scaled = list(dict.fromkeys(e["profile"] for e in entries
                                if e.get("strength") is not None))
    return {name: _curve(name, [e for e in entries if e.get("profile") == name])
            for name in scaled}


def _cell(point: Point | None) -> str:
    if not point or not point["n"]:
        return "n/a"
    return (f"{point['rate']:.1%} [{point['ci_low']:.1%}, {point['ci_high']:.1%}] "
            f"({point['hits']}/{point['n']})")


def monotonic_line(curve: dict[str, Any], behaviour: str) -> str:
    """One sentence on whether the behaviour rate grows with strength at the measured points."""
    measured = sum(1 for p in curve["curve"] if p["n"])
    drop = first_drop(curve["curve"])
    if measured < 2:
        return f"Monotonic: not known ({measured} measured strength(s); two are needed)."
    if drop is None:
        return (f"Monotonic: yes. The {behaviour} rate never falls as the strength grows, "
                f"at the {measured} measured strengths (point estimates).")
    a, b = drop
    return (f"Monotonic: no. The {behaviour} rate falls from {a['rate']:.1%} at strength "
            f"{a['strength']:g} to {b['rate']:.1%} at {b['strength']:g} (point estimates).")


def curve_markdown(curve: dict[str, Any], behaviour: str) -> str:
    """A section for one profile: strength vs behaviour rate and control accuracy."""
    control = curve["control_curve"] or [None] * len(curve["curve"])
    lines = [f"## {curve['profile']}: {behaviour} rate by steering strength", "",
             f"| strength | {behaviour} rate (95% CI) | control accuracy (95% CI) |",
             "|---|---|---|"]
    for point, control_point in zip(curve["curve"], control, strict=True):
        lines.append(f"| {point['strength']:g} | {_cell(point)} | {_cell(control_point)} |")
    if curve["unscaled"]:
        lines.append(f"| unscaled ({curve['unscaled']['setting']}) | "
                     f"{_cell(curve_point(1.0, curve['unscaled']['behaviour']))} | "
                     f"{_cell(curve_point(1.0, curve['unscaled']['control_accuracy']))} |")
    return "\n".join([*lines, "", monotonic_line(curve, behaviour)]) + "\n"


def curves_markdown(summary: dict[str, Any]) -> str:
    """Every profile's section, or '' when no profile was run at a strength."""
    return "".join("\n" + curve_markdown(curve, summary["behaviour"])
                   for curve in summary.get("curves", {}).values())


def _series(points: Sequence[Point], dodge: float = 0.0,
            ) -> tuple[list[float], list[float], list[list[float]]]:
    measured = [p for p in points if p["n"]]
    xs = [p["strength"] + dodge for p in measured]
    ys = [p["rate"] for p in measured]
    errors = [[p["rate"] - p["ci_low"] for p in measured],
              [p["ci_high"] - p["rate"] for p in measured]]
    return xs, ys, errors


def curve_chart(summary: dict[str, Any], path: Path, title: str = "") -> Path:
    """Behaviour rate vs strength with 95% CI bars, one line per profile; control accuracy
    dashed in the same colour (lines nudged sideways a little so their bars do not overlap)."""
    behaviour = summary["behaviour"]
    curves = list(summary["curves"].values())
    figure, axes = pyplot().subplots(figsize=(6.4, 3.8), dpi=100)
    for index, curve in enumerate(curves):
        colour = f"C{index % 10}"
        dodge = 0.012 * (2 * index - len(curves) + 0.5)  # error bars side by side
        xs, ys, errors = _series(curve["curve"], dodge)
        axes.errorbar(xs, ys, yerr=errors, color=colour, marker="o", capsize=3,
                      label=f"{curve['profile']}: {behaviour} rate")
        if curve["control_curve"]:
            xs, ys, errors = _series(curve["control_curve"], dodge + 0.012)
            axes.errorbar(xs, ys, yerr=errors, color=colour, marker="s", capsize=3,
                          linestyle="--", alpha=0.7,
                          label=f"{curve['profile']}: control accuracy")
    axes.set_xlim(-0.05, 1.05)
    axes.set_ylim(-0.02, 1.05)
    axes.set_xlabel("steering strength")
    return finish(figure, axes, path, title or f"{behaviour} by steering strength")
