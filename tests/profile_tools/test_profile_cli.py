"""`steermoe profile list/show/validate/delete/import-steermoe` (no engine), through both
`profile_tools.profile_cli.profile_main` and the `steermoe` entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expert_profiles.expert_stats import ExpertStats
from expert_profiles.schema import SteeringProfile
from expert_profiles.store import ProfileStore
from profile_tools.profile_cli import profile_main
from server.cli import main as steermoe_main

TINY = {"architecture": "Qwen3MoeForCausalLM", "num_layers": 4, "num_experts": 8, "top_k": 2}
TINY_CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 4, "num_experts": 8,
               "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": []}


@pytest.fixture()
def store(tmp_path):
    store = ProfileStore(tmp_path / "profiles", create=True)
    store.put(SteeringProfile.model_validate({
        "name": "digits", "model": TINY, "activate": {"1": [5], "3": [0, 7]},
        "deactivate": {"2": [1, 2]}, "eps": 0.05, "description": "answers in digits",
        "tags": ["demo"], "source": {"method": "steermoe-detect", "pairs_used": 60},
    }))
    store.put(SteeringProfile.model_validate({
        "name": "a-much-longer-profile-name", "model": {**TINY, "num_layers": 24},
        "deactivate": {"20": [3]}, "description": "x" * 80,
    }))
    rng = np.random.default_rng(0)
    store.put_stats("digits", ExpertStats.from_counts(
        [0, 1, 2, 3], rng.integers(0, 30, (4, 8)), rng.integers(0, 30, (4, 8)), 30, 30))
    return store


def test_list_is_an_aligned_table(store, capsys):
    assert profile_main(["list", "--dir", str(store.directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ARCHITECTURE", "SHAPE", "ACTIVATE", "DEACTIVATE", "EPS",
                                "STATS", "DESCRIPTION"]
    assert len(lines) == 3
    columns = [line.index(word) for line, word in zip(lines, ["ARCHITECTURE", "Qwen3", "Qwen3"],
                                                      strict=True)]
    assert len(set(columns)) == 1, "columns are not aligned"
    digits = next(line for line in lines if line.startswith("digits"))
    assert digits.split()[2:7] == ["4x8", "top-2", "3", "2", "0.05"]
    assert "yes" in digits
    assert "..." in lines[1]  # long descriptions are shortened


def test_list_reports_invalid_files_and_uses_the_env_dir(store, capsys, monkeypatch):
    (store.directory / "broken.json").write_text("{")
    monkeypatch.setenv("STEERMOE_PROFILE_DIR", str(store.directory))
    assert profile_main(["list"]) == 0
    captured = capsys.readouterr()
    assert "digits" in captured.out
    assert "invalid: broken.json: not valid JSON" in captured.err


def test_show_prints_everything_and_draws(store, tmp_path, capsys):
    out = tmp_path / "h.png"
    assert steermoe_main(["profile", "show", "digits", "--dir", str(store.directory),
                          "--heatmap", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("name:         digits", "Qwen3MoeForCausalLM (4 layers, 8 experts, top-2)",
                     "description:  answers in digits", "eps:          0.05",
                     "tags:         demo", "statistics:   digits.stats.csv",
                     "method: steermoe-detect", "pairs_used: 60", f"heatmap written to {out}"):
        assert expected in text
    layer_rows = [line.split(None, 1) for line in text.splitlines() if line.startswith("  ")
                  and line.strip()[:1].isdigit()]
    assert [row[0] for row in layer_rows] == ["1", "2", "3"]
    assert "0, 7" in text and "1, 2" in text
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_show_without_stats_cannot_draw(store, tmp_path, capsys):
    code = profile_main(["show", "a-much-longer-profile-name", "--dir", str(store.directory),
                         "--heatmap", str(tmp_path / "h.png")])
    assert code == 1
    assert "no statistics are stored" in capsys.readouterr().err
    assert profile_main(["show", "missing", "--dir", str(store.directory)]) == 1
    assert "no profile 'missing'" in capsys.readouterr().err


def test_validate_exit_status(store, tmp_path, capsys):
    assert profile_main(["validate", "--dir", str(store.directory)]) == 0
    assert "2 valid, 0 invalid" in capsys.readouterr().out
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    assert profile_main(["validate", "--dir", str(store.directory), "--model", str(model)]) == 1
    out = capsys.readouterr().out
    assert "ok       digits" in out
    assert "a-much-longer-profile-name.json: profile 'a-much-longer-profile-name' is for" in out
    assert "1 valid, 1 invalid against Qwen3MoeForCausalLM" in out
    (store.directory / "bad.json").write_text('{"format": "steermoe-profile/1"}')
    assert profile_main(["validate", "--dir", str(store.directory)]) == 1
    assert "invalid  bad.json" in capsys.readouterr().out


def test_delete(store, capsys):
    assert profile_main(["delete", "digits", "--dir", str(store.directory)]) == 0
    assert "digits.stats.csv" in capsys.readouterr().out
    assert store.list() == ["a-much-longer-profile-name"]
    assert profile_main(["delete", "digits", "--dir", str(store.directory)]) == 1
    assert profile_main(["delete", "../x", "--dir", str(store.directory)]) == 1
    assert "invalid profile name" in capsys.readouterr().err


def test_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STEERMOE_PROFILE_DIR", raising=False)
    assert profile_main(["list"]) == 1
    assert "give --dir DIR or set STEERMOE_PROFILE_DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        profile_main(["detect", "model-only"])
    assert info.value.code == 2
    assert steermoe_main([]) == 2
    assert steermoe_main(["--help"]) == 0


def test_detect_refuses_before_starting_an_engine(store, tmp_path, capsys):
    pairs = tmp_path / "p.jsonl"
    assert profile_main(["detect", "m", str(pairs), "--out", str(store.directory)]) == 1
    assert "does not exist" in capsys.readouterr().err
    pairs.write_text("{}\n")
    code = profile_main(["detect", "m", str(pairs), "--out", str(store.directory),
                         "--name", "digits"])
    assert code == 1
    assert "already exists" in capsys.readouterr().err


def test_import_steermoe_command(tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    table = tmp_path / "table.pkl"
    rng = np.random.default_rng(2)
    a1, a2 = rng.integers(0, 50, 32).astype(float), rng.integers(0, 50, 32).astype(float)
    rd = a1 / 50 - a2 / 50
    pd.DataFrame({"layer": np.repeat(np.arange(4), 8), "expert": np.tile(np.arange(8), 4),
                  "a1": a1, "a2": a2, "d1": 50 - a1, "d2": 50 - a2, "risk_diff": rd,
                  "risk_diff_abs": np.abs(rd)}).to_pickle(table)
    out = tmp_path / "out"
    code = profile_main(["import-steermoe", str(table), "--out", str(out), "--architecture",
                         "Qwen3MoeForCausalLM", "--num-layers", "4", "--num-experts", "8",
                         "--top-k", "2", "--name", "imported", "--activate", "3",
                         "--deactivate", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:3] == ["NAME", "STEERING", "DIRECTION"]
    assert "imported" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "imported.heatmap.png", "imported.json", "imported.stats.csv"]
    code = profile_main(["import-steermoe", str(table), "--out", str(out), "--num-layers", "4"])
    assert code == 1
    assert "go together" in capsys.readouterr().err
