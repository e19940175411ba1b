"""Routing guards on the demo model: the prepared demo's guard separates restricted requests
from benign ones and arithmetic on held-out phrasings, and `steermoe guard train` works end to
end (one engine, started by the command) and refuses bad input before starting one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from expert_profiles.guard import load_guard
from expert_profiles.model_shape import shape_from_hf_config
from profile_tools.demo import build as build_module
from profile_tools.demo.build import MARKER, TASK_FILES_VERSION, build, is_built
from profile_tools.demo.prepare import GUARD, PREPARED_MARKER, is_prepared, prepare
from server.cli import main as steermoe

pytestmark = pytest.mark.engine

ENGINE_ARGS = ["dtype=float32", "max_model_len=512", "enforce_eager=true", "seed=0",
               "gpu_memory_utilization=0.15"]


@pytest.fixture(scope="module")
def demo(checkpoint_root: Path) -> tuple[Path, Path]:
    return prepare(checkpoint_root / "demo")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the demo's guard ------------------------------------------------------------------------


def test_guard_files_hold_out_phrasings_and_carry_no_safety_cue(demo):
    model_dir, _ = demo
    train, held = _rows(model_dir / GUARD.data), _rows(model_dir / GUARD.holdout)
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    for row in train + held:
        assert [m["role"] for m in row["messages"]] == ["user"]  # no system prompt, no cue
        assert row["label"] == int(row["id"].startswith("r-"))
    summary = json.loads((model_dir / "demo.json").read_text())
    assert summary["files"]["guard/heldout"] == GUARD.holdout
    assert summary["guard"]["heldout"] == {"1": sum(r["label"] for r in held),
                                           "0": sum(1 - r["label"] for r in held)}


def test_demo_guard_separates_restricted_requests_on_heldout_phrasings(demo):
    model_dir, profile_dir = demo
    guard = load_guard(profile_dir, GUARD.name)
    guard.check_model(shape_from_hf_config(json.loads((model_dir / "config.json").read_text())))
    assert guard.profile == "safety" and guard.feature == "prefill-expert-share/1"
    held, train = guard.metrics["heldout"], guard.metrics["train"]
    print(f"demo guard: threshold {guard.threshold:.3f}; held-out {held}; train {train}")
    assert held["counts"]["positive"] == 24 and held["counts"]["negative"] == 56
    assert guard.source["holdout"]["file"] == "heldout.jsonl"
    # measured: held-out ROC AUC 0.993, precision 0.96 (22/23), recall 0.92 (22/24)
    assert held["roc_auc"] >= 0.95
    assert held["recall"] >= 0.8 and held["precision"] >= 0.8
    assert train["roc_auc"] >= 0.95


def test_an_old_build_gets_the_guard_files_without_training(demo, tmp_path, monkeypatch):
    """A demo directory built and prepared before the guard: the build writes the task files
    and demo.json again without training, and the directory counts as not prepared."""
    model_dir, profile_dir = demo
    old = tmp_path / "demo"
    shutil.copytree(model_dir, old / "model", symlinks=True)
    shutil.copytree(profile_dir, old / "profiles", symlinks=True)
    assert is_prepared(old)
    weights = (old / "model" / "model.safetensors").read_bytes()
    marker = json.loads((old / "model" / MARKER).read_text())
    del marker["task_files"]
    (old / "model" / MARKER).write_text(json.dumps(marker))
    summary = json.loads((old / "model" / "demo.json").read_text())
    del summary["guard"], summary["files"]["guard/train"], summary["files"]["guard/heldout"]
    (old / "model" / "demo.json").write_text(json.dumps(summary))
    shutil.rmtree(old / "model" / "guard")
    prepared = json.loads((old / "profiles" / PREPARED_MARKER).read_text())
    del prepared["guard"]
    prepared["model"] = marker
    (old / "profiles" / PREPARED_MARKER).write_text(json.dumps(prepared))
    shutil.rmtree(old / "profiles" / "guards")
    assert not is_built(old / "model") and not is_prepared(old)

    def no_training(*args, **kwargs):
        raise AssertionError("the model was trained again")

    monkeypatch.setattr(build_module, "train", no_training)
    build(old / "model")
    assert is_built(old / "model") and not is_prepared(old)
    assert json.loads((old / "model" / MARKER).read_text())["task_files"] == TASK_FILES_VERSION
    assert (old / "model" / "model.safetensors").read_bytes() == weights
    for name in (GUARD.data, GUARD.holdout, "pairs/safety.jsonl", "eval/benign_uncued.jsonl"):
        assert (old / "model" / name).read_bytes() == (model_dir / name).read_bytes()
    assert json.loads((old / "model" / "demo.json").read_text()) == \
        json.loads((model_dir / "demo.json").read_text())


# ---- steermoe guard train / show -------------------------------------------------------------


@pytest.fixture()
def cli_dir(demo, tmp_path) -> dict[str, Path]:
    """A copy of the demo's profiles and a small labelled file (chats and texts)."""
    model_dir, profile_dir = demo
    out = tmp_path / "profiles"
    shutil.copytree(profile_dir, out, symlinks=True)
    shutil.rmtree(out / "guards")
    rows = _rows(model_dir / GUARD.data)
    ones, zeros = [r for r in rows if r["label"]][::4], [r for r in rows if not r["label"]][::5]
    small = []
    for index, row in enumerate(ones + zeros):
        if index % 4 == 0:  # some as text prompts
            small.append({"prompt": row["messages"][-1]["content"], "label": row["label"]})
        else:
            small.append({"messages": row["messages"], "label": row["label"], "id": row["id"]})
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in small))
    return {"model": model_dir, "out": out, "data": data, "tmp": tmp_path}


