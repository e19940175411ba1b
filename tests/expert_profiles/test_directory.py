"""`expert_profiles.directory`: loading a directory of NAME.json profile files."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from expert_profiles import directory as directory_module
from expert_profiles.directory import (
    MAX_PROFILE_BYTES,
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


# ---- empty profiles ----------------------------------------------------------------------------


@pytest.mark.parametrize("sets", [{"activate": {}, "deactivate": {}},
                                  {"activate": {"3": []}, "deactivate": {"5": []}},
                                  {"activate": None, "deactivate": None}])
def test_a_profile_file_that_selects_no_expert_is_refused(tmp_path, sets):
    path = write(tmp_path, "empty.json", profile_data("empty", **sets))
    with pytest.raises(ProfileFileError) as info:
        load_profile_file(path)
    assert str(info.value) == (
        "empty.json: profile: steering selects no experts: give at least one expert to "
        "activate, deactivate or bias"
    )
    assert list(load_profile_dir(tmp_path).errors) == ["empty.json"]


def test_a_profile_file_with_one_kind_of_set_is_accepted(tmp_path):
    write(tmp_path, "on.json", profile_data("on", deactivate={}))
    write(tmp_path, "off.json", profile_data("off", activate={}))
    result = load_profile_dir(tmp_path)
    assert result.errors == {}
    assert result.profiles["on"].deactivate == {} and result.profiles["off"].activate == {}


# ---- only regular files, never blocking --------------------------------------------------------


def call_with_deadline(fn, *args, seconds: float = 5.0, fifo: Path | None = None):
    """(result or exception, seconds taken) of fn(*args) in a thread; fails the test if the
    call has not returned within `seconds` (a FIFO it waits on is then opened to free it)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the test
            outcome["value"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:  # a blocked open(O_RDONLY) returns once a writer appears
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(writer)
        thread.join(seconds)
        pytest.fail(f"{getattr(fn, '__name__', fn)} blocked for over {seconds} s")
    return outcome["value"], time.monotonic() - started


@pytest.mark.timeout(30)
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    error, _ = call_with_deadline(load_profile_file, fifo, fifo=fifo)
    assert isinstance(error, ProfileFileError)
    assert str(error) == "fifo.json: cannot read: not a regular file (a FIFO)"


@pytest.mark.timeout(30)
def test_a_fifo_with_a_writer_is_refused_too(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer open
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, json.dumps(profile_data("fifo")).encode())
        error, _ = call_with_deadline(load_profile_file, fifo, fifo=fifo)
    finally:
        os.close(writer)
        os.close(reader)
    assert str(error) == "fifo.json: cannot read: not a regular file (a FIFO)"


@pytest.mark.timeout(30)
def test_the_directory_scan_skips_a_fifo(tmp_path):
    write(tmp_path, "good.json", profile_data("good"))
    os.mkfifo(tmp_path / "fifo.json")
    result, _ = call_with_deadline(load_profile_dir, tmp_path, fifo=tmp_path / "fifo.json")
    assert list(result.profiles) == ["good"]
    assert result.errors == {"fifo.json": "fifo.json: cannot read: not a regular file (a FIFO)"}


@pytest.mark.timeout(30)
def test_a_symlink_to_dev_zero_is_refused(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    error, _ = call_with_deadline(load_profile_file, link)
    assert str(error) == "zero.json: cannot read: not a regular file (a character device)"
    assert load_profile_dir(tmp_path).errors == {"zero.json": str(error)}


def test_a_directory_or_a_symlink_to_one_is_refused(tmp_path):
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "dir.json")
    for name in ("dir.json", "link.json"):
        with pytest.raises(ProfileFileError) as info:
            load_profile_file(tmp_path / name)
        assert str(info.value) == f"{name}: cannot read: not a regular file (a directory)"
    result = load_profile_dir(tmp_path)
    assert sorted(result.errors) == ["dir.json", "link.json"] and result.profiles == {}


def test_a_symlink_to_a_regular_profile_file_is_followed(tmp_path):
    # Symlinks are followed (a ConfigMap mount is made of them); the checks apply to the
    # target, and the profile's name must match the link's name.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = write(elsewhere, "stored-under-another-name.json", profile_data("linked"))
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "linked.json").symlink_to(target)
    assert load_profile_file(profiles / "linked.json").name == "linked"
    assert list(load_profile_dir(profiles).profiles) == ["linked"]


def test_dangling_and_looping_symlinks_are_refused(tmp_path):
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    (tmp_path / "loop.json").symlink_to(tmp_path / "loop.json")
    with pytest.raises(ProfileFileError) as info:
        load_profile_file(tmp_path / "dangling.json")
    assert str(info.value) == "dangling.json: cannot read: No such file or directory"
    with pytest.raises(ProfileFileError) as info:
        load_profile_file(tmp_path / "loop.json")
    assert str(info.value) == "loop.json: cannot read: Too many levels of symbolic links"
    assert sorted(load_profile_dir(tmp_path).errors) == ["dangling.json", "loop.json"]


# ---- size and parsing limits -------------------------------------------------------------------


def padded(name: str, size: int) -> bytes:
    """A valid profile of exactly `size` bytes (JSON whitespace after the object)."""
    data = json.dumps(profile_data(name)).encode()
    return data + b" " * (size - len(data))


def test_a_file_of_the_largest_size_is_read(tmp_path):
    path = tmp_path / "big.json"
    path.write_bytes(padded("big", MAX_PROFILE_BYTES))
    assert load_profile_file(path).name == "big"


