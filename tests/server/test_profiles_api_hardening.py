"""`ProfilesAPI` against hostile input (no server, no engine): routing, bounded metric labels,
clipped echoes, PUT bodies that are not plain JSON, and answers that name no filesystem path."""

from __future__ import annotations

import json
import shutil

import pytest
from prometheus_client import REGISTRY

from expert_profiles.model_shape import ModelShape
from server.config import ServerConfig
from server.context import SteeringContext
from server.errors import SteeringHTTPError
from server.metrics import ADMIN_OPERATIONS, status_label, steering_metrics
from server.profiles_api import (
    ENDPOINTS,
    PROFILES,
    RELOAD,
    ROUTER,
    ProfilesAPI,
    parse_json_body,
    without_paths,
)
from tests.server.server_process import write_profile

MODEL = {"architecture": "Qwen3MoeForCausalLM", "num_layers": 4, "num_experts": 8, "top_k": 2}
SHAPE = ModelShape("Qwen3MoeForCausalLM", 4, 8, 2, (0, 1, 2, 3))
TOKEN = "admin-secret"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
HUGE = "a" * 200_000


class ServedModel:
    eps = 0.01

    def served_shape(self) -> tuple[ModelShape | None, str | None]:
        return SHAPE, None


@pytest.fixture
def profiles(tmp_path):
    directory = tmp_path / "profiles"
    directory.mkdir()
    write_profile(directory, "safety", MODEL, {1: [5]})
    write_profile(directory, "concise", MODEL, {1: [2]})
    return directory


@pytest.fixture
def api(profiles) -> ProfilesAPI:
    config = ServerConfig(profiles_dir=str(profiles), base_names=("m",),
                          endpoints={"m-safe": "safety"})
    return ProfilesAPI(SteeringContext(config, TOKEN, served_model=ServedModel))


def refusal(api: ProfilesAPI, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None) -> SteeringHTTPError:
    with pytest.raises(SteeringHTTPError) as caught:
        api.handle(method, path, ADMIN if headers is None else headers, body, [])
    error = caught.value
    assert len(error.message) < 300, error.message
    assert all(" " <= ch <= "~" for ch in error.message), error.message
    return error


def put_body(api: ProfilesAPI, name: str, body: bytes) -> SteeringHTTPError:
    return refusal(api, "PUT", f"{PROFILES}/{name}", body)


# ---- routing and operation labels ---------------------------------------------------------

ODD_METHODS = ["HEAD", "OPTIONS", "PATCH", "PROPFIND", "TRACE", "CONNECT", "get", "Get", "",
               "X" * 10_000, "G\x00ET", "GET ", "ĞET", "M-SEARCH", "POST\r\nX: y"]


@pytest.mark.parametrize(("method", "path", "operation"), [
    ("GET", PROFILES, "list"),
    ("GET", f"{PROFILES}/safety", "get"),
    ("PUT", f"{PROFILES}/new.one_2", "put"),
    ("DELETE", f"{PROFILES}/safety", "delete"),
    ("POST", RELOAD, "reload"),
    ("GET", ENDPOINTS, "endpoints"),
    ("POST", PROFILES, "other"),
    ("GET", RELOAD, "other"),
    ("HEAD", PROFILES, "other"),
    ("HEAD", f"{PROFILES}/safety", "other"),
    ("OPTIONS", ENDPOINTS, "other"),
    ("PATCH", f"{PROFILES}/safety", "other"),
    ("PROPFIND", f"{PROFILES}/safety", "other"),
    ("GET", "/v1/steering", "other"),
    ("GET", "/v1/steering/nothing", "other"),
    ("GET", f"{PROFILES}:other", "other"),
    ("POST", f"{RELOAD}/x", "other"),
    ("GET", f"{PROFILES}/a/b", "other"),
    ("GET", f"{PROFILES}/..", "other"),
    ("DELETE", f"{PROFILES}/{HUGE}", "other"),
    ("GET", f"{PROFILES}/nul\x00", "other"),
    ("GET", f"{PROFILES}/ünicode", "other"),
])
def test_operation_of(method, path, operation):
    assert ProfilesAPI.operation_of(method, path) == operation


@pytest.mark.parametrize("method", ODD_METHODS)
@pytest.mark.parametrize("path", [PROFILES, f"{PROFILES}/safety", RELOAD, ENDPOINTS,
                                  "/v1/steering/x", f"{PROFILES}/{HUGE}"])
def test_any_method_and_path_map_to_a_fixed_label(api, method, path):
    assert api.operation_of(method, path) in ADMIN_OPERATIONS
    assert api.operation_of(method, path) == "other"


