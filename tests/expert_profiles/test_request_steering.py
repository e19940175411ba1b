"""`expert_profiles.request_steering`: resolving a request's steering in the front end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from expert_profiles import request_steering as rs
from expert_profiles.model_shape import ModelShape
from expert_profiles.request_steering import (
    ModelNotSteerableError,
    ProfileCache,
    RequestedSteering,
    ResolvedSteering,
    SteeringRequestError,
    UnknownProfileError,
    check_mark,
    default_eps,
    inline_to_wire,
    parse_steering_fields,
    resolve_request,
    salted,
    steering_mark,
    wants_capture,
)

SHAPE = ModelShape("OlmoeForCausalLM", 16, 64, 8)
MODEL = SHAPE.to_dict()
EPS = 0.01


def profile_data(name: str, **overrides) -> dict:
    data = {
        "format": "steermoe-profile/1",
        "name": name,
        "model": dict(MODEL),
        "activate": {"3": [12, 40]},
        "deactivate": {"5": [7]},
    }
    data.update(overrides)
    return data


def write_profile(directory: Path, name: str, **overrides) -> Path:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(profile_data(name, **overrides)), encoding="utf-8")
    return path


def bump_mtime(path: Path, delta_ns: int = 5_000_000_000) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + delta_ns))


@pytest.fixture
def cache(tmp_path) -> ProfileCache:
    write_profile(tmp_path, "safety")
    return ProfileCache(tmp_path)


def resolve(extra_args, cache, shape=SHAPE, eps=EPS, reason=None):
    return resolve_request(extra_args, shape, cache, eps, reason)


# ---- parse_steering_fields: the one parser of the steering fields --------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, RequestedSteering()),
        ({"other": 1, "steermoe": "x"}, RequestedSteering()),
        ({"steering_profile": "safety"}, RequestedSteering(profile="safety", profile_given=True)),
        ({"steering_profile": None}, RequestedSteering(profile_given=True)),
        ({"steering": None}, RequestedSteering()),
        ({"steering": {"activate": {"3": [1]}}},
         RequestedSteering(inline={"activate": {"3": [1]}})),
        ({"steering": '{"activate": {"3": [1]}}'},
         RequestedSteering(inline={"activate": {"3": [1]}})),
        ({"steering": "{}"}, RequestedSteering(inline={})),
        ({"capture_routing": True}, RequestedSteering(capture=True)),
        ({"capture_routing": 1}, RequestedSteering(capture=True)),
        ({"capture_routing": 0}, RequestedSteering()),
        ({"steering_profile": None, "steering": {"eps": 1}},
         RequestedSteering(profile_given=True, inline={"eps": 1})),
    ],
)
def test_read_steering(fields, expected):
    assert parse_steering_fields(fields) == expected


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"steering_profile": 3}, "steering_profile", "'steering_profile' must be a string"),
        ({"steering_profile": {"a": 1}}, "steering_profile", "'steering_profile' must be a string"),
        ({"steering_profile": ["a", 3]}, "steering_profile", "invalid steering profile name"),
        ({"steering_profile": "a+a"}, "steering_profile", "profile 'a' is named twice"),
        ({"steering_profile": ["a", "a"]}, "steering_profile", "profile 'a' is named twice"),
        ({"steering_profile": []}, "steering_profile", "the list of profiles is empty"),
        ({"steering_profile": "a+"}, "steering_profile", "invalid steering profile name"),
        ({"steering_profile": "+".join("abcdefghi")}, "steering_profile", "at most 8 profiles"),
        ({"steering": [1]}, "steering", "'steering' must be an object (or its JSON text)"),
        ({"steering": "null"}, "steering", "'steering' must be an object (or its JSON text)"),
        ({"steering": "[1]"}, "steering", "'steering' must be an object (or its JSON text)"),
        ({"steering": "[" * 100_000}, "steering", "'steering' must be an object"),
        ({"steering": "9" * 5000}, "steering", "'steering' must be an object"),
        ({"capture_routing": None}, "capture_routing", "'capture_routing' must be true or false"),
        ({"capture_routing": 2}, "capture_routing", "'capture_routing' must be true or false"),
        ({"capture_routing": 1.0}, "capture_routing", "'capture_routing' must be true or false"),
        ({"capture_routing": "1"}, "capture_routing", "'capture_routing' must be true or false"),
        ({"steering_profile": "a", "steering": {}}, "steering", "not both"),
        ({"steering_profile": "a", "steering": "{}"}, "steering", "not both"),
    ],
)
def test_read_steering_refuses(fields, param, message):
    with pytest.raises(SteeringRequestError) as info:
        parse_steering_fields(fields)
    assert info.value.status == 400 and info.value.code == "invalid_steering"
    assert info.value.param == param and message in str(info.value)


def test_inline_wire_form_reads_back():
    inline = {"deactivate": {"5": [7]}, "activate": {"3": [40, 12]}, "eps": 0.5}
    text = inline_to_wire(inline)
    assert isinstance(text, str) and parse_steering_fields({"steering": text}).inline == inline


# ---- nothing asked -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra_args",
    [
        None,
        {},
        {"capture_routing": True},
        {"other": 1},
        {"steering_profile": None},
        {"steering": None},
    ],
)
def test_no_steering_asked(extra_args, cache):
    assert resolve(extra_args, cache) is None


def test_no_steering_asked_on_unsteerable_model(cache):
    assert resolve({"capture_routing": True}, cache, shape=None, reason="nope") is None


def test_both_profile_and_inline_is_an_error(cache):
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering_profile": "safety", "steering": {"activate": {"1": [1]}}}, cache)
    assert info.value.status == 400
    assert info.value.code == "invalid_steering"
    assert str(info.value) == "give either 'steering_profile' or 'steering', not both"


# ---- profile -----------------------------------------------------------------------------------


def test_profile_by_name(cache):
    r = resolve({"steering_profile": "safety"}, cache)
    assert isinstance(r, ResolvedSteering)
    assert r.label == "profile:safety"
    assert r.activate == {3: [12, 40]}
    assert r.deactivate == {5: [7]}
    assert r.eps == EPS
    assert len(r.digest) == 16


def test_profile_eps_overrides_default(tmp_path):
    write_profile(tmp_path, "strong", eps=0.5)
    r = resolve({"steering_profile": "strong"}, ProfileCache(tmp_path))
    assert r.eps == 0.5


def test_profile_and_equal_inline_share_the_digest(cache):
    by_name = resolve({"steering_profile": "safety"}, cache)
    inline = resolve({"steering": {"activate": {"3": [40, 12]}, "deactivate": {"5": [7]}}}, cache)
    assert by_name.digest == inline.digest
    assert by_name.label != inline.label


def test_unknown_profile_is_404(cache):
    with pytest.raises(UnknownProfileError) as info:
        resolve({"steering_profile": "nope"}, cache)
    assert info.value.status == 404
    assert info.value.code == "profile_not_found"
    assert str(info.value) == "unknown steering profile 'nope'"
    assert isinstance(info.value, SteeringRequestError)


def test_no_profile_directory_is_404():
    with pytest.raises(UnknownProfileError) as info:
        resolve({"steering_profile": "safety"}, ProfileCache(None))
    assert info.value.status == 404
    assert "no profile directory is configured" in str(info.value)
    assert "STEERMOE_PROFILE_DIR" in str(info.value)


def test_empty_directory_string_means_none():
    assert ProfileCache("").directory is None


@pytest.mark.parametrize(
    "served",
    [
        ModelShape("MixtralForCausalLM", 16, 64, 8),
        ModelShape("OlmoeForCausalLM", 16, 64, 4),
        ModelShape("OlmoeForCausalLM", 16, 64, 8, moe_layers=(0, 1, 2, 4, 5)),
    ],
)
def test_profile_for_another_model_is_409(cache, served):
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering_profile": "safety"}, cache, shape=served)
    assert info.value.status == 409
    assert info.value.code == "profile_model_mismatch"


def test_profile_model_mismatch_message(cache):
    served = ModelShape("MixtralForCausalLM", 32, 8, 2)
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering_profile": "safety"}, cache, shape=served)
    assert str(info.value) == (
        "profile 'safety' is for OlmoeForCausalLM (16 layers, 64 experts, top-8), "
        "but the served model is MixtralForCausalLM (32 layers, 8 experts, top-2)"
    )


@pytest.mark.parametrize("name", ["", "../safety", "a/b", ".hidden", "a b", "x" * 65, "-x"])
def test_invalid_profile_name_is_400(cache, name):
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering_profile": name}, cache)
    assert type(info.value) is SteeringRequestError
    assert info.value.status == 400
    assert str(info.value) == f"invalid steering profile name {name!r}"


def test_name_with_trailing_newline_is_400(cache):
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering_profile": "safety\n"}, cache)
    assert info.value.status == 400


@pytest.mark.parametrize("name", [3, {"name": "safety"}, True, 1.5])
def test_profile_name_must_be_a_string_or_a_list(cache, name):
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering_profile": name}, cache)
    assert info.value.status == 400
    assert str(info.value).startswith("'steering_profile' must be a string")


def test_invalid_profile_file_is_500(tmp_path):
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    write_profile(tmp_path, "renamed")
    (tmp_path / "renamed.json").rename(tmp_path / "other.json")
    cache = ProfileCache(tmp_path)
    for name in ("broken", "other"):
        with pytest.raises(SteeringRequestError) as info:
            resolve({"steering_profile": name}, cache)
        assert info.value.status == 500
        assert info.value.code == "profile_invalid"
        assert str(info.value).startswith(f"steering profile {name!r} cannot be used: {name}.json")


def test_empty_profile_is_refused(tmp_path):
    """Empty steering has one meaning everywhere: refused (never a request the engine sees)."""
    write_profile(tmp_path, "empty", activate={}, deactivate={}, eps=0.5)
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering_profile": "empty"}, ProfileCache(tmp_path))
    assert info.value.status == 500 and "selects no experts" in str(info.value)


# ---- ProfileCache ------------------------------------------------------------------------------


def test_cache_returns_same_object_while_unchanged(cache):
    assert cache.get("safety") is cache.get("safety")


def test_cache_picks_up_an_edited_file(tmp_path):
    path = write_profile(tmp_path, "p", activate={"3": [1]})
    cache = ProfileCache(tmp_path)
    first = resolve({"steering_profile": "p"}, cache)
    assert first.activate == {3: [1]}
    # Same size on purpose: only the modification time tells the change.
    path.write_text(json.dumps(profile_data("p", activate={"3": [2]})), encoding="utf-8")
    bump_mtime(path)
    second = resolve({"steering_profile": "p"}, cache)
    assert second.activate == {3: [2]}
    assert second.digest != first.digest


def test_cache_picks_up_a_size_change(tmp_path):
    path = write_profile(tmp_path, "p", activate={"3": [1]})
    cache = ProfileCache(tmp_path)
    stat = path.stat()
    assert cache.get("p").activate == {3: [1]}
    path.write_text(json.dumps(profile_data("p", activate={"3": [1, 20]})), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, other size
    assert cache.get("p").activate == {3: [1, 20]}


def test_cache_forgets_a_deleted_file(tmp_path):
    path = write_profile(tmp_path, "p")
    cache = ProfileCache(tmp_path)
    assert resolve({"steering_profile": "p"}, cache) is not None
    path.unlink()
    with pytest.raises(UnknownProfileError):
        resolve({"steering_profile": "p"}, cache)
    assert "p" not in cache.store._cache
    write_profile(tmp_path, "p", activate={"2": [9]}, deactivate={})
    assert resolve({"steering_profile": "p"}, cache).activate == {2: [9]}


def test_cache_finds_a_file_added_later(tmp_path):
    cache = ProfileCache(tmp_path)
    with pytest.raises(UnknownProfileError):
        cache.get("late")
    write_profile(tmp_path, "late")
    assert cache.get("late").name == "late"


def test_cache_file_broken_by_an_edit_then_fixed(tmp_path):
    path = write_profile(tmp_path, "p")
    cache = ProfileCache(tmp_path)
    cache.get("p")
    path.write_text("{oops", encoding="utf-8")
    bump_mtime(path)
    with pytest.raises(SteeringRequestError) as info:
        cache.get("p")
    assert info.value.status == 500
    path.write_text(json.dumps(profile_data("p", deactivate={"1": [1]})), encoding="utf-8")
    bump_mtime(path, 10_000_000_000)
    assert cache.get("p").deactivate == {1: [1]}


# ---- inline ------------------------------------------------------------------------------------


def test_inline(cache):
    r = resolve({"steering": {"activate": {"3": [40, 12]}, "deactivate": {"15": [63]}}}, cache)
    assert r.label == "inline"
    assert r.activate == {3: [12, 40]}
    assert r.deactivate == {15: [63]}
    assert r.eps == EPS


def test_inline_eps_overrides_default(cache):
    r = resolve({"steering": {"activate": {"3": [1]}, "eps": 0.25}}, cache)
    assert r.eps == 0.25
    default = resolve({"steering": {"activate": {"3": [1]}}}, cache, eps=0.03)
    assert default.eps == 0.03


def test_digest_follows_effective_eps(cache):
    sets = {"activate": {"3": [1]}}
    implicit = resolve({"steering": sets}, cache, eps=0.01)
    explicit = resolve({"steering": dict(sets, eps=0.01)}, cache, eps=0.5)
    assert implicit.digest == explicit.digest
    assert resolve({"steering": sets}, cache, eps=0.02).digest != implicit.digest


def test_digest_equal_for_equal_and_different_for_different_steering(cache):
    a = resolve({"steering": {"activate": {"3": [1, 2]}}}, cache)
    b = resolve({"steering": {"activate": {3: [2, 1]}}}, cache)
    c = resolve({"steering": {"activate": {"3": [1, 3]}}}, cache)
    d = resolve({"steering": {"deactivate": {"3": [1, 2]}}}, cache)
    assert a.digest == b.digest
    assert len({a.digest, c.digest, d.digest}) == 3


@pytest.mark.parametrize(
    ("inline", "message"),
    [
        ({"activate": {"x": [1]}}, "invalid inline steering: activate: "),
        ({"activate": {"3": [1, 1]}}, "an expert is listed twice"),
        ({"activate": {"3": [1]}, "deactivate": {"3": [1]}}, "both activated and deactivated"),
        ({"activate": {"3": [1]}, "bogus": 1}, "invalid inline steering: bogus: Extra inputs"),
        ({"eps": 0}, "invalid inline steering: eps: "),
        ({"activate": {"16": [1]}}, "invalid inline steering: activate: layer 16 does not exist"),
        ({"deactivate": {"2": [64]}}, "invalid inline steering: deactivate: layer 2 names"),
        ({"activate": {"2": list(range(9))}}, "more than the model's top-k of 8"),
    ],
)
def test_bad_inline_is_400(cache, inline, message):
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering": inline}, cache)
    assert type(info.value) is SteeringRequestError
    assert info.value.status == 400
    assert info.value.code == "invalid_steering"
    assert message in str(info.value)


@pytest.mark.parametrize("inline", [[1], "safety", 3])
def test_inline_must_be_an_object(cache, inline):
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering": inline}, cache)
    assert info.value.status == 400
    assert str(info.value) == "'steering' must be an object (or its JSON text)"


def test_inline_layer_without_moe_block_is_400(cache):
    shape = ModelShape("OlmoeForCausalLM", 16, 64, 8, moe_layers=tuple(range(1, 16)))
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering": {"activate": {"0": [1]}}}, cache, shape=shape)
    assert info.value.status == 400
    assert "decoder layer 0 has no MoE block (MoE layers: 1-15)" in str(info.value)


@pytest.mark.parametrize("inline", [{}, {"activate": {}}, {"activate": {"3": []}}, {"eps": 0.5}])
def test_empty_inline_is_refused(cache, inline):
    with pytest.raises(SteeringRequestError) as info:
        resolve({"steering": inline}, cache)
    assert info.value.status == 400 and "selects no experts" in str(info.value)


# ---- model that cannot be steered --------------------------------------------------------------


@pytest.mark.parametrize(
    "extra_args", [{"steering_profile": "safety"}, {"steering": {"activate": {"3": [1]}}}]
)
def test_model_not_steerable_reason_passes_through(cache, extra_args):
    reason = "this model cannot be steered: router kind 'hash' is not supported"
    with pytest.raises(ModelNotSteerableError) as info:
        resolve(extra_args, cache, reason=reason)
    assert str(info.value) == reason
    assert info.value.status == 400
    assert info.value.code == "model_not_steerable"


def test_reason_is_checked_before_the_profile_exists(cache):
    with pytest.raises(ModelNotSteerableError):
        resolve({"steering_profile": "nope"}, cache, reason="no")


def test_dense_model_is_not_steerable(cache):
    with pytest.raises(ModelNotSteerableError) as info:
        resolve({"steering": {"activate": {"3": [1]}}}, cache, shape=None)
    assert "no Mixture-of-Experts layers" in str(info.value)
    assert info.value.status == 400


# ---- ResolvedSteering wire form ----------------------------------------------------------------


def test_resolved_extra_args_round_trip(cache):
    r = resolve({"steering_profile": "safety"}, cache)
    wire = r.to_extra_args()
    assert wire["activate"] == {"3": [12, 40]}
    assert json.loads(json.dumps(wire)) == wire
    assert ResolvedSteering.from_extra_args(json.loads(json.dumps(wire))) == r


# ---- wants_capture, salted, default_eps --------------------------------------------------------


@pytest.mark.parametrize(
    ("extra_args", "expected"),
    [
        (None, False),
        ({}, False),
        ({"steering_profile": "x"}, False),
        ({"capture_routing": True}, True),
        ({"capture_routing": False}, False),
    ],
)
def test_wants_capture(extra_args, expected):
    assert wants_capture(extra_args) is expected


def test_wants_capture_reads_vllm_xargs_integers():
    assert wants_capture({"capture_routing": 1}) is True
    assert wants_capture({"capture_routing": 0}) is False


@pytest.mark.parametrize("value", [2, -1, "true", None, [True]])
def test_wants_capture_needs_a_bool(value):
    with pytest.raises(SteeringRequestError) as info:
        wants_capture({"capture_routing": value})
    assert info.value.status == 400
    assert str(info.value) == "'capture_routing' must be true or false"


def test_salted():
    assert salted(None, None) is None  # unsteered, no client salt: shares with stock requests
    assert salted(None, "abc").startswith("steermoe:")
    assert salted("my-salt", "abc") != salted("my-salt", "abd")
    assert salted("a", "abc") != salted("b", "abc")
    assert salted(None, "abc") != salted("", "abc")
    assert salted("my-salt", None) != "my-salt"


def test_no_client_salt_reaches_the_salt_of_other_steering():
    """The digest is public: a client salt naming it, or equal to the salted value itself,
    must not give an unsteered request the salt of steered ones."""
    steered = salted(None, "abc")
    for forged in ("|steermoe:abc", "steermoe:abc", steered, f"{steered}", "abc"):
        assert salted(forged, None) != steered
        assert salted(forged, "other") != steered


def test_mark_binds_the_steering_fields():
    key = b"k" * 32
    fields = {"steering_profile": "safety", "capture_routing": 1}
    mark = steering_mark(key, fields)
    check_mark(key, {**fields, "steermoe_auth": mark})
    for forged in ({**fields, "steermoe_auth": "0" * 64},
                   {"steering_profile": "unsafe", "capture_routing": 1, "steermoe_auth": mark},
                   {"steering_profile": "safety", "steermoe_auth": mark},
                   fields,
                   {**fields, "steermoe_auth": steering_mark(b"x" * 32, fields)}):
        with pytest.raises(SteeringRequestError) as info:
            check_mark(key, forged)
        assert info.value.status == 403


def test_default_eps(monkeypatch):
    monkeypatch.delenv(rs.EPS_ENV, raising=False)
    assert default_eps() == rs.DEFAULT_EPS == 0.01
    monkeypatch.setenv(rs.EPS_ENV, "0.5")
    assert default_eps() == 0.5
    monkeypatch.setenv(rs.EPS_ENV, "100")
    assert default_eps() == 100.0


@pytest.mark.parametrize("value", ["0", "-1", "100.5", "nan", "inf"])
def test_default_eps_out_of_range(monkeypatch, value):
    monkeypatch.setenv(rs.EPS_ENV, value)
    with pytest.raises(ValueError, match=r"STEERMOE_EPS must be in \(0, 100\]"):
        default_eps()


def test_default_eps_not_a_number(monkeypatch):
    monkeypatch.setenv(rs.EPS_ENV, "lots")
    with pytest.raises(ValueError):
        default_eps()