def test_an_oversize_file_is_refused(tmp_path):
    path = tmp_path / "huge.json"
    path.write_bytes(padded("huge", MAX_PROFILE_BYTES + 1))
    with pytest.raises(ProfileFileError) as info:
        load_profile_file(path)
    assert str(info.value) == (
        f"huge.json: too large: a profile file may hold at most {MAX_PROFILE_BYTES} bytes"
    )
    assert MAX_PROFILE_BYTES == 1024 * 1024
    assert list(load_profile_dir(tmp_path).errors) == ["huge.json"]


def test_a_file_that_grows_after_fstat_is_read_only_up_to_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "grows.json"
    path.write_bytes(padded("grows", 3 * MAX_PROFILE_BYTES))
    real_fstat, real_read = os.fstat, os.read
    read_bytes = []

    class SmallStat:
        def __init__(self, result):
            self.st_mode, self.st_size = result.st_mode, 10

    def fstat(fd):
        return SmallStat(real_fstat(fd))

    def read(fd, n):
        chunk = real_read(fd, n)
        read_bytes.append(len(chunk))
        return chunk

    monkeypatch.setattr(directory_module.os, "fstat", fstat)
    monkeypatch.setattr(directory_module.os, "read", read)
    with pytest.raises(ProfileFileError, match=r"^grows\.json: too large: "):
        load_profile_file(path)
    assert sum(read_bytes) == MAX_PROFILE_BYTES + 1


def test_deep_nesting_is_a_profile_file_error(tmp_path):
    path = write(tmp_path, "deep.json", "[" * 100000)
    with pytest.raises(ProfileFileError) as info:
        load_profile_file(path)
    assert str(info.value) == "deep.json: not valid JSON: nested too deeply"
    write(tmp_path, "deep2.json", '{"a": ' * 100000)
    assert sorted(load_profile_dir(tmp_path).errors) == ["deep.json", "deep2.json"]


def test_an_integer_of_thousands_of_digits_is_a_profile_file_error(tmp_path):
    text = json.dumps(profile_data("digits"))[:-1] + ', "eps": ' + "7" * 5000 + "}"
    path = write(tmp_path, "digits.json", text)
    with pytest.raises(ProfileFileError) as info:
        load_profile_file(path)
    assert str(info.value) == "digits.json: not valid JSON: a number has too many digits"
    assert list(load_profile_dir(tmp_path).errors) == ["digits.json"]


# ---- messages name the file, never its directory -----------------------------------------------


def _entries(tmp_path: Path) -> dict[str, str]:
    """File name -> the start of its error, for one of each kind of bad entry."""
    write(tmp_path, "broken.json", "{")
    write(tmp_path, "schema.json", profile_data("schema", activate={"99": [1]}))
    write(tmp_path, "wrong.json", profile_data("right"))
    write(tmp_path, "empty.json", profile_data("empty", activate={}, deactivate={}))
    write(tmp_path, "deep.json", "[" * 100000)
    write(tmp_path, "digits.json", "1" * 5000)
    (tmp_path / "latin.json").write_bytes(b'{"name": "\xe9"}')
    (tmp_path / "huge.json").write_bytes(padded("huge", MAX_PROFILE_BYTES + 1))
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop.json").symlink_to(tmp_path / "loop.json")
    (tmp_path / "dirlink.json").symlink_to(tmp_path)
    entries = {
        "broken.json": "not valid JSON", "schema.json": "profile: Value error, activate: layer 99",
        "wrong.json": "the profile is named", "empty.json": "profile: steering selects",
        "deep.json": "not valid JSON", "digits.json": "not valid JSON",
        "latin.json": "cannot read", "huge.json": "too large", "fifo.json": "cannot read",
        "dir.json": "cannot read", "dangling.json": "cannot read", "loop.json": "cannot read",
        "dirlink.json": "cannot read",
    }
    if os.path.exists("/dev/zero"):
        (tmp_path / "zero.json").symlink_to("/dev/zero")
        entries["zero.json"] = "cannot read"
    if os.geteuid() != 0:  # root reads files whatever their mode
        write(tmp_path, "locked.json", profile_data("locked")).chmod(0)
        entries["locked.json"] = "cannot read: Permission denied"
    return entries


@pytest.mark.timeout(60)
def test_no_message_names_a_path_or_an_os_detail(tmp_path):
    entries = _entries(tmp_path)
    messages = {}
    for name in [*entries, "missing.json"]:
        try:
            load_profile_file(tmp_path / name)
        except ProfileFileError as exc:
            messages[name] = str(exc)
        else:
            pytest.fail(f"{name} was accepted")
    result, _ = call_with_deadline(load_profile_dir, tmp_path, fifo=tmp_path / "fifo.json")
    assert result.profiles == {} and sorted(result.errors) == sorted(entries)
    assert result.errors == {name: messages[name] for name in entries}
    for name, message in messages.items():
        assert message.startswith(f"{name}: {entries.get(name, 'cannot read')}"), message
        assert str(tmp_path) not in message
        assert "/" not in message and "Errno" not in message, message
        assert "set_int_max_str_digits" not in message and len(message) < 300, message


def test_the_full_detail_goes_to_the_log(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="expert_profiles.directory"), \
            pytest.raises(ProfileFileError):
        load_profile_file(tmp_path / "gone.json")
    assert any(str(tmp_path / "gone.json") in r.getMessage() for r in caplog.records)


def test_an_os_error_is_reported_by_its_reason_not_its_text(tmp_path, monkeypatch):
    path = write(tmp_path, "locked.json", profile_data("locked"))

    def refuse(file, flags, *args):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(directory_module.os, "open", refuse)
    with pytest.raises(ProfileFileError) as info:
        load_profile_file(path)
    assert str(info.value) == "locked.json: cannot read: Permission denied"


def test_hidden_json_files_are_not_profiles(tmp_path):
    (tmp_path / ".prepared.json").write_text('{"model": {}}')
    loaded = load_profile_dir(tmp_path)
    assert not loaded.errors and not loaded.profiles
