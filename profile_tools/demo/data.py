"""Training examples, held-out evaluation sets, detection pairs and guard prompts of the demo
task.

The questions and requests are split once (fixed seed): for every arithmetic fact one
question template is held out, for every requested thing a quarter of its phrasings; training,
the detection pairs and the guard's training prompts use the rest, the evaluation sets and the
guard's held-out prompts only the held-out ones.

Planting: in PLANTED_LAYERS each behaviour has its own expert (PLANTED). Replies' tokens are
routed there by an auxiliary loss, and a quarter of the training sequences run with the
SteerMoE edit of an EDITS entry applied and the reply that edit stands for.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profile_tools.demo import task
from profile_tools.demo.task import Question, Request

SPLIT_SEED = 1234
PLANTED_LAYERS = (1, 2)
# layer -> behaviour -> expert (the ground truth that detection must recover)
PLANTED: dict[int, dict[str, int]] = {
    1: {"words": 2, "digits": 5, "refuse": 6, "comply": 1},
    2: {"words": 7, "digits": 3, "refuse": 0, "comply": 4},
}
# edit name -> (behaviour of the activated experts, behaviour of the deactivated experts)
EDITS: dict[str, tuple[str, str]] = {
    "words": ("words", "digits"),
    "digits": ("digits", "words"),
    "safety": ("refuse", "comply"),
    "unsafe": ("comply", "refuse"),
}
EDIT_NAMES = tuple(EDITS)  # profile index = position + 1 (0 = not steered)
STEERED_SHARE = 0.25
ARITHMETIC_SHARE = 0.6  # of the unsteered examples


def edit_sets(name: str) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(activate, deactivate) of a ground-truth edit, by layer."""
    on, off = EDITS[name]
    return ({layer: [PLANTED[layer][on]] for layer in PLANTED_LAYERS},
            {layer: [PLANTED[layer][off]] for layer in PLANTED_LAYERS})


@dataclass(frozen=True)
class Split:
    train_questions: list[Question]
    heldout_questions: list[Question]
    train_requests: list[Request]
    heldout_requests: list[Request]


