"""Running prompt sets under steering settings against an OpenAI-compatible server.

A setting is `none` (the base model), `profile:NAME` (the base model with
`steering_profile: NAME`) or `endpoint:NAME` (the served model NAME, such as a locked
endpoint), optionally labelled `LABEL=...`. Every answer is judged at once and appended to a
results JSONL; a run started again skips the (setting, set, id) already done without error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profile_tools.evaluation.client import ChatClient, RequestFailed
from profile_tools.evaluation.judges import Judge, JudgeError
from profile_tools.evaluation.prompts import PromptItem


@dataclass(frozen=True)
class Setting:
    label: str
    model: str | None  # None: the base model
    profile: str | None = None

    def request(self, base_model: str) -> tuple[str, dict[str, Any]]:
        extra = {"steering_profile": self.profile} if self.profile else {}
        return self.model or base_model, extra


def parse_setting(text: str) -> Setting:
    """`none`, `profile:NAME`, `endpoint:NAME`, each optionally `LABEL=...`."""
    label, sep, spec = text.partition("=")
    if not sep:
        label, spec = "", text
    kind, _, name = spec.partition(":")
    if kind == "none" and not name:
        return Setting(label or "none", None)
    if kind == "profile" and name:
        return Setting(label or name, None, name)
    if kind == "endpoint" and name:
        return Setting(label or name, name)
    raise ValueError(f"setting {text!r}: use none, profile:NAME or endpoint:NAME "
                     "(optionally LABEL=...)")


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
