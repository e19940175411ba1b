"""`expert_profiles.guard`: the feature, the math of training (against hand-computed cases and
optimality conditions), the `steermoe-guard/1` file and its storage beside the profiles."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from expert_profiles.directory import MAX_PROFILE_BYTES, load_profile_dir
from expert_profiles.guard import (
    MAX_WEIGHT,
    GuardExistsError,
    GuardFile,
    GuardFileError,
    GuardNotFoundError,
    InvalidGuardNameError,
    RoutingCountError,
    count_routed_experts,
    fit_logistic,
    guard_path,
    list_guards,
    load_guard,
    precision_recall,
    prefill_share,
    roc_auc,
    save_guard,
    sigmoid,
    split_metrics,
    youden_threshold,
)
from expert_profiles.model_shape import ModelShape
from expert_profiles.schema import ProfileMismatchError, SteeringProfile
from expert_profiles.store import ProfileStore

MODEL = {"architecture": "OlmoeForCausalLM", "num_layers": 4, "num_experts": 3, "top_k": 2}
SHAPE = ModelShape("OlmoeForCausalLM", 4, 3, 2, (0, 1, 2, 3))


def guard_data(**changes) -> dict:
    data = {"name": "g", "model": MODEL, "moe_layers": [1, 3],
            "weights": [[1.0, -2.0, 0.5], [0.0, 0.25, -1.0]], "intercept": -0.5,
            "threshold": 0.5, "profile": "safety",
            "metrics": {"heldout": {"roc_auc": 0.9}}, "source": {"l2": 1.0}}
    return {**data, **changes}


def make_guard(**changes) -> GuardFile:
    return GuardFile.model_validate(guard_data(**changes))


# ---- ROC AUC, precision, recall, threshold ---------------------------------------------------


@pytest.mark.parametrize(("scores", "labels", "expected"), [
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),
    ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),       # 3 of 4 (pos, neg) pairs ordered
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),         # all tied
    ([0.2, 0.6, 0.6, 0.9], [0, 0, 1, 1], 0.875),       # (1 + 1/2 + 1 + 1) / 4
    ([0.3, 0.3, 0.7], [0, 1, 1], 0.75),                # (1/2 + 1) / 2
    ([3.0, 1.0, 2.0, 2.0, 2.0], [1, 0, 1, 0, 0], 5 / 6),  # (1+1+1 + 1+1/2+1/2) / 6
])
def test_roc_auc_hand_computed(scores, labels, expected):
    assert roc_auc(np.array(scores), np.array(labels)) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(60), 1)  # many ties
    labels = (rng.random(60) < 0.4).astype(int)
    pairs = [(p, n) for p, n in itertools.product(scores[labels == 1], scores[labels == 0])]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_needs_both_labels_and_binary_labels():
    with pytest.raises(ValueError, match="both labels"):
        roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc(np.array([0.1, 0.2]), np.array([0, 2]))


def test_precision_recall_and_metrics():
    scores = np.array([0.9, 0.7, 0.6, 0.4, 0.2])
    labels = np.array([1, 0, 1, 1, 0])
    assert precision_recall(scores, labels, 0.5) == (2 / 3, 2 / 3)
    assert precision_recall(scores, labels, 0.6) == (2 / 3, 2 / 3)  # fires at >= threshold
    assert precision_recall(scores, labels, 0.95) == (0.0, 0.0)     # nothing fires
    figures = split_metrics(scores, labels, 0.5)
    assert figures["counts"] == {"positive": 3, "negative": 2, "tp": 2, "fp": 1, "tn": 1,
                                 "fn": 1}
    assert figures["roc_auc"] == pytest.approx(4 / 6)
    assert split_metrics(scores, np.ones(5, int), 0.5)["roc_auc"] is None


def test_youden_threshold():
    # separable: midway between the lowest positive and the highest negative
    assert youden_threshold(np.array([0.1, 0.3, 0.6, 0.9]), np.array([0, 0, 1, 1])) == \
        pytest.approx(0.45)
    # J at cut 0.8: 1/2 - 0 = 0.5; at 0.6: 1/2 - 1/2 = 0; at 0.4: 1 - 1/2 = 0.5 (tie: the
    # higher cut wins); midway to the next lower score 0.6
    scores, labels = np.array([0.8, 0.6, 0.4, 0.2]), np.array([1, 0, 1, 0])
    assert youden_threshold(scores, labels) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="both labels"):
        youden_threshold(scores, np.zeros(4, int))


# ---- logistic regression ---------------------------------------------------------------------


def _standardised_gradient(X, y, fit, l2):
    """The penalised objective's gradient in the standardised space the fit works in."""
    mean, std = X.mean(axis=0), X.std(axis=0)
    w = fit.weights * std
    b = fit.intercept + float(fit.weights @ mean)
    p = 1.0 / (1.0 + np.exp(-(((X - mean) / std) @ w + b)))
    return np.r_[np.sum(p - y), ((X - mean) / std).T @ (p - y) + l2 * w]


