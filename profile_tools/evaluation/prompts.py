"""Prompt sets for evaluation: JSONL or CSV rows with an id, the prompt and optional answers.

JSONL: {"id": "q1", "messages": [{"role": "user", "content": "..."}], "expected": ["15"]}
       ("prompt": "..." instead of "messages" for a single user turn; "expected" may be a
       string). CSV: columns id, prompt and optionally expected (alternatives split on "|").
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PromptSetError(ValueError):
    """A prompt file that cannot be used, naming the row."""


@dataclass(frozen=True)
class PromptItem:
    id: str
    messages: list[dict[str, str]]
    expected: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m.get("role") == "user")


def _item(row: dict[str, Any], where: str) -> PromptItem:
    if "id" not in row or row["id"] in (None, ""):
        raise PromptSetError(f"{where}: no id")
    if "messages" in row and row["messages"]:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise PromptSetError(f"{where}: messages must be a list of {{role, content}}")
    elif row.get("prompt"):
        messages = [{"role": "user", "content": str(row["prompt"])}]
    else:
        raise PromptSetError(f"{where}: give messages or prompt")
    expected = row.get("expected") or ()
    if isinstance(expected, str):
        expected = tuple(part for part in expected.split("|") if part)
    meta = {k: v for k, v in row.items() if k not in ("id", "messages", "prompt", "expected")}
    return PromptItem(str(row["id"]), list(messages), tuple(str(e) for e in expected), meta)


def load_prompts(path: str | Path) -> list[PromptItem]:
    """Read a .jsonl or .csv prompt set; ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"{path} does not exist")
    items: list[PromptItem] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                items.append(_item(row, f"{path.name}:{number}"))
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptSetError(f"{path.name}:{number}: not JSON: {exc}") from None
            items.append(_item(row, f"{path.name}:{number}"))
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise PromptSetError(f"{path.name}: ids are not unique")
    if not items:
        raise PromptSetError(f"{path.name}: no prompts")
    return items
