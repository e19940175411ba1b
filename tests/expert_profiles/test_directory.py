"""`expert_profiles.directory`: loading a directory of NAME.json profile files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from expert_profiles.directory import (
    ProfileDirectory,
    ProfileFileError,
    load_profile_dir,
    load_profile_file,
)
from expert_profiles.schema import SteeringProfile

MODEL = {"architecture": "OlmoeForCausalLM", "num_layers": 16, "num_experts": 64, "top_k": 8}


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


def write(directory: Path, filename: str, content) -> Path:
    path = directory / filename
    text = content if isinstance(content, str) else json.dumps(content)
    path.write_text(text, encoding="utf-8")
    return path


# ---- load_profile_file -----------------------------------------------------------------------


def test_load_good_file(tmp_path):
    path = write(tmp_path, "safety.json", profile_data("safety", eps=0.05))
    profile = load_profile_file(path)
    assert isinstance(profile, SteeringProfile)
    assert profile.name == "safety"
    assert profile.activate == {3: [12, 40]}
    assert profile.eps == 0.05
    assert load_profile_file(str(path)) == profile


def test_load_written_by_to_json(tmp_path):
    profile = SteeringProfile.model_validate(profile_data("p1", tags=["x"]))
    path = write(tmp_path, "p1.json", profile.to_json())
    assert load_profile_file(path) == profile


def test_bad_json(tmp_path):
    path = write(tmp_path, "broken.json", '{"name": "broken",')
    with pytest.raises(ProfileFileError, match=r"^broken\.json: not valid JSON: "):
        load_profile_file(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'{"name": "\xe9"}')
    with pytest.raises(ProfileFileError, match=r"^latin\.json: cannot read: "):
        load_profile_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(ProfileFileError, match=r"^gone\.json: cannot read: "):
        load_profile_file(tmp_path / "gone.json")


def test_bad_schema_names_the_field(tmp_path):
    data = profile_data("bad", deactivate={"5": [70]})
    path = write(tmp_path, "bad.json", data)
    with pytest.raises(ProfileFileError) as info:
        load_profile_file(path)
    message = str(info.value)
    assert message.startswith("bad.json: ")
    assert "deactivate: layer 5 names experts [70]" in message


def test_bad_schema_lists_every_problem_with_its_location(tmp_path):
    data = profile_data("bad", eps=0, extra=1)
    data["model"]["top_k"] = 0
    path = write(tmp_path, "bad.json", data)
    with pytest.raises(ProfileFileError) as info:
        load_profile_file(path)
    message = str(info.value)
    assert "model.top_k: " in message
    assert "eps: " in message
    assert "extra: Extra inputs are not permitted" in message
    assert message.count(";") >= 2


def test_json_that_is_not_an_object(tmp_path):
    path = write(tmp_path, "list.json", [1, 2])
    with pytest.raises(ProfileFileError, match=r"^list\.json: profile: "):
        load_profile_file(path)


def test_name_must_match_file_name(tmp_path):
    path = write(tmp_path, "a.json", profile_data("b"))
    with pytest.raises(ProfileFileError) as info:
        load_profile_file(path)
    assert str(info.value) == "a.json: the profile is named 'b'; the file must be b.json"


# ---- load_profile_dir ------------------------------------------------------------------------


def test_directory_good_and_bad_files(tmp_path, caplog):
    write(tmp_path, "safety.json", profile_data("safety"))
    write(tmp_path, "math.json", profile_data("math", activate={"1": [2]}, deactivate={}))
    write(tmp_path, "broken.json", "not json")
    write(tmp_path, "schema.json", profile_data("schema", activate={"99": [1]}))
    write(tmp_path, "wrong.json", profile_data("right"))
    write(tmp_path, "notes.txt", "not a profile")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "nested.json", profile_data("nested"))

    with caplog.at_level(logging.ERROR, logger="expert_profiles.directory"):
        result = load_profile_dir(tmp_path)

    assert isinstance(result, ProfileDirectory)
    assert sorted(result.profiles) == ["math", "safety"]
    assert result.profiles["math"].activate == {1: [2]}
    assert sorted(result.errors) == ["broken.json", "schema.json", "wrong.json"]
    assert result.errors["broken.json"].startswith("broken.json: not valid JSON")
    assert "activate: layer 99 does not exist" in result.errors["schema.json"]
    assert "the profile is named 'right'" in result.errors["wrong.json"]
    assert sum("skipping profile file" in r.getMessage() for r in caplog.records) == 3


def test_directory_accepts_str(tmp_path):
    write(tmp_path, "a.json", profile_data("a"))
    assert list(load_profile_dir(str(tmp_path)).profiles) == ["a"]


def test_empty_directory(tmp_path):
    result = load_profile_dir(tmp_path)
    assert result.profiles == {} and result.errors == {}


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    result = load_profile_dir(missing)
    assert result.profiles == {}
    assert result.errors == {str(missing): "profile directory does not exist"}


def test_a_file_is_not_a_directory(tmp_path):
    path = write(tmp_path, "a.json", profile_data("a"))
    result = load_profile_dir(path)
    assert result.profiles == {}
    assert result.errors == {str(path): "profile directory does not exist"}


def test_separate_results_do_not_share_state(tmp_path):
    first = load_profile_dir(tmp_path / "nope")
    second = load_profile_dir(tmp_path)
    assert second.errors == {} and first.errors != {}
