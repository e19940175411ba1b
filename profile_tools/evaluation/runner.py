"""Running prompt sets under steering settings against an OpenAI-compatible server.

A setting is `none` (the base model), `profile:NAME` (the base model with
`steering_profile: NAME`), `profile:NAME@S` (the same with `steering_strength: S`, S in
[0, 1]) or `endpoint:NAME` (the served model NAME, such as a locked endpoint), optionally
labelled `LABEL=...`. `expand_strengths` turns each unscaled profile setting into one setting
per strength. Every answer is judged at once and appended to a results JSONL; a run started
again skips the (setting, set, id) already done without error.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profile_tools.evaluation.client import ChatClient, RequestFailed
from profile_tools.evaluation.judges import Judge, JudgeError
from profile_tools.evaluation.prompts import PromptItem

MAX_STRENGTHS = 21
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+")


@dataclass(frozen=True)
class Setting:
    label: str
    model: str | None  # None: the base model
    profile: str | None = None
    strength: float | None = None  # None: no `steering_strength` sent (the full profile)

    def request(self, base_model: str) -> tuple[str, dict[str, Any]]:
        extra: dict[str, Any] = {"steering_profile": self.profile} if self.profile else {}
        if self.strength is not None:
            extra["steering_strength"] = self.strength
        return self.model or base_model, extra


def parse_strength(text: str) -> float:
    """A plain decimal number in [0, 1] (`0`, `0.25`, `.5`, `1`); ValueError otherwise."""
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"strength {text!r}: expected a decimal number in [0, 1] such as 0.5")
    value = float(text)
    if value > 1:
        raise ValueError(f"strength {text!r}: must be in [0, 1]")
    return value


def parse_strengths(text: str) -> list[float]:
    """`0,0.25,0.5,0.75,1`: distinct strengths in [0, 1], at most MAX_STRENGTHS, sorted."""
    values = [parse_strength(part.strip()) for part in text.split(",")]
    if len(values) > MAX_STRENGTHS:
        raise ValueError(f"at most {MAX_STRENGTHS} strengths, got {len(values)}")
    if len(set(values)) != len(values):
        raise ValueError(f"strengths {text!r}: a strength is given twice")
    return sorted(values)


def strength_label(name: str, strength: float) -> str:
    """`words@0.5`: a label and its strength."""
    return f"{name}@{strength:g}"


def parse_setting(text: str) -> Setting:
    """`none`, `profile:NAME`, `profile:NAME@S`, `endpoint:NAME`, each optionally
    `LABEL=...`."""
    label, sep, spec = text.partition("=")
    if not sep:
        label, spec = "", text
    kind, _, name = spec.partition(":")
    if kind == "profile" and "@" in name:
        name, _, strength = name.rpartition("@")
        if not name or "@" in name:
            raise ValueError(f"setting {text!r}: use profile:NAME@STRENGTH")
        try:
            value = parse_strength(strength)
        except ValueError as exc:
            raise ValueError(f"setting {text!r}: {exc}") from None
        return Setting(label or strength_label(name, value), None, name, value)
    if kind == "none" and not name:
        return Setting(label or "none", None)
    if kind == "profile" and name:
        return Setting(label or name, None, name)
    if kind == "endpoint" and name and not _NUMBER.fullmatch(name.rpartition("@")[2]):
        return Setting(label or name, name)  # `endpoint:NAME@0.5` is refused: not scaled
    raise ValueError(f"setting {text!r}: use none, profile:NAME, profile:NAME@STRENGTH or "
                     "endpoint:NAME (optionally LABEL=...); endpoints take no strength")


def expand_strengths(settings: Sequence[Setting], strengths: Sequence[float],
                     keep_unscaled: bool = False) -> list[Setting]:
    """Each profile setting without a strength becomes one `LABEL@S` setting per strength
    (the unscaled one kept first when keep_unscaled); `none`, endpoints and profile settings
    with their own strength stay as they are."""
    out: list[Setting] = []
    for setting in settings:
        if setting.profile is None or setting.strength is not None:
            out.append(setting)
            continue
        if keep_unscaled:
            out.append(setting)
        out.extend(Setting(strength_label(setting.label, value), None, setting.profile, value)
                   for value in strengths)
    return out


def check_settings(settings: Sequence[Setting]) -> None:
    """ValueError if two settings share a label or a profile is run twice at one strength."""
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise ValueError(f"setting labels must differ: {labels}")
    points = [(s.profile, s.strength) for s in settings if s.strength is not None]
    repeated = sorted({p for p in points if points.count(p) > 1})
    if repeated:
        profile, strength = repeated[0]
        raise ValueError(f"profile {profile!r} is run twice at strength {strength:g}")


@dataclass(frozen=True)
class Task:
    setting: Setting
    set_name: str
    item: PromptItem
    judge: Judge

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.setting.label, self.set_name, self.item.id)


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
    return rows


def latest(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The last row of each (setting, set, id)."""
    return {(r["setting"], r["set"], r["id"]): r for r in rows}


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return False
        handle.seek(-1, 2)
        return handle.read(1) != b"\n"


async def _run_one(task: Task, client: ChatClient, base_model: str, max_tokens: int,
                   temperature: float) -> dict[str, Any]:
    model, extra = task.setting.request(base_model)
    row: dict[str, Any] = {"setting": task.setting.label, "set": task.set_name,
                           "id": task.item.id, "model": model, **extra, "answer": None,
                           "verdict": None, "judge": task.judge.name, "error": None}
    started = time.perf_counter()
    try:
        answer = await client.chat(model, task.item.messages, max_tokens=max_tokens,
                                   temperature=temperature, extra_body=extra)
        row["answer"] = answer
        row["verdict"] = bool(await task.judge(task.item, answer))
    except (RequestFailed, JudgeError) as exc:
        row["error"] = str(exc)
    row["seconds"] = round(time.perf_counter() - started, 3)
    return row


async def run_tasks(tasks: Sequence[Task], client: ChatClient, base_model: str,
                    results_path: Path, *, concurrency: int = 16, max_tokens: int = 64,
                    temperature: float = 0.0, progress: bool = True) -> list[dict[str, Any]]:
    """Run what is not done yet, appending each row; returns the latest row of every task."""
    from tqdm import tqdm

    done = {key for key, row in latest(read_results(results_path)).items()
            if row.get("error") is None}
    todo = [task for task in tasks if task.key not in done]
    results_path.parent.mkdir(parents=True, exist_ok=True)
    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="req", desc="eval",
               disable=not progress)

    async def guarded(task: Task) -> dict[str, Any]:
        async with semaphore:
            return await _run_one(task, client, base_model, max_tokens, temperature)

    with open(results_path, "a", encoding="utf-8") as handle:
        if _ends_mid_line(results_path):
            handle.write("\n")  # after a line cut short by an interrupted run
        for finished in asyncio.as_completed([guarded(task) for task in todo]):
            row = await finished
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            bar.update(1)
    bar.close()
    rows = latest(read_results(results_path))
    return [rows[task.key] for task in tasks if task.key in rows]
