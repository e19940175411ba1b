"""`expert_profiles.import_steermoe` and `safe_pickle`: published tables become statistics and
profiles with the authors' rule; pickles that are not plain DataFrames are refused unrun.

The published tables are read from ../shared/steermoe-activations (beside the repository) when
present; nothing from them is copied into the repository.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from expert_profiles.import_steermoe import (
    KNOWN_MODELS,
    LOWERS_SAFETY,
    TableFormatError,
    import_table,
    read_counts,
    table_info,
)
from expert_profiles.model_shape import ModelShape
from expert_profiles.safe_pickle import UnsafePickleError, load_dataframe
from expert_profiles.store import ProfileStore

pd = pytest.importorskip("pandas")

REPO = Path(__file__).resolve().parents[2]
PUBLISHED = REPO.parent / "shared" / "steermoe-activations"
SHAPE = ModelShape("TinyMoeForCausalLM", 3, 4, 2, (0, 1, 2))


def synthetic_frame(seed: int = 0) -> pd.DataFrame:
    """A table in the published form for a 3-layer, 4-expert, top-2 model."""
    rng = np.random.default_rng(seed)
    layer = np.repeat(np.arange(3), 4)
    expert = np.tile(np.arange(4), 3)
    a1 = rng.integers(0, 100, 12).astype(float)
    a2 = rng.integers(0, 100, 12).astype(float)
    d1, d2 = 100 - a1, 120 - a2
    rd = a1 / (a1 + d1) - a2 / (a2 + d2)
    frame = pd.DataFrame({
        "layer": layer, "expert": expert, "a1": a1, "a2": a2, "d1": d1, "d2": d2,
        "a1_n": a1 / 100, "a2_n": a2 / 120, "risk_diff": rd,
        "Layer_Expert": [f"L{x}_E{y}" for x, y in zip(layer, expert, strict=True)],
        "risk_diff_abs": np.abs(rd),
    })
    return frame.sort_values("risk_diff_abs", ascending=False).reset_index(drop=True)


def authors_rule(frame: pd.DataFrame, activate: int, deactivate: int, reverse: bool,
                 top_k: int) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The published steering rule, applied with pandas: rank by risk_diff_abs, negate for
    reverse, first N positive rows (at most top-k per layer), first M negative rows."""
    ranked = frame.sort_values(by="risk_diff_abs", ascending=False).reset_index(drop=True)
    score = -ranked["risk_diff"] if reverse else ranked["risk_diff"]
    chosen_on: dict[int, list[int]] = {}
    for row in ranked[score > 0].head(activate).itertuples():
        layer_experts = chosen_on.setdefault(int(row.layer), [])
        if len(layer_experts) < top_k:
            layer_experts.append(int(row.expert))
    chosen_off: dict[int, list[int]] = {}
    for row in ranked[score < 0].head(deactivate).itertuples():
        chosen_off.setdefault(int(row.layer), []).append(int(row.expert))
    clean = lambda sets: {k: sorted(v) for k, v in sorted(sets.items()) if v}  # noqa: E731
    return clean(chosen_on), clean(chosen_off)