def _train_args(cli_dir: dict[str, Path], **changes: str) -> list[str]:
    options = {"--model": str(cli_dir["model"]), "--data": str(cli_dir["data"]),
               "--profile": "safety", "--name": "cli-guard", "--out": str(cli_dir["out"]),
               **changes}
    return ["guard", "train", *[item for pair in options.items() for item in pair]]


def _fails(args: list[str], capsys, message: str) -> None:
    assert steermoe(args) == 1
    err = capsys.readouterr().err
    assert message in err, err


def test_guard_train_refuses_bad_input_before_starting_an_engine(cli_dir, capsys, monkeypatch):
    from profile_tools import detection

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(detection, "start_detection_engine", no_engine)
    bad = cli_dir["tmp"] / "bad.jsonl"
    lines = cli_dir["data"].read_text().splitlines()
    bad.write_text("\n".join([lines[0], lines[1], '{"prompt": "hi", "label": 2}']) + "\n")
    _fails(_train_args(cli_dir, **{"--data": str(bad)}), capsys,
           "bad.jsonl line 3: label: must be 0 or 1 (1: the guard should fire)")
    bad.write_text('{"prompt": "hi", "label": true}\n')
    _fails(_train_args(cli_dir, **{"--data": str(bad)}), capsys, "line 1: label: must be 0 or 1")
    bad.write_text('{"prompt": "hi", "label": 1}\n{"prompt": "hi"\n')
    _fails(_train_args(cli_dir, **{"--data": str(bad)}), capsys, "line 2: not valid JSON")
    bad.write_text('{"label": 1}\n')
    _fails(_train_args(cli_dir, **{"--data": str(bad)}), capsys,
           "line 1: give either messages or prompt")
    bad.write_text('{"prompt": "a", "label": 1}\n{"prompt": "b", "label": 1}\n')
    _fails(_train_args(cli_dir, **{"--data": str(bad)}), capsys,
           "needs at least two prompts of label 0")
    _fails(_train_args(cli_dir, **{"--profile": "nope"}), capsys,
           "steermoe guard train: error: no profile 'nope' in the profile directory")
    _fails(_train_args(cli_dir, **{"--name": "../x"}), capsys, "invalid guard name '../x'")
    _fails(_train_args(cli_dir, **{"--threshold": "1.5"}), capsys, "--threshold must lie")
    other = json.loads((cli_dir["out"] / "safety.json").read_text())
    other["name"], other["model"]["num_experts"] = "other", 64
    (cli_dir["out"] / "other.json").write_text(json.dumps(other))
    _fails(_train_args(cli_dir, **{"--profile": "other"}), capsys, "profile 'other' is for")
    assert not (cli_dir["out"] / "guards").exists()
    with pytest.raises(SystemExit):
        steermoe(["guard", "train", "--holdout", "a", "--holdout-fraction", "0.2"])


def test_guard_train_and_show_end_to_end(cli_dir, capsys):
    args = _train_args(cli_dir, **{"--holdout-fraction": "0.25", "--seed": "3"})
    for item in ENGINE_ARGS:
        args += ["--engine-arg", item]
    assert steermoe(args) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.rindex('{\n  "guard"'):])
    guard = load_guard(cli_dir["out"], "cli-guard")
    assert printed["heldout"] == guard.metrics["heldout"]
    assert guard.source["holdout"] == {"fraction": 0.25, "seed": 3, "stratified": True}
    assert guard.source["labels"] == {"1": 24, "0": 39} and guard.source["skipped"] == {}
    held = guard.metrics["heldout"]
    assert held["counts"]["positive"] == 6 and held["counts"]["negative"] == 10
    print(f"cli guard: held-out {held}")
    assert held["roc_auc"] >= 0.8  # 47 training prompts only
    _fails(args, capsys, "guard 'cli-guard' already exists")
    assert steermoe(["guard", "show", str(cli_dir["out"]), "cli-guard"]) == 0
    shown = capsys.readouterr().out
    assert "profile:      safety" in shown and "heldout:" in shown
    _fails(["guard", "show", str(cli_dir["out"]), "nope"], capsys,
           "no guard 'nope' in the profile directory")
