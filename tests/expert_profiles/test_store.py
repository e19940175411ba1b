"""`expert_profiles.store`: atomic writes, names, validation, statistics beside profiles, and
concurrent writers that never expose a partial file."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from expert_profiles.atomic_files import write_atomic
from expert_profiles.directory import ProfileFileError, load_profile_dir, load_profile_file
from expert_profiles.expert_stats import ExpertStats
from expert_profiles.model_shape import ModelShape
from expert_profiles.schema import ProfileMismatchError, SteeringProfile
from expert_profiles.store import (
    InvalidProfileNameError,
    ProfileExistsError,
    ProfileNotFoundError,
    ProfileStore,
)

MODEL = {"architecture": "OlmoeForCausalLM", "num_layers": 16, "num_experts": 64, "top_k": 8}
SHAPE = ModelShape("OlmoeForCausalLM", 16, 64, 8, tuple(range(16)))


def make_profile(name: str, version: int = 0, **extra) -> SteeringProfile:
    data = {"name": name, "model": MODEL, "activate": {"3": [version % 64]},
            "description": f"version {version} " + "x" * (version * 37 % 2000)}
    return SteeringProfile.model_validate({**data, **extra})


def small_stats() -> ExpertStats:
    a1 = np.array([[3, 0], [1, 2]])
    a2 = np.array([[1, 1], [2, 0]])
    return ExpertStats.from_counts([0, 1], a1, a2, 4, 3)


def test_put_get_list_roundtrip(tmp_path):
    store = ProfileStore(tmp_path / "profiles", create=True)
    assert store.list() == []
    path = store.put(make_profile("safety"))
    assert path == tmp_path / "profiles" / "safety.json"
    assert store.list() == ["safety"]
    assert store.exists("safety")
    assert store.get("safety") == make_profile("safety")
    assert load_profile_file(path) == make_profile("safety")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["safety.json"], "temp file left behind"


def test_get_cached_reads_a_file_again_only_when_it_changed(tmp_path):
    store = ProfileStore(tmp_path)
    store.put(make_profile("p", 1))
    first = store.get_cached("p")
    assert first == make_profile("p", 1) and store.get_cached("p") is first
    store.put(make_profile("p", 2), overwrite=True)  # atomic: a new file
    assert store.get_cached("p").activate == {3: [2]}
    store.delete("p")
    with pytest.raises(ProfileNotFoundError):
        store.get_cached("p")
    with pytest.raises(InvalidProfileNameError):
        store.get_cached("../p")


def test_get_cached_takes_a_dangling_link_for_no_profile(tmp_path):
    """What requests see (404), where `get` (tools, start-up) reports the entry as unusable."""
    store = ProfileStore(tmp_path)
    (tmp_path / "gone.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(ProfileNotFoundError):
        store.get_cached("gone")
    with pytest.raises(ProfileFileError):
        store.get("gone")


def test_signature_changes_with_the_profile_files_only(tmp_path):
    store = ProfileStore(tmp_path)
    assert store.signature() == ()
    store.put(make_profile("p", 1))
    first = store.signature()
    assert [entry[0] for entry in first] == ["p.json"]
    store.put_stats("p", small_stats())
    assert store.signature() == first
    store.put(make_profile("p", 2), overwrite=True)
    assert store.signature() != first
    (tmp_path / "gone.json").symlink_to(tmp_path / "nowhere.json")
    assert ("gone.json", -1, -1) in store.signature()


def test_put_refuses_to_overwrite_unless_asked(tmp_path):
    store = ProfileStore(tmp_path)
    store.put(make_profile("p", 1))
    with pytest.raises(ProfileExistsError, match="already exists"):
        store.put(make_profile("p", 2))
    assert store.get("p").activate == {3: [1]}
    store.put(make_profile("p", 2), overwrite=True)
    assert store.get("p").activate == {3: [2]}


def test_put_revalidates_a_mutated_profile(tmp_path):
    profile = make_profile("p")
    profile.activate = {3: list(range(20))}  # more than top-k: assignment is not validated
    with pytest.raises(ValueError, match="more than the model's top-k"):
        ProfileStore(tmp_path).put(profile)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 65, "a b", "/abs",
                                  "..", "name.json/"])
def test_names_are_validated_everywhere(tmp_path, name):
    store = ProfileStore(tmp_path)
    for call in (store.get, store.delete, store.profile_path, store.stats_path, store.exists):
        with pytest.raises(InvalidProfileNameError):
            call(name)


def test_get_missing_and_corrupt(tmp_path):
    store = ProfileStore(tmp_path)
    with pytest.raises(ProfileNotFoundError, match="no profile 'nope'"):
        store.get("nope")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileFileError, match="bad.json: not valid JSON"):
        store.get("bad")


def test_delete_removes_profile_stats_and_heatmap(tmp_path):
    store = ProfileStore(tmp_path)
    store.put(make_profile("p"))
    store.put_stats("p", small_stats())
    store.heatmap_path("p").write_bytes(b"png")
    store.put(make_profile("other"))
    removed = store.delete("p")
    assert sorted(p.name for p in removed) == ["p.heatmap.png", "p.json", "p.stats.csv"]
    assert store.list() == ["other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]
    with pytest.raises(ProfileNotFoundError):
        store.delete("p")


def test_stats_are_stored_beside_and_not_loaded_as_profiles(tmp_path, caplog):
    store = ProfileStore(tmp_path)
    store.put(make_profile("p"))
    store.put_stats("p", small_stats())
    assert store.stats_path("p").name == "p.stats.csv"
    assert store.get_stats("p") == small_stats()
    assert store.get_stats("other") is None
    with caplog.at_level(logging.ERROR):
        loaded = load_profile_dir(tmp_path)
    assert list(loaded.profiles) == ["p"] and loaded.errors == {}
    assert not caplog.records


def test_validate_all_reports_corrupt_and_mismatched_files(tmp_path, caplog):
    store = ProfileStore(tmp_path)
    store.put(make_profile("good"))
    other = {**MODEL, "num_layers": 24}
    store.put(SteeringProfile.model_validate({"name": "other", "model": other,
                                              "activate": {"1": [1]}}))
    (tmp_path / "broken.json").write_text('{"format": "steermoe-profile/1", "na')
    (tmp_path / "renamed.json").write_text(make_profile("elsewhere").to_json())
    with caplog.at_level(logging.ERROR):
        ok, errors = store.validate_all()
    assert sorted(ok) == ["good", "other"]
    assert sorted(errors) == ["broken.json", "renamed.json"]
    assert "not valid JSON" in errors["broken.json"]
    assert "the file must be elsewhere.json" in errors["renamed.json"]
    assert any("broken.json" in r.getMessage() for r in caplog.records)

    ok, errors = store.validate_all(SHAPE)
    assert sorted(ok) == ["good"]
    assert "24 layers" in errors["other.json"]
    assert store.check("good", SHAPE).name == "good"
    with pytest.raises(ProfileMismatchError):
        store.check("other", SHAPE)


def test_same_size_rewrite_is_visible_to_mtime_size_caches(tmp_path):
    path = tmp_path / "p.json"
    write_atomic(path, b"AAAA")
    before = path.stat()
    write_atomic(path, b"BBBB")
    after = path.stat()
    assert (before.st_mtime_ns, before.st_size) != (after.st_mtime_ns, after.st_size)
    assert path.read_bytes() == b"BBBB"


def test_exclusive_create_has_one_winner(tmp_path):
    store = ProfileStore(tmp_path)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def create(version: int) -> None:
        barrier.wait()
        try:
            store.put(make_profile("race", version))
            results.append(f"won {version}")
        except ProfileExistsError:
            results.append("lost")

    threads = [threading.Thread(target=create, args=(v,)) for v in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.startswith("won") for r in results) == 1
    winner = int(next(r for r in results if r.startswith("won")).split()[1])
    assert store.get("race").activate == {3: [winner]}
    assert [p.name for p in tmp_path.iterdir()] == ["race.json"]


# ---- concurrent writers and a reader ---------------------------------------------------------


def _write_versions(directory: str, first: int, count: int) -> None:
    store = ProfileStore(directory)
    for version in range(first, first + count):
        store.put(make_profile("shared", version), overwrite=True)


def _read_until(path: Path, stop: threading.Event, seen: list[int], problems: list[str]) -> None:
    while not stop.is_set():
        try:
            text = path.read_text()
        except FileNotFoundError:
            problems.append("the profile vanished during a rewrite")
            continue
        try:
            data = json.loads(text)
            profile = SteeringProfile.model_validate(data)
        except Exception as exc:  # any parse failure is a partial file
            problems.append(f"partial or invalid file: {exc!r} ({len(text)} chars)")
            continue
        version = int(profile.description.split()[1])
        if profile.activate != {3: [version % 64]}:
            problems.append(f"mixed content in version {version}")
        seen.append(version)


def test_concurrent_threads_and_processes_never_expose_a_partial_profile(tmp_path):
    store = ProfileStore(tmp_path)
    store.put(make_profile("shared", 0))
    stop = threading.Event()
    seen: list[int] = []
    problems: list[str] = []
    reader = threading.Thread(target=_read_until,
                              args=(store.profile_path("shared"), stop, seen, problems))
    reader.start()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_versions, args=(str(tmp_path), 1000 * (i + 1), 60))
                 for i in range(2)]
    threads = [threading.Thread(target=_write_versions, args=(str(tmp_path), 100 * (i + 1), 60))
               for i in range(3)]
    try:
        for worker in [*processes, *threads]:
            worker.start()
        for thread in threads:
            thread.join()
        for process in processes:
            process.join(timeout=120)
            assert process.exitcode == 0
    finally:
        stop.set()
        reader.join()
    assert not problems, problems[:5]
    assert len(seen) > 10
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "shared.json"]
    assert leftovers == [], "temporary files left behind"
    final = store.get("shared")
    assert int(final.description.split()[1]) in (
        set(range(100, 160)) | set(range(200, 260)) | set(range(300, 360))
        | set(range(1000, 1060)) | set(range(2000, 2060))
    )
    assert os.listdir(tmp_path) == ["shared.json"]


# ---- empty profiles, unusual entries, and messages without paths -----------------------------


def test_put_refuses_a_profile_emptied_after_validation(tmp_path):
    profile = make_profile("p")
    profile.activate = {}  # assignment is not validated
    with pytest.raises(ValueError, match="steering selects no experts"):
        ProfileStore(tmp_path).put(profile)
    assert not (tmp_path / "p.json").exists()


def test_store_errors_name_no_path(tmp_path):
    store = ProfileStore(tmp_path)
    store.put(make_profile("p"))
    errors = []
    for call in (lambda: store.get("nope"), lambda: store.delete("nope"),
                 lambda: store.put(make_profile("p"))):
        with pytest.raises((ProfileNotFoundError, ProfileExistsError)) as info:
            call()
        errors.append(info.value)
    assert [str(e) for e in errors] == [
        "no profile 'nope' in the profile directory",
        "no profile 'nope' in the profile directory",
        "profile 'p' already exists (overwrite it explicitly)",
    ]
    assert all(e.directory == tmp_path for e in errors)
    assert [e.name for e in errors] == ["nope", "nope", "p"]


def test_write_atomic_exclusive_error_names_the_file_only(tmp_path):
    write_atomic(tmp_path / "x.json", b"1")
    with pytest.raises(FileExistsError) as info:
        write_atomic(tmp_path / "x.json", b"2", overwrite=False)
    assert str(info.value) == "x.json already exists"


def _unusual_entries(tmp_path: Path) -> list[str]:
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere")
    (tmp_path / "huge.json").write_bytes(b" " * (2 << 20))
    (tmp_path / "deep.json").write_text("[" * 100000)
    names = ["dangling", "deep", "dir", "fifo", "huge"]
    if os.path.exists("/dev/zero"):
        (tmp_path / "zero.json").symlink_to("/dev/zero")
        names.append("zero")
    return names


def _run_with_deadline(fn, seconds: float = 10.0):
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test
            outcome["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for over {seconds} s"
    return outcome["value"], time.monotonic() - started


@pytest.mark.timeout(60)
def test_listing_and_validate_all_skip_unusual_entries_without_blocking(tmp_path):
    store = ProfileStore(tmp_path)
    store.put(make_profile("good"))
    names = _unusual_entries(tmp_path)
    assert store.list() == sorted([*names, "good"])
    (ok, errors), took = _run_with_deadline(lambda: store.validate_all(SHAPE))
    assert list(ok) == ["good"] and took < 10
    assert sorted(errors) == [f"{name}.json" for name in sorted(names)]
    for name, message in errors.items():
        assert message.startswith(f"{name}: ") and str(tmp_path) not in message, message
    assert errors["fifo.json"] == "fifo.json: cannot read: not a regular file (a FIFO)"


@pytest.mark.timeout(60)
def test_get_reports_an_unusable_entry_and_delete_removes_it(tmp_path):
    store = ProfileStore(tmp_path)
    names = _unusual_entries(tmp_path)
    for name in names:
        error, _ = _run_with_deadline(lambda name=name: store.get(name))
        assert isinstance(error, ProfileFileError), (name, error)
        assert str(tmp_path) not in str(error)
        error, _ = _run_with_deadline(lambda name=name: store.get_cached(name))
        expected = ProfileNotFoundError if name == "dangling" else ProfileFileError
        assert isinstance(error, expected), (name, error)
        assert str(tmp_path) not in str(error)
    for name in names:
        if name == "dir":
            with pytest.raises(ProfileNotFoundError):
                store.delete(name)
        else:
            assert store.delete(name) == [tmp_path / f"{name}.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json"]


def test_delete_removes_a_symlink_not_its_target(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ProfileStore(elsewhere).put(make_profile("p"))
    store = ProfileStore(tmp_path / "profiles", create=True)
    store.profile_path("p").symlink_to(elsewhere / "p.json")
    assert store.get("p") == make_profile("p")
    store.delete("p")
    assert not store.profile_path("p").is_symlink()
    assert (elsewhere / "p.json").is_file()
