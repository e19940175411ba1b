"""`server.config`: operator options and their trip through the environment."""

from __future__ import annotations

import logging
import os

import pytest

from server.config import (
    ADMIN_TOKEN_ENV,
    CONFIG_ENV,
    ConfigError,
    ServerConfig,
    admin_token_from_env,
    parse_client_profiles,
    parse_endpoint,
    parse_endpoint_client_profiles,
    parse_endpoints,
    read_admin_token_file,
)


def test_parse_endpoint():
    assert parse_endpoint("olmoe-safe=safety") == ("olmoe-safe", "safety")
    assert parse_endpoint(" a = b ") == ("a", "b")
    for bad in ("olmoe-safe", "=safety", "a=", "a b=safety", "a=bad name"):
        with pytest.raises(ConfigError):
            parse_endpoint(bad)


def test_parse_endpoints_refuses_duplicates():
    assert parse_endpoints(["a=x", "b=x"]) == {"a": "x", "b": "x"}
    assert parse_endpoints(None) == {}
    with pytest.raises(ConfigError, match="twice"):
        parse_endpoints(["a=x", "a=y"])


def test_parse_client_profiles():
    assert parse_client_profiles(None) is None
    assert parse_client_profiles("none") == ()
    assert parse_client_profiles("") == ()
    assert parse_client_profiles("a, b,a") == ("a", "b")
    with pytest.raises(ConfigError):
        parse_client_profiles("ok,not ok")


def test_config_round_trip_through_the_environment(monkeypatch):
    config = ServerConfig(profiles_dir="/p", endpoints={"safe": "safety"}, base_names=("m",),
                          client_profiles=("safety",), allow_inline_steering=True,
                          max_request_bytes=10, audit_log="/a.jsonl")
    assert ServerConfig.from_json(config.to_json()) == config
    monkeypatch.setenv(CONFIG_ENV, config.to_json())
    assert ServerConfig.from_env() == config
    assert config.served_names == ("m", "safe") and config.default_name == "m"


def test_defaults_without_steermoe_serve(monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv("STEERMOE_PROFILE_DIR", "/profiles")
    config = ServerConfig.from_env()
    assert config.profiles_dir == "/profiles" and config.client_profiles is None
    assert not config.allow_inline_steering and not config.allow_routing_capture
    assert config.max_request_bytes == 1 << 20


def test_config_checks():
    with pytest.raises(ConfigError, match="already a served name"):
        ServerConfig(endpoints={"m": "safety"}, base_names=("m",))
    with pytest.raises(ConfigError):
        ServerConfig(max_request_bytes=0)


def test_admin_token_from_env(monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "  ")
    assert admin_token_from_env() is None
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "t")
    assert admin_token_from_env() == "t"


def test_admin_token_file(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text("  s3cret-token\n\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert read_admin_token_file(path) == "s3cret-token"
    assert not caplog.records
    path.chmod(0o640)
    with caplog.at_level(logging.WARNING):
        assert read_admin_token_file(str(path)) == "s3cret-token"
    assert "readable by group or others" in caplog.text and "s3cret" not in caplog.text


def test_admin_token_file_through_a_symlink(tmp_path):
    target = tmp_path / "real"
    target.write_text("linked")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert read_admin_token_file(link) == "linked"  # as a mounted secret is


@pytest.mark.parametrize(("content", "message"), [
    (b"", "holds no token"),
    (b" \n\t ", "holds no token"),
    (b"x" * 4097, "larger than 4096 bytes"),
    (b"\xff\xfe", "not UTF-8"),
    (b"two\nlines", "one line of printable ASCII"),
    ("t\u00f6ken".encode(), "one line of printable ASCII"),
])
def test_bad_admin_token_files(tmp_path, content, message):
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as caught:
        read_admin_token_file(path)
    assert "xxxx" not in str(caught.value) and "lines" not in str(caught.value)


def test_admin_token_file_at_the_size_limit(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"y" * 4096)
    assert read_admin_token_file(path) == "y" * 4096


def test_admin_token_file_that_is_not_a_regular_file(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        read_admin_token_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):  # and does not block
        read_admin_token_file(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_admin_token_file("/dev/zero")
    with pytest.raises(ConfigError, match="cannot open"):
        read_admin_token_file(tmp_path / "missing")


def test_an_endpoint_may_lock_a_composition():
    assert parse_endpoint("m-both=safety+concise") == ("m-both", "concise+safety")
    for bad in ("m=safety+", "m=safety+safety", "m=a+bad name"):
        with pytest.raises(ConfigError, match="--endpoint m"):
            parse_endpoint(bad)


def test_endpoint_client_profiles():
    assert parse_endpoint_client_profiles(["m-safe=concise, formal,concise"]) == {
        "m-safe": ("concise", "formal")}
    assert parse_endpoint_client_profiles(["m-safe="]) == {"m-safe": ()}
    for bad in (["concise"], ["=concise"], ["m=ok,not ok"], ["m=a", "m=b"]):
        with pytest.raises(ConfigError, match="--endpoint-client-profiles"):
            parse_endpoint_client_profiles(bad)
    config = ServerConfig(endpoints={"m-safe": "safety"}, base_names=("m",),
                          endpoint_client_profiles={"m-safe": ("concise",)})
    assert ServerConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="not a locked endpoint"):
        ServerConfig(endpoints={"m-safe": "safety"}, endpoint_client_profiles={"m": ("a",)})
    with pytest.raises(ConfigError, match="already locked"):
        ServerConfig(endpoints={"m-safe": "safety"},
                     endpoint_client_profiles={"m-safe": ("safety",)})
