"""Paired data for detection: reading the JSONL file and rendering each side to token ids.

One pair per line:

    {"id": "add-7-8",
     "side1": {"messages": [{"role": "user", "content": "What is 7 + 8?"}], "target": "15"},
     "side2": {"messages": [{"role": "user", "content": "What is 7 + 8?"}], "target": "fifteen"}}

The two sides differ in one behaviour. Each side is rendered with the model's chat template
with `target` appended as the final assistant message; the target's tokens are the tokens
whose characters overlap the last occurrence of the (stripped) target text in the rendering.
Blank lines are skipped. The file is read as a stream: nothing keeps every pair in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from expert_profiles.schema import describe_validation_error


class PairsFileError(ValueError):
    """A line of a pairs file, or a side's rendering, that cannot be used."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str


class PairSide(BaseModel):
    """One side: the conversation so far and the assistant reply whose tokens are counted."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage]
    target: str

    @field_validator("target")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("target must not be blank")
        return value


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | int
    side1: PairSide
    side2: PairSide


def parse_pair(line: str | bytes, line_number: int) -> Pair:
    """Parse one JSONL line; PairsFileError names the line and the problem."""
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PairsFileError(f"line {line_number}: not valid JSON: {exc}") from None
    try:
        return Pair.model_validate(data)
    except ValidationError as exc:
        problems = describe_validation_error(exc, "pair")
        raise PairsFileError(f"line {line_number}: {problems}") from None


def iter_lines(path: str | Path, skip: int = 0) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line bytes) of the file, from line `skip` + 1 on."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if number > skip:
                yield number, line


def count_pairs(path: str | Path) -> int:
    """Non-blank lines of the file (for progress totals)."""
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


@dataclass(frozen=True)
class RenderedSide:
    """Token ids of a rendered side; target tokens are token_ids[target_start:target_end]."""

    token_ids: list[int]
    target_start: int
    target_end: int

    @property
    def target_length(self) -> int:
        return self.target_end - self.target_start


def render_side(tokenizer: Any, side: PairSide) -> RenderedSide:
    """Render `side` with the tokenizer's chat template and locate the target tokens."""
    conversation = [m.model_dump() for m in side.messages]
    conversation.append({"role": "assistant", "content": side.target})
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except (TemplateError, ValueError) as exc:  # a template refusing this conversation
        raise PairsFileError(f"the chat template failed: {exc}") from None
    needle = side.target.strip()
    start = text.rfind(needle)
    if start < 0:
        raise PairsFileError("the chat template's rendering does not contain the target text")
    end = start + len(needle)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise PairsFileError(
            "the tokenizer cannot report character offsets (a fast tokenizer is needed)"
        ) from None
    ids = list(encoded["input_ids"])
    inside = [
        index for index, (first, last) in enumerate(encoded["offset_mapping"])
        if last > first and first < end and last > start
    ]
    if not inside:
        raise PairsFileError("no token of the rendering covers the target text")
    return RenderedSide(ids, inside[0], inside[-1] + 1)