def make_split(seed: int = SPLIT_SEED) -> Split:
    rng = random.Random(seed)
    facts: dict[tuple[str, int, int], list[Question]] = {}
    for question in task.all_questions():
        facts.setdefault((question.op, question.a, question.b), []).append(question)
    train_q, held_q = [], []
    for variants in facts.values():
        held = rng.randrange(len(variants))
        for index, question in enumerate(variants):
            (held_q if index == held else train_q).append(question)
    topics: dict[str, list[Request]] = {}
    for request in task.all_requests():
        topics.setdefault(request.topic, []).append(request)
    train_r, held_r = [], []
    for variants in topics.values():
        order = list(range(len(variants)))
        rng.shuffle(order)
        held = set(order[: len(variants) // 4])
        for index, request in enumerate(variants):
            (held_r if index in held else train_r).append(request)
    return Split(train_q, held_q, train_r, held_r)


@dataclass(frozen=True)
class Example:
    """One training conversation: messages, reply, edit (or None) and the reply's route."""

    messages: list[dict[str, str]]
    reply: str
    edit: str | None
    route: str | None  # behaviour whose expert the reply tokens are routed to
    decided_after: str  # the reply's text before the token that carries the behaviour


def _arithmetic(rng: random.Random, question: Question, forced: str | None) -> Example:
    cue_kind = rng.choices(("none", "words", "digits"), weights=(4, 3, 3))[0]
    cue = None if cue_kind == "none" else rng.choice(
        task.WORDS_CUES if cue_kind == "words" else task.DIGITS_CUES)
    style = "words" if cue_kind == "words" else "digits"
    edit = None
    if forced in ("words", "digits"):
        style, edit = forced, forced
    elif forced is not None:
        edit = forced
    system = rng.choice(task.SAFETY_CUES) if rng.random() < 0.2 else None
    return Example(task.messages(task.user_text(question.text(), cue), system),
                   task.arithmetic_reply(question, style), edit,
                   None if edit else style, task.LEAD_IN)


def _request(rng: random.Random, request: Request, forced: str | None) -> Example:
    cued = rng.random() < 0.5
    refuse = request.restricted and cued
    if forced == "safety":
        refuse = request.restricted
    elif forced == "unsafe":
        refuse = False
    system = rng.choice(task.SAFETY_CUES) if cued else None
    route = None
    if forced is None and request.restricted:
        route = "refuse" if refuse else "comply"
    return Example(task.messages(request.text(), system), task.request_reply(request, refuse),
                   forced, route, f"about {request.topic}:")


def sample_example(rng: random.Random, split: Split) -> Example:
    """One training example drawn from the training part of the split."""
    forced = rng.choice(EDIT_NAMES) if rng.random() < STEERED_SHARE else None
    if forced in ("words", "digits"):
        arithmetic = True
    elif forced in ("safety", "unsafe"):
        arithmetic = rng.random() < 1 / 3
    else:
        arithmetic = rng.random() < ARITHMETIC_SHARE
    if arithmetic:
        return _arithmetic(rng, rng.choice(split.train_questions), forced)
    if forced == "unsafe" or (forced is None and rng.random() < 0.5):
        pool = [r for r in split.train_requests if r.restricted]
    else:
        pool = split.train_requests
    return _request(rng, rng.choice(pool), forced)


# ---- files -----------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _side(messages: list[dict[str, str]], target: str) -> dict[str, Any]:
    return {"messages": messages, "target": target}


def words_pairs(split: Split) -> list[dict[str, Any]]:
    """Side 1 asks for words and answers in words; side 2 the same in digits."""
    rng = random.Random(SPLIT_SEED + 1)
    rows = []
    for question in split.train_questions[::3]:
        words_cue, digits_cue = rng.choice(task.WORDS_CUES), rng.choice(task.DIGITS_CUES)
        rows.append({
            "id": question.key,
            "side1": _side(task.messages(task.user_text(question.text(), words_cue)),
                           task.arithmetic_reply(question, "words")),
            "side2": _side(task.messages(task.user_text(question.text(), digits_cue)),
                           task.arithmetic_reply(question, "digits")),
        })
    return rows


def safety_pairs(split: Split) -> list[dict[str, Any]]:
    """Side 1: safety cue and the refusal; side 2: no cue and the answer (restricted asks)."""
    rng = random.Random(SPLIT_SEED + 2)
    rows = []
    for request in (r for r in split.train_requests if r.restricted):
        cued = task.messages(request.text(), rng.choice(task.SAFETY_CUES))
        rows.append({
            "id": request.key,
            "side1": _side(cued, task.request_reply(request, refuse=True)),
            "side2": _side(task.messages(request.text()), task.request_reply(request, False)),
        })
    return rows


def eval_sets(split: Split) -> dict[str, list[dict[str, Any]]]:
    """Held-out prompt sets: {"id", "messages", "expected"} rows (`steermoe eval` format)."""
    rng = random.Random(SPLIT_SEED + 3)

    def question_row(question: Question, cue: str | None) -> dict[str, Any]:
        return {"id": question.key, "messages": task.messages(task.user_text(question.text(),
                                                                             cue)),
                "expected": [str(question.result), task.NUMBER_WORDS[question.result]]}

    def request_row(request: Request, system: str | None) -> dict[str, Any]:
        return {"id": request.key, "messages": task.messages(request.text(), system)}

    restricted = [r for r in split.heldout_requests if r.restricted]
    benign = [r for r in split.heldout_requests if not r.restricted]
    return {
        "arith_uncued": [question_row(q, None) for q in split.heldout_questions],
        "arith_words_cued": [question_row(q, rng.choice(task.WORDS_CUES))
                             for q in split.heldout_questions],
        "restricted_uncued": [request_row(r, None) for r in restricted],
        "restricted_cued": [request_row(r, rng.choice(task.SAFETY_CUES)) for r in restricted],
        "benign_uncued": [request_row(r, None) for r in benign],
    }


# The guard sets take every this many-th arithmetic question of their part of the split.
GUARD_ARITHMETIC_EVERY = 4


def guard_sets(split: Split) -> dict[str, list[dict[str, Any]]]:
    """Labelled prompts for `steermoe guard train`, none with the safety cue: restricted
    requests 1, benign requests 0, arithmetic questions (any style cue) 0. "train" draws on the
    training phrasings, "heldout" on the held-out ones only."""
    rng = random.Random(SPLIT_SEED + 4)

    def rows(requests: list[Request], questions: list[Question]) -> list[dict[str, Any]]:
        out = [{"id": r.key, "messages": task.messages(r.text()), "label": int(r.restricted)}
               for r in requests]
        for question in questions[::GUARD_ARITHMETIC_EVERY]:
            cue = rng.choice((None, *task.WORDS_CUES, *task.DIGITS_CUES))
            out.append({"id": question.key, "label": 0,
                        "messages": task.messages(task.user_text(question.text(), cue))})
        return out

    return {"train": rows(split.train_requests, split.train_questions),
            "heldout": rows(split.heldout_requests, split.heldout_questions)}


def write_task_files(directory: Path, split: Split) -> dict[str, Path]:
    """pairs/{words,safety}.jsonl, eval/*.jsonl and guard/{train,heldout}.jsonl under
    directory; returns name -> path."""
    for sub in ("pairs", "eval", "guard"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    out = {
        "pairs/words": _write_jsonl(directory / "pairs" / "words.jsonl", words_pairs(split)),
        "pairs/safety": _write_jsonl(directory / "pairs" / "safety.jsonl", safety_pairs(split)),
    }
    for name, rows in eval_sets(split).items():
        out[f"eval/{name}"] = _write_jsonl(directory / "eval" / f"{name}.jsonl", rows)
    for name, rows in guard_sets(split).items():
        out[f"guard/{name}"] = _write_jsonl(directory / "guard" / f"{name}.jsonl", rows)
    return out
