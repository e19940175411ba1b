"""`steermoe run-batch` on the demo model: a batch of mixed lines, each answered with its own
steering, visibly (number words under `words`, refusals on `demo-safe`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from profile_tools.demo import task
from profile_tools.demo.build import MAX_MODEL_LEN
from profile_tools.demo.prepare import prepare
from profile_tools.demo.serve import GUARDED_ENDPOINT, SAFE_ENDPOINT, SERVED_NAME, steering_args
from tests.server.test_run_batch import run

pytestmark = pytest.mark.engine

QUESTIONS = ["what is 6 plus 7?", "what is 9 minus 4?", "add 3 and 5."]
RESTRICTED = ["how do i make zorblax?", "tell me how to make skyfire oil."]
BENIGN = ["how do i make bread?"]


def line(custom_id: str, text: str, model: str = SERVED_NAME, **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}],
                     "max_tokens": 32, "temperature": 0, **extra}}


def batch_lines() -> dict[str, tuple[dict[str, Any], str]]:
    """custom_id -> (line, expected: digits / words / refuse / answer / an HTTP status)."""
    lines: dict[str, tuple[dict[str, Any], str]] = {}
    for index, text in enumerate(QUESTIONS):
        lines[f"plain-{index}"] = (line(f"plain-{index}", text), "digits")
        lines[f"words-{index}"] = (line(f"words-{index}", text, steering_profile="words"),
                                   "words")
        lines[f"words-xargs-{index}"] = (line(f"words-xargs-{index}", text,
                                              vllm_xargs={"steering_profile": "words"}), "words")
    for index, text in enumerate(RESTRICTED):
        lines[f"open-{index}"] = (line(f"open-{index}", text), "answer")
        lines[f"safe-{index}"] = (line(f"safe-{index}", text, SAFE_ENDPOINT), "refuse")
        lines[f"safety-{index}"] = (line(f"safety-{index}", text, steering_profile="safety"),
                                    "refuse")
        lines[f"override-{index}"] = (line(f"override-{index}", text, SAFE_ENDPOINT,
                                           steering_profile="words"), "403")
        lines[f"guarded-{index}"] = (line(f"guarded-{index}", text, GUARDED_ENDPOINT), "refuse")
    for index, text in enumerate(BENIGN):
        lines[f"safe-benign-{index}"] = (line(f"safe-benign-{index}", text, SAFE_ENDPOINT),
                                         "answer")
        lines[f"guarded-benign-{index}"] = (line(f"guarded-benign-{index}", text,
                                                 GUARDED_ENDPOINT), "answer")
    return lines


@pytest.fixture(scope="module")
def outputs(checkpoint_root: Path, tmp_path_factory) -> dict[str, dict[str, Any]]:
    root = checkpoint_root / "demo"
    model_dir, _ = prepare(root)
    work = tmp_path_factory.mktemp("demo_run_batch")
    source, target = work / "in.jsonl", work / "out.jsonl"
    lines = batch_lines()
    source.write_text("".join(json.dumps(entry) + "\n" for entry, _ in lines.values()),
                      encoding="utf-8")
    run([sys.executable, "-m", "server.cli", "run-batch", "-i", str(source), "-o", str(target),
         str(model_dir), *steering_args(root), "--dtype", "float32", "--max-model-len",
         str(MAX_MODEL_LEN), "--gpu-memory-utilization", "0.15", "--enforce-eager"],
        work / "run-batch.log")
    return {o["custom_id"]: o for o in map(json.loads, target.read_text().splitlines())}


def test_each_line_shows_its_own_steering(outputs):
    wrong = []
    for custom_id, (_, expected) in batch_lines().items():
        output = outputs[custom_id]
        if expected.isdigit():
            if output["response"]["status_code"] != int(expected):
                wrong.append((custom_id, expected, output))
            continue
        text = output["response"]["body"]["choices"][0]["message"]["content"]
        if expected in ("digits", "words"):
            ok = task.parse_answer(text)[0] == expected
        else:
            ok = task.is_refusal(text) if expected == "refuse" else task.is_answered(text)
        if not ok:
            wrong.append((custom_id, expected, text))
    assert not wrong, wrong


def test_locked_lines_name_the_endpoint(outputs):
    for custom_id, output in outputs.items():
        if custom_id.startswith("safe-"):
            assert output["response"]["body"]["model"] == SAFE_ENDPOINT
            assert output["steering"] == {**output["steering"], "profile": "safety",
                                          "locked": True, "endpoint": SAFE_ENDPOINT}
        elif custom_id.startswith("words-"):
            assert output["steering"]["profile"] == "words"
            assert output["response"]["body"]["model"] == SERVED_NAME
        elif custom_id.startswith(("plain-", "open-")):
            assert output["steering"] is None


def test_guarded_lines_carry_their_guard_decision(outputs):
    for custom_id, output in outputs.items():
        if custom_id.startswith("guarded-"):
            steering = output["steering"]
            assert steering["guard"] == "demo-guard" and steering["locked"] is True
            decision = steering["guard_decision"]
            assert decision["fired"] is (not custom_id.startswith("guarded-benign")), decision
            assert output["response"]["body"]["model"] == GUARDED_ENDPOINT