def test_fit_reaches_the_optimum_and_recovers_a_separable_rule():
    rng = np.random.default_rng(0)
    X = rng.random((300, 4))
    y = (X[:, 0] - X[:, 2] > 0).astype(float)
    fit = fit_logistic(X, y, l2=0.1)
    assert fit.converged
    assert np.abs(_standardised_gradient(X, y, fit, 0.1)).max() < 1e-8
    predicted = (X @ fit.weights + fit.intercept) > 0
    assert (predicted == y.astype(bool)).mean() >= 0.99
    assert fit.weights[0] > 0 > fit.weights[2]
    assert abs(fit.weights[1]) < 0.1 * fit.weights[0]
    again = fit_logistic(X, y, l2=0.1)
    assert np.array_equal(again.weights, fit.weights) and again.intercept == fit.intercept


def test_folding_back_the_standardisation_scores_raw_features_alike():
    """Standardising makes the fit blind to each feature's offset and scale; folded back into
    raw weights, rescaled features must give the same scores."""
    rng = np.random.default_rng(1)
    X = rng.random((120, 5))
    y = (X @ np.array([2.0, -1.0, 0.0, 0.5, 1.0]) + rng.normal(0, 0.3, 120) > 1.2).astype(float)
    scale, offset = np.array([0.01, 3.0, 1.0, 50.0, 0.2]), np.array([5.0, -2.0, 0.0, 1.0, 7.0])
    a = fit_logistic(X, y)
    b = fit_logistic(X * scale + offset, y)
    np.testing.assert_allclose(X @ a.weights + a.intercept,
                               (X * scale + offset) @ b.weights + b.intercept, atol=1e-8)
    np.testing.assert_allclose(b.weights * scale, a.weights, rtol=1e-8)


def test_a_constant_feature_gets_weight_zero():
    rng = np.random.default_rng(2)
    X = np.c_[rng.random(50), np.full(50, 0.25)]
    fit = fit_logistic(X, (X[:, 0] > 0.5).astype(float))
    assert fit.weights[1] == 0.0 and fit.weights[0] > 0


def test_fit_refuses_bad_input():
    X = np.zeros((4, 2))
    with pytest.raises(ValueError, match="l2"):
        fit_logistic(X, np.array([0, 1, 0, 1]), l2=0.0)
    with pytest.raises(ValueError, match="0 or 1"):
        fit_logistic(X, np.array([0, 2, 0, 1]))
    with pytest.raises(ValueError, match="not finite"):
        fit_logistic(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]))


# ---- the feature and the score ---------------------------------------------------------------


def test_counts_and_shares_of_a_capture():
    rng = np.random.default_rng(4)
    tokens, layers, top_k, experts = 9, 2, 2, 3
    ids = np.stack([np.stack([rng.choice(experts, top_k, replace=False)
                              for _ in range(layers)]) for _ in range(tokens + 1)])
    counts = count_routed_experts(ids, 0, tokens, experts)
    want = np.zeros((layers, experts), int)
    for t, j in itertools.product(range(tokens), range(layers)):
        for e in ids[t, j]:
            want[j, e] += 1
    assert np.array_equal(counts, want)
    share = prefill_share(counts, tokens)
    np.testing.assert_allclose(share.sum(axis=1), top_k)
    bad = ids.copy()
    bad[2, 0, 0] = -1
    with pytest.raises(RoutingCountError, match="enable_prefix_caching=False"):
        count_routed_experts(bad, 0, tokens, experts)
    with pytest.raises(RoutingCountError, match="need 20"):
        count_routed_experts(ids, 0, 20, experts)
    with pytest.raises(ValueError, match="positive"):
        prefill_share(counts, 0)
    with pytest.raises(ValueError, match="between 0"):
        prefill_share(counts, 2)