def test_unknown_paths_are_404_with_the_path_clipped(api):
    for path in ("/v1/steering", "/v1/steering/nothing", f"{PROFILES}:other",
                 f"/v1/steering/{HUGE}", "/v1/steering/\x00\u202e"):
        error = refusal(api, "GET", path)
        assert error.status == 404 and "no such steering API path" in error.message


@pytest.mark.parametrize(("path", "allow"), [
    (PROFILES, "GET"), (ENDPOINTS, "GET"), (RELOAD, "POST"),
    (f"{PROFILES}/safety", "GET, PUT, DELETE"),
])
@pytest.mark.parametrize("method", ODD_METHODS)
def test_other_methods_are_405_with_allow(api, path, allow, method):
    error = refusal(api, method, path)
    assert error.status == 405 and error.headers == {"allow": allow}


def test_head_is_refused_like_any_other_method(api):
    error = refusal(api, "HEAD", f"{PROFILES}/safety")
    assert error.status == 405 and error.headers["allow"] == "GET, PUT, DELETE"
    assert error.message == "method 'HEAD' is not allowed here; use GET or PUT or DELETE"


def test_the_routes_are_the_documented_paths_and_methods():
    routes = {(route.path, method, route.name) for route in ROUTER.routes
              for method in route.methods}
    name = f"{PROFILES}/{{name:path}}"
    assert routes == {(PROFILES, "GET", "list"), (RELOAD, "POST", "reload"),
                      (ENDPOINTS, "GET", "endpoints"), (name, "GET", "get"),
                      (name, "PUT", "put"), (name, "DELETE", "delete")}


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", f"{PROFILES}\n", 404), ("GET", f"{ENDPOINTS}\n", 404), ("POST", f"{RELOAD}\n", 404),
    ("GET", f"{PROFILES}/safety\n", 400), ("DELETE", f"{PROFILES}/safety\r\n", 400),
])
def test_a_trailing_newline_is_part_of_the_path(api, method, path, status):
    assert refusal(api, method, path).status == status
    assert api.operation_of(method, path) == "other"


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "a/../../etc/passwd", "nul\x00",
                                  "ünicode", "a b", "a\nb", "-dash", "x" * 65, HUGE,
                                  "%2e%2e", "a%2Fb", "a\\b"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PROPFIND"])
def test_bad_names_in_the_path_are_400_before_anything_else(api, profiles, name, method):
    error = refusal(api, method, f"{PROFILES}/{name}", b"{}", headers={})  # no token either
    assert error.status == 400 and "invalid steering profile name" in error.message
    assert "\x00" not in error.message and "\n" not in error.message
    assert sorted(p.name for p in profiles.iterdir()) == ["concise.json", "safety.json"]


def test_a_200_kb_name_gives_a_short_message(api):
    error = refusal(api, "GET", f"{PROFILES}/{HUGE}")
    assert len(error.message) < 300 and error.message.count("a") < 120


# ---- metric labels ------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "label"), [
    (100, "100"), (200, "200"), (404, "404"), (599, "599"), (99, "other"), (600, "other"),
    (0, "other"), (-200, "other"), (10**30, "other"), (True, "other"), ("200", "other"),
    (None, "other"), (200.0, "other"),
])
def test_status_label(status, label):
    assert status_label(status) == label


def test_admin_operations_counter_only_gets_bounded_labels():
    metrics = steering_metrics()

    def value(operation: str, status: str) -> float:
        return REGISTRY.get_sample_value("steermoe:admin_operations_total",
                                         {"operation": operation, "status": status}) or 0.0

    before = value("other", "other"), value("put", "201")
    metrics.observe_admin_operation("PROPFIND", 999)
    metrics.observe_admin_operation("X" * 1000, -1)
    metrics.observe_admin_operation("put", 201)
    assert value("other", "other") == before[0] + 2
    assert value("put", "201") == before[1] + 1
    operations = {sample.labels["operation"]
                  for family in REGISTRY.collect() if family.name == "steermoe:admin_operations"
                  for sample in family.samples}
    assert operations <= set(ADMIN_OPERATIONS)


# ---- PUT bodies ---------------------------------------------------------------------------


def profile_body(**extra) -> dict:
    return {"model": MODEL, "activate": {"1": [3]}, **extra}


@pytest.mark.parametrize(("body", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
    (b"[" * 500 + b"]" * 500, "nests more than"),
    (json.dumps(profile_body(source={"n": int("9" * 4000)}))[:-1].encode()
     + b', "x": ' + b"7" * 5000 + b"}", "too many digits"),
    (b"1" * 5000, "too many digits"),
    (b'{"model": NaN}', "NaN is not a JSON number"),
    (b'{"eps": Infinity}', "Infinity is not a JSON number"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"{\"name\": \"" + b"q" * 200_000, "not valid JSON"),
])
def test_put_bodies_that_are_not_plain_json_are_400(api, body, reason):
    error = put_body(api, "fresh", body)
    assert error.status == 400 and reason in error.message
    assert "7777777777" not in error.message and "qqqqqqqqqq" not in error.message


