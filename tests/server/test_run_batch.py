"""`steermoe run-batch` on a real engine (tiny Qwen3-MoE): a batch of mixed lines, each line
steered by its own body (captured routing checked per line), locked names running their
profile, refused lines answered in vLLM's output-line form; and what plain `vllm run-batch`
with the plugin does (steering in `vllm_xargs` applied without any policy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.local_server import ENGINE_OPTIONS
from tests.server.routing_checks import assert_follows, follows
from tests.server.server_process import CONCISE, LAYERS, SAFETY, tiny_qwen_with_profiles

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
INLINE = ({layer: [4] for layer in LAYERS}, {layer: [2, 3] for layer in LAYERS})
SETS = {"safety": SAFETY, "concise": CONCISE, "inline": INLINE}


def chat_line(custom_id: str, model: str = "tiny", capture: bool = True,
              **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": f"Hello, {custom_id}!"}],
            "max_tokens": 3, "temperature": 0, **extra}
    if capture:
        body["capture_routing"] = True
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": body}


# custom_id -> (line, expected: a profile name / "none" / an HTTP status of a refused line)
LINES: dict[str, tuple[Any, Any]] = {
    "plain": (chat_line("plain"), "none"),
    "concise": (chat_line("concise", steering_profile="concise"), "concise"),
    "concise-xargs": (chat_line("concise-xargs", capture=False,
                                vllm_xargs={"steering_profile": "concise",
                                            "capture_routing": 1}), "concise"),
    "inline": (chat_line("inline", steering={"activate": {"1": [4]}}), 403),
    "locked": (chat_line("locked", "tiny-safe"), "safety"),
    "locked-explicit": (chat_line("locked-explicit", "tiny-safe",
                                  steering_profile="safety"), "safety"),
    "locked-override": (chat_line("locked-override", "tiny-safe", steering_profile=None), 403),
    "unknown": (chat_line("unknown", steering_profile="nope"), 404),
    "unsafe": (chat_line("unsafe", steering_profile="unsafe"), 403),
    "forged": (chat_line("forged", vllm_xargs={"steermoe": "{}", "steermoe_auth": "x"}), 400),
    "embeddings": ({"custom_id": "embeddings", "method": "POST", "url": "/v1/embeddings",
                    "body": {"model": "tiny", "input": "x", "steering_profile": "concise"}},
                   400),
    "concise-2": (chat_line("concise-2", steering_profile="concise"), "concise"),
    "plain-2": (chat_line("plain-2"), "none"),
}


@pytest.fixture(scope="module")
def setup(build_tiny, tmp_path_factory) -> dict[str, Any]:
    return tiny_qwen_with_profiles(build_tiny, tmp_path_factory.mktemp("run_batch"))


def run(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    full_env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", **(env or {})}
    for key in ("STEERMOE_SERVER_CONFIG", "STEERMOE_SERVER_KEY"):
        full_env.pop(key, None)
    with open(log, "wb") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                cwd=REPO, timeout=600)
    assert result.returncode == 0, log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def steered_batch(setup) -> dict[str, Any]:
    root = setup["root"]
    source, target = root / "in.jsonl", root / "out.jsonl"
    text = "\n".join(json.dumps(line) for line, _ in LINES.values())
    source.write_text(text + "\n\n{not json\n", encoding="utf-8")
    run([sys.executable, "-m", "server.cli", "run-batch", "-i", str(source), "-o", str(target),
         str(setup["checkpoint"]), *ENGINE_OPTIONS, "--served-model-name", "tiny",
         "--profiles", str(setup["profiles"]), "--endpoint", "tiny-safe=safety",
         "--allow-routing-capture", "--audit-log", str(root / "audit.jsonl")],
        root / "run-batch.log")
    outputs = [json.loads(line) for line in target.read_text().splitlines()]
    audit = [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]
    return {"outputs": outputs, "audit": audit}


def test_every_line_is_answered_in_order(steered_batch):
    outputs = steered_batch["outputs"]
    assert [output["custom_id"] for output in outputs] == [*LINES, ""]
    last = outputs[-1]
    assert last["response"]["status_code"] == 400 and last["error"]["error"]["code"] == 400


def test_each_line_runs_its_own_steering(steered_batch):
    for output in steered_batch["outputs"][:-1]:
        expected = LINES[output["custom_id"]][1]
        if isinstance(expected, int):
            continue
        response = output["response"]
        assert response["status_code"] == 200, output
        body = response["body"]
        routing = body["routing"]
        if expected == "none":
            assert output["steering"] is None and body["steering"] is None
            for sets in SETS.values():
                assert not follows(routing, *sets), output["custom_id"]
        else:
            assert output["steering"]["profile"] == expected
            assert body["steering"] == output["steering"]
            assert_follows(routing, *SETS[expected])


def test_locked_lines_name_the_endpoint(steered_batch):
    locked = [o for o in steered_batch["outputs"] if o["custom_id"].startswith("locked-")
              or o["custom_id"] == "locked"]
    served = [o for o in locked if o["response"]["status_code"] == 200]
    assert len(served) == 2
    for output in served:
        assert output["response"]["body"]["model"] == "tiny-safe"
        assert output["steering"]["locked"] is True
        assert output["steering"]["endpoint"] == "tiny-safe"


def test_refused_lines_get_vllms_error_form(steered_batch):
    for output in steered_batch["outputs"][:-1]:
        expected = LINES[output["custom_id"]][1]
        if not isinstance(expected, int):
            continue
        assert output["response"] == {"status_code": expected,
                                      "request_id": output["response"]["request_id"],
                                      "body": None}, output
        error = output["error"]["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == expected


def test_audit_lines_of_the_batch(steered_batch):
    audit = steered_batch["audit"]
    assert {line["path"] for line in audit} == {"run-batch:/v1/chat/completions"}
    served = {line["request_id"] for line in audit if line["status"] == 200}
    bodies = {o["response"]["body"]["id"] for o in steered_batch["outputs"]
              if o.get("steering") is not None}
    assert bodies <= served
    refused = [line for line in audit if line["status"] != 200]
    assert {line["status"] for line in refused} == {403, 404}  # the forged one is no request


def test_plain_vllm_run_batch_with_the_plugin(setup):
    """Documented behaviour: `vllm run-batch` with the plugin installed steers a line by
    `vllm_xargs.steering_profile` (resolved from STEERMOE_PROFILE_DIR, no policy: any profile,
    no locked names); top-level `steering_profile` is an unknown field and is ignored."""
    root = setup["root"]
    source, target = root / "plain-in.jsonl", root / "plain-out.jsonl"
    lines = [chat_line("plain", capture=False, max_tokens=8),
             chat_line("xargs", capture=False, max_tokens=8,
                       vllm_xargs={"steering_profile": "concise"}),
             chat_line("top", capture=False, max_tokens=8, steering_profile="concise"),
             chat_line("locked", "tiny-safe", capture=False)]
    for line in lines:
        line["body"]["messages"][0]["content"] = "Hello there"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    run([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(source),
         "-o", str(target), "--model", str(setup["checkpoint"]), *ENGINE_OPTIONS,
         "--served-model-name", "tiny"], root / "plain.log",
        env={"STEERMOE_PROFILE_DIR": str(setup["profiles"])})
    outputs = {o["custom_id"]: o for o in map(json.loads, target.read_text().splitlines())}

    def text(custom_id: str) -> str:
        return outputs[custom_id]["response"]["body"]["choices"][0]["message"]["content"]

    assert text("xargs") != text("plain")
    assert text("top") == text("plain")
    assert outputs["locked"]["response"]["status_code"] == 404