def test_score_is_the_sigmoid_of_the_weighted_shares():
    guard = make_guard()
    counts = np.array([[3, 1, 0], [2, 2, 4]])
    share = counts / 4
    z = float(np.sum(np.array(guard.weights) * share)) + guard.intercept
    assert guard.logit(counts, 4) == pytest.approx(z, abs=1e-15)
    assert guard.score(counts, 4) == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-15)
    assert guard.fires(0.5) and not guard.fires(0.4999)
    with pytest.raises(ValueError, match="shape"):
        guard.score(np.zeros((3, 3), int), 4)
    assert sigmoid(-1e6) == 0.0 and sigmoid(1e6) == 1.0  # no overflow
    strong = make_guard(weights=[[MAX_WEIGHT] * 3, [MAX_WEIGHT] * 3])
    assert strong.score(np.full((2, 3), 4), 4) == 1.0


def test_check_model():
    guard = make_guard()
    guard.check_model(ModelShape("OlmoeForCausalLM", 4, 3, 2, (1, 3)))
    with pytest.raises(ProfileMismatchError, match="guard 'g' is for OlmoeForCausalLM"):
        guard.check_model(ModelShape("OlmoeForCausalLM", 4, 5, 2, (1, 3)))
    with pytest.raises(ProfileMismatchError, match=r"MoE layers \[1, 3\]"):
        guard.check_model(SHAPE)


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"weights": [[1.0, 2.0, 3.0]]}, "1 rows, moe_layers 2"),
    ({"weights": [[1.0, 2.0], [1.0, 2.0]]}, "row 0 has 2 values"),
    ({"moe_layers": [3, 1]}, "sorted"),
    ({"moe_layers": [1, 1]}, "sorted"),
    ({"moe_layers": [1, 4]}, "0..3"),
    ({"moe_layers": []}, "at least 1"),
    ({"moe_layers": [True, 3]}, "valid integer"),
    ({"weights": [[float("nan"), 0.0, 0.0], [0.0] * 3]}, "finite"),
    ({"weights": [[float("inf"), 0.0, 0.0], [0.0] * 3]}, "finite"),
    ({"weights": [[2 * MAX_WEIGHT, 0.0, 0.0], [0.0] * 3]}, "exceeds"),
    ({"intercept": float("nan")}, "finite"),
    ({"intercept": "1.0"}, "valid number"),
    ({"threshold": 0.0}, "greater than 0"),
    ({"threshold": 1.0}, "less than 1"),
    ({"metrics": {"auc": float("nan")}}, "not finite"),
    ({"source": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}},
     "nested"),
    ({"profile": "../safety"}, "pattern"),
    ({"name": "a/b"}, "pattern"),
    ({"feature": "prefill-expert-share/2"}, "prefill-expert-share/1"),
    ({"format": "steermoe-guard/2"}, "steermoe-guard/1"),
    ({"extra": 1}, "Extra inputs"),
])
def test_invalid_guards_are_refused(changes, message):
    with pytest.raises(ValidationError, match=message):
        make_guard(**changes)


# ---- storage ---------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    guard = make_guard(weights=[[0.1, 1 / 3, -2e-7], [math.pi, 0.0, -1e5]])
    path = save_guard(tmp_path, guard)
    assert path == tmp_path / "guards" / "g.json" and path.stat().st_mode & 0o777 == 0o644
    loaded = load_guard(tmp_path, "g")
    assert loaded == guard
    counts = np.array([[1, 2, 0], [3, 0, 1]])
    assert loaded.score(counts, 3) == guard.score(counts, 3)  # bit-identical
    assert list_guards(tmp_path) == ["g"]
    with pytest.raises(GuardExistsError, match="'g' already exists"):
        save_guard(tmp_path, guard)
    save_guard(tmp_path, make_guard(intercept=1.0), overwrite=True)
    assert load_guard(tmp_path, "g").intercept == 1.0
    assert [p.name for p in path.parent.iterdir()] == ["g.json"], "temp file left behind"


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / "guards" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _load_error(tmp_path: Path, name: str, kind=GuardFileError) -> str:
    with pytest.raises(kind) as info:
        load_guard(tmp_path, name)
    message = str(info.value)
    assert str(tmp_path) not in message and "guards" not in message, message
    return message