def test_parse_json_body_limits_depth_but_takes_real_profiles():
    deep_source = {"source": {"a": {"b": {"c": [[[1]]]}}}}
    assert parse_json_body(json.dumps(profile_body(**deep_source)).encode())["source"]
    with pytest.raises(SteeringHTTPError, match="nests more than"):
        parse_json_body(b"[" * 41 + b"]" * 41)


def test_put_body_name_is_clipped(api):
    error = put_body(api, "fresh", json.dumps(profile_body(name=HUGE + "\x00\u202e")).encode())
    assert error.status == 400 and error.param == "name"
    assert "the path names 'fresh'" in error.message


def test_validation_problems_are_clipped(api):
    body = profile_body(activate={HUGE: [1]}, model={**MODEL, HUGE: 1})
    error = put_body(api, "fresh", json.dumps(body).encode())
    assert error.status == 400 and error.message.startswith("invalid steering profile:")


def test_mismatch_message_is_clipped(api):
    body = profile_body(model={**MODEL, "architecture": "Arch" + HUGE})
    error = put_body(api, "fresh", json.dumps(body).encode())
    assert error.status == 409


@pytest.mark.parametrize("sets", [{}, {"activate": {}}, {"activate": {"1": []}},
                                  {"activate": {}, "deactivate": {"2": []}}])
def test_put_of_a_profile_that_selects_no_experts_is_400(api, profiles, sets):
    error = put_body(api, "empty", json.dumps({"model": MODEL, **sets}).encode())
    assert error.status == 400 and "no experts" in error.message
    assert not (profiles / "empty.json").exists()


def test_put_get_delete_still_work(api, profiles):
    created = api.handle("PUT", f"{PROFILES}/fresh", ADMIN, json.dumps(profile_body()).encode(), [])
    assert created.status == 201 and created.payload["id"] == "fresh"
    replaced = api.handle("PUT", f"{PROFILES}/fresh", ADMIN,
                          json.dumps(profile_body(activate={"2": [1]})).encode(), [])
    assert replaced.status == 200
    got = api.handle("GET", f"{PROFILES}/fresh", {}, b"", [])
    assert got.payload["profile"]["activate"] == {"2": [1]}
    assert "fresh" in {p["id"] for p in api.handle("GET", PROFILES, {}, b"", []).payload["data"]}
    assert api.handle("DELETE", f"{PROFILES}/fresh", ADMIN, b"", []).status == 200
    assert not (profiles / "fresh.json").exists()
    assert api.handle("POST", RELOAD, ADMIN, b"", []).payload["loaded"] == ["concise", "safety"]
    assert refusal(api, "DELETE", f"{PROFILES}/fresh").status == 404
    assert refusal(api, "PUT", f"{PROFILES}/x", b"{}", headers={}).status == 401


# ---- no filesystem paths in answers -------------------------------------------------------


def test_store_failures_are_500_without_paths(api, profiles, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(profiles / "fresh.json"))

    monkeypatch.setattr(api.context.store, "put", fail)
    error = put_body(api, "fresh", json.dumps(profile_body()).encode())
    assert error.status == 500 and error.message == "cannot write profile 'fresh'"
    assert str(profiles) in caplog.text  # the detail is logged
    monkeypatch.setattr(api.context.store, "delete", fail)
    error = refusal(api, "DELETE", f"{PROFILES}/concise")
    assert error.status == 500 and error.message == "cannot delete profile 'concise'"


def test_scan_errors_name_no_paths(api, profiles):
    (profiles / "broken.json").write_text("{oops")
    (profiles / "dangling.json").symlink_to(profiles / "nowhere" / "x.json")
    for method, path in (("GET", PROFILES), ("POST", RELOAD)):
        text = json.dumps(api.handle(method, path, ADMIN, b"", []).payload)
        assert "broken.json" in text and str(profiles) not in text and "/tmp" not in text
    error = refusal(api, "GET", f"{PROFILES}/dangling")
    assert str(profiles) not in error.message
    shutil.rmtree(profiles)
    text = json.dumps(api.handle("GET", PROFILES, ADMIN, b"", []).payload)
    assert str(profiles) not in text and "does not exist" in text


def test_without_paths():
    assert without_paths("[Errno 13] Permission denied: '/srv/profiles/x.json'") == \
        "[Errno 13] Permission denied: 'x.json'"
    assert without_paths("/srv/profiles") == "profiles"
    assert without_paths("format steermoe-profile/1; top-k/2 a / b") == \
        "format steermoe-profile/1; top-k/2 a / b"
