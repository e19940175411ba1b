"""`server.config`: operator options and their trip through the environment."""

from __future__ import annotations

import pytest

from server.config import (
    ADMIN_TOKEN_ENV,
    CONFIG_ENV,
    ConfigError,
    ServerConfig,
    admin_token_from_env,
    parse_client_profiles,
    parse_endpoint,
    parse_endpoints,
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