def test_load_errors_name_the_guard_not_the_path(tmp_path):
    assert _load_error(tmp_path, "absent", GuardNotFoundError) == \
        "no guard 'absent' in the profile directory"
    _write(tmp_path, "broken", "{not json")
    assert _load_error(tmp_path, "broken").startswith("guard 'broken': not valid JSON")
    _write(tmp_path, "nan", json.dumps(guard_data(name="nan")).replace("-0.5", "NaN"))
    assert "intercept" in _load_error(tmp_path, "nan")
    _write(tmp_path, "shape", json.dumps(guard_data(name="shape", moe_layers=[1])))
    assert "weights has 2 rows, moe_layers 1" in _load_error(tmp_path, "shape")
    _write(tmp_path, "other", json.dumps(guard_data(name="someone")))
    assert _load_error(tmp_path, "other") == "guard 'other': the file names the guard 'someone'"
    _write(tmp_path, "list", "[1, 2]")
    assert _load_error(tmp_path, "list").startswith("guard 'list': guard:")
    _write(tmp_path, "deep", "[" * 100_000 + "]" * 100_000)
    assert _load_error(tmp_path, "deep").startswith("guard 'deep': ")


def test_oversize_files_and_files_that_are_not_regular_are_refused(tmp_path):
    _write(tmp_path, "big", b" " * (MAX_PROFILE_BYTES + 1))
    assert "too large" in _load_error(tmp_path, "big")
    (tmp_path / "guards" / "dir.json").mkdir()
    assert "not a regular file (a directory)" in _load_error(tmp_path, "dir")
    os.mkfifo(tmp_path / "guards" / "fifo.json")
    assert "not a regular file (a FIFO)" in _load_error(tmp_path, "fifo")


def test_names_cannot_escape_and_links_lead_to_regular_files_only(tmp_path):
    profiles = tmp_path / "profiles"
    outside = tmp_path / "outside.json"
    outside.write_text(make_guard(name="linked").to_json())
    for name in ("../outside", "guards/x", "/etc/passwd", "", ".hidden", "a" * 65):
        with pytest.raises(InvalidGuardNameError, match="invalid guard name"):
            load_guard(profiles, name)
        with pytest.raises(InvalidGuardNameError):
            guard_path(profiles, name)
    (profiles / "guards").mkdir(parents=True)
    # a link to a regular file is followed (as profile links are, for ConfigMap mounts)
    (profiles / "guards" / "linked.json").symlink_to(outside)
    assert load_guard(profiles, "linked").name == "linked"
    (profiles / "guards" / "zero.json").symlink_to("/dev/zero")
    assert "not a regular file (a character device)" in _load_error(profiles, "zero")
    (profiles / "guards" / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    assert "cannot read" in _load_error(profiles, "dangling")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_PROFILE_BYTES + 1))
    (profiles / "guards" / "big.json").symlink_to(big)
    assert "too large" in _load_error(profiles, "big")


# ---- the profile store does not see guards ---------------------------------------------------


def test_profile_loaders_and_commands_ignore_the_guards_directory(tmp_path, capsys):
    from profile_tools.profile_cli import profile_main

    store = ProfileStore(tmp_path, create=True)
    store.put(SteeringProfile.model_validate({"name": "safety", "model": MODEL,
                                              "activate": {"1": [0]}}))
    save_guard(tmp_path, make_guard(name="safety"))  # same name as the profile
    save_guard(tmp_path, make_guard(name="other"))
    assert store.list() == ["safety"]
    profiles, errors = store.validate_all(SHAPE)
    assert list(profiles) == ["safety"] and errors == {}
    loaded = load_profile_dir(tmp_path)
    assert list(loaded.profiles) == ["safety"] and loaded.errors == {}
    assert store.get("safety").activate == {1: [0]}
    assert profile_main(["list", "--dir", str(tmp_path)]) == 0
    assert profile_main(["validate", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "other" not in out.out + out.err and "1 valid, 0 invalid" in out.out
    assert load_guard(tmp_path, "safety").name == "safety"