def write_counts(path: Path, model: str, task: str, rows: list[tuple[str, int, str, int]]) -> Path:
    lines = [json.dumps({"model": model, "Total Experts": 12, "Steering": steering, "Task": task,
                         "Reverse": reverse, "Activation": kind, "Num Experts": n})
             for steering, reverse, kind, n in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- synthetic tables ------------------------------------------------------------------------


def test_import_with_counts_file(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    table = tables / "activations_[acme--Tiny-MoE]_[safety].pkl"
    frame = synthetic_frame()
    frame.to_pickle(table)
    write_counts(tables / "num_experts.jsonl", "acme/Tiny-MoE", "safety", [
        ("Steer Safe", 0, "Activated", 3), ("Steer Safe", 0, "Deactivated", 2),
        ("Steer Unsafe", 1, "Activated", 2), ("Steer Unsafe", 1, "Deactivated", 4),
        ("Steer Other", 0, "Activated", 1),
    ])
    out = tmp_path / "profiles"
    imported = import_table(table, out, shape=SHAPE, heatmap=False)
    names = sorted(p.name for p in imported)
    assert names == ["tiny-moe-steer-other", "tiny-moe-steer-safe", "tiny-moe-steer-unsafe"]
    store = ProfileStore(out)
    for item in imported:
        profile = store.get(item.name)
        counts = {"Steer Safe": (3, 2, False), "Steer Unsafe": (2, 4, True),
                  "Steer Other": (1, 0, False)}[item.steering]
        want_on, want_off = authors_rule(frame, counts[0], counts[1], counts[2], SHAPE.top_k)
        assert profile.activate == want_on and profile.deactivate == want_off
        assert profile.model.architecture == "TinyMoeForCausalLM"
        assert profile.source["licence"].startswith("derived from the SteerMoE")
        assert (LOWERS_SAFETY in profile.tags) == (item.steering == "Steer Unsafe")
        stats = store.get_stats(item.name)
        assert np.allclose(stats.rd[np.lexsort((stats.expert, stats.layer))],
                           frame.sort_values(["layer", "expert"])["risk_diff"].to_numpy())
        assert list(stats.n1) == [100] * 12 and list(stats.n2) == [120] * 12


def test_import_with_explicit_numbers_and_config(tmp_path):
    table = tmp_path / "table.pkl"
    synthetic_frame(1).to_pickle(table)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["TinyMoeForCausalLM"], "num_hidden_layers": 3,
                                  "num_experts": 4, "num_experts_per_tok": 2}))
    from expert_profiles.import_steermoe import shape_from_config_file

    imported = import_table(table, tmp_path / "out", shape=shape_from_config_file(config),
                            name="mine", activate=2, deactivate=1, direction="2to1")
    assert [p.name for p in imported] == ["mine"]
    want_on, want_off = authors_rule(synthetic_frame(1), 2, 1, True, 2)
    profile = ProfileStore(tmp_path / "out").get("mine")
    assert (profile.activate, profile.deactivate) == (want_on, want_off)
    assert (tmp_path / "out" / "mine.heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        import_table(table, tmp_path / "out", shape=SHAPE, name="mine", activate=1)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns=["d2"]), "lacks the columns \\['d2'\\]"),
        (lambda f: f.assign(layer=f["layer"] + 5), "layer is >= the model's 3 layers"),
        (lambda f: f.assign(expert=f["expert"] * 3), "expert is >= the model's 4"),
        (lambda f: f.assign(a1=f["a1"] + 0.5), "non-negative integers"),
        (lambda f: f.assign(risk_diff=f["risk_diff"] * 0.5), "risk_diff differs"),
        (lambda f: pd.concat([f, f.head(1)]), "listed twice"),
        (lambda f: f.assign(a2=np.nan), "non-finite"),
    ],
)
def test_bad_tables_are_refused(tmp_path, mutate, message):
    table = tmp_path / "t.pkl"
    mutate(synthetic_frame()).to_pickle(table)
    with pytest.raises(TableFormatError, match=message):
        import_table(table, tmp_path / "out", shape=SHAPE, activate=1, heatmap=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_unknown_model_and_missing_counts(tmp_path):
    table = tmp_path / "activations_[acme--Unknown]_[safety].pkl"
    synthetic_frame().to_pickle(table)
    with pytest.raises(TableFormatError, match="unknown model 'acme/Unknown'"):
        import_table(table, tmp_path / "out")
    with pytest.raises(TableFormatError, match="no num_experts.jsonl"):
        import_table(table, tmp_path / "out", shape=SHAPE)


def test_table_info_and_counts(tmp_path):
    info = table_info("x/activations_[Qwen--Qwen3-30B-A3B]_[safety].pkl")
    assert (info.model_id, info.task) == ("Qwen/Qwen3-30B-A3B", "safety")
    assert table_info("other.pkl").model_id is None
    counts = write_counts(tmp_path / "c.jsonl", "m/x", "safety", [
        ("Steer Unsafe", 1, "Activated", 5), ("Steer Unsafe", 1, "Deactivated", 7),
    ])
    [plan] = read_counts(counts, "m/x", "safety")
    assert (plan.direction, plan.activate, plan.deactivate) == ("2to1", 5, 7)
    assert read_counts(counts, "m/x", "faithfulness") == []


# ---- pickles that are not plain DataFrames ---------------------------------------------------


class RunsShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class WritesAFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class LoadsNumpyPickle:
    def __reduce__(self):
        return (np.load, ("/nonexistent.npy", None, True))


@pytest.mark.parametrize("payload", ["shell", "exec", "inside-frame", "numpy-load"])
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "marker"
    value = {
        "shell": lambda: RunsShellCommand(marker),
        "exec": lambda: WritesAFile(marker),
        "inside-frame": lambda: pd.DataFrame({"layer": [0], "x": [WritesAFile(marker)]}),
        "numpy-load": LoadsNumpyPickle,
    }[payload]()
    table = tmp_path / "activations_[acme--Tiny]_[safety].pkl"
    table.write_bytes(pickle.dumps(value))
    with pytest.raises(UnsafePickleError, match="refusing to load") as info:
        import_table(table, tmp_path / "out", shape=SHAPE, activate=1)
    assert "nothing was run" in str(info.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [{"layer": [0]}, [1, 2, 3], "text"])
def test_pickles_of_other_types_are_refused(tmp_path, value):
    path = tmp_path / "t.pkl"
    path.write_bytes(pickle.dumps(value))
    with pytest.raises(UnsafePickleError, match="not a pandas DataFrame"):
        load_dataframe(path)


def test_garbage_is_refused(tmp_path):
    path = tmp_path / "t.pkl"
    path.write_bytes(b"\x80\x05not a pickle at all")
    with pytest.raises(UnsafePickleError):
        load_dataframe(path)


# ---- the published tables ----------------------------------------------------------------------


def published_cases() -> list[tuple[Path, dict]]:
    if not (PUBLISHED / "num_experts.jsonl").is_file():
        return []
    rows = [json.loads(line) for line in (PUBLISHED / "num_experts.jsonl").read_text().splitlines()
            if line.strip()]
    cases = []
    for table in sorted(PUBLISHED.glob("activations_*.pkl")):
        info = table_info(table)
        steerings: dict[str, dict] = {}
        for row in rows:
            if row["model"] == info.model_id and row["Task"] == info.task:
                entry = steerings.setdefault(row["Steering"], {"reverse": row["Reverse"]})
                entry[row["Activation"]] = row["Num Experts"]
        cases.append((table, steerings))
    return cases


@pytest.mark.skipif(not PUBLISHED.is_dir(), reason="../shared/steermoe-activations is absent")
@pytest.mark.parametrize(("table", "steerings"), published_cases(),
                         ids=lambda v: v.name if isinstance(v, Path) else "")
def test_published_tables_match_the_authors_rule(tmp_path, table, steerings):
    assert steerings, f"num_experts.jsonl lists nothing for {table.name}"
    info = table_info(table)
    shape = KNOWN_MODELS[info.model_id]
    frame = pd.read_pickle(table)  # a trusted local copy: plain pandas as the reference
    imported = {p.steering: p for p in import_table(table, tmp_path, heatmap=False)}
    assert set(imported) == set(steerings)
    store = ProfileStore(tmp_path)
    for steering, numbers in steerings.items():
        profile = store.get(imported[steering].name)
        want_on, want_off = authors_rule(frame, numbers.get("Activated", 0),
                                         numbers.get("Deactivated", 0),
                                         bool(numbers["reverse"]), shape.top_k)
        assert profile.activate == want_on, steering
        assert profile.deactivate == want_off, steering
        assert profile.model.num_experts == shape.num_experts
        assert imported[steering].direction == ("2to1" if numbers["reverse"] else "1to2")
        stats = store.get_stats(profile.name)
        assert len(stats) == len(frame)
