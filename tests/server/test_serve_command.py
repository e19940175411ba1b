"""`steermoe serve` argument handling (no server is started)."""

from __future__ import annotations

import json

import pytest

from server.cli import main
from server.config import ConfigError
from server.serve_command import prepare, split_model
from server.vllm_server_compat import MIDDLEWARE, ServingSetupError
from tests.server.server_process import write_profile

MODEL = {"architecture": "Qwen3MoeForCausalLM", "num_layers": 4, "num_experts": 8, "top_k": 2}


@pytest.fixture
def profiles(tmp_path):
    directory = tmp_path / "profiles"
    directory.mkdir()
    write_profile(directory, "safety", MODEL, {1: [5]})
    write_profile(directory, "olmoe", {"architecture": "OlmoeForCausalLM", "num_layers": 16,
                                       "num_experts": 64, "top_k": 8}, {1: [5]})
    return directory


@pytest.fixture
def local_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    config = {"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 4,
              "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1}
    (model / "config.json").write_text(json.dumps(config))
    return str(model)


def test_split_model():
    assert split_model(["m", "--port", "1"]) == ("m", ["--port", "1"])
    assert split_model(["--model", "m"]) == (None, ["--model", "m"])


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "admin-token"
    path.write_text("t\n")
    path.chmod(0o600)
    return path


def test_steering_options_are_taken_vllm_options_passed_on(profiles, local_model, token_file):
    config, argv, token = prepare([
        local_model, "--dtype", "float32", "--profiles", str(profiles),
        "--endpoint", "safe=safety", "--allow-routing-capture", "--max_num_seqs", "4",
        "--admin-token-file", str(token_file), "--middleware", "other.Middleware",
        "--port=8001",
    ])
    assert argv[:2] == ["serve", local_model]
    assert argv[2:7] == ["--dtype", "float32", "--max_num_seqs", "4", "--port=8001"]
    names = argv[argv.index("--served-model-name") + 1: argv.index("--middleware")]
    assert names == [local_model]  # vLLM never serves a locked name (it could run unsteered)
    assert argv[-4:] == ["--middleware", "other.Middleware", "--middleware", MIDDLEWARE]
    assert config.endpoints == {"safe": "safety"} and config.allow_routing_capture
    assert not config.allow_inline_steering and token == "t"
    assert config.profiles_dir == str(profiles.resolve())


def test_served_model_names_become_the_base_names(profiles):
    config, argv, _ = prepare(["--model", "hub/model", "--served-model-name", "a", "b",
                               "--profiles", str(profiles), "--endpoint", "c=safety"])
    assert config.base_names == ("a", "b")
    assert argv[argv.index("--served-model-name") + 1:][:3] == ["a", "b", "--middleware"]


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "1"], "give the model"),
    (["m", "--profiles", "/does/not/exist"], "not a directory"),
    (["m", "--endpoint", "safe=safety"], "needs --profiles"),
    (["m", "--endpoint", "safe"], "NAME=PROFILE"),
])
def test_bad_options(args, message, monkeypatch):
    monkeypatch.delenv("STEERMOE_PROFILE_DIR", raising=False)
    with pytest.raises(ConfigError, match=message):
        prepare(args)


def test_locked_profiles_are_checked_at_start(profiles, local_model):
    with pytest.raises(ConfigError, match="no profile 'missing'"):
        prepare([local_model, "--profiles", str(profiles), "--endpoint", "x=missing"])
    with pytest.raises(ConfigError, match="served model is"):
        prepare([local_model, "--profiles", str(profiles), "--endpoint", "x=olmoe"])


def test_setups_that_bypass_the_middleware_are_refused(profiles, monkeypatch):
    with pytest.raises(ServingSetupError):
        prepare(["m", "--grpc"])
    monkeypatch.setenv("VLLM_USE_RUST_FRONTEND", "1")
    with pytest.raises(ServingSetupError):
        prepare(["m"])


def test_cli_dispatch(capsys):
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert main(["bogus"]) == 2
    assert main(["serve", "--port", "1"]) == 2
    assert "give the model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--help"])
    assert caught.value.code == 0
    assert "--allow-inline-steering" in capsys.readouterr().out


# ---- the admin token ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["m", "--admin-token", "secret"],
    ["m", "--admin-token=secret"],
    ["m", "--admin_token", "secret"],
    ["m", "--admin-token"],
])
def test_admin_token_on_the_command_line_is_refused(args, capsys, monkeypatch):
    monkeypatch.delenv("STEERMOE_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="--admin-token-file") as caught:
        prepare(args)
    assert "STEERMOE_ADMIN_TOKEN" in str(caught.value) and "secret" not in str(caught.value)
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert "--admin-token-file" in err and "STEERMOE_ADMIN_TOKEN" in err
    assert "secret" not in err


def test_admin_token_comes_from_the_file_or_the_environment(profiles, token_file, monkeypatch):
    monkeypatch.delenv("STEERMOE_ADMIN_TOKEN", raising=False)
    assert prepare(["m", "--profiles", str(profiles)])[2] is None
    monkeypatch.setenv("STEERMOE_ADMIN_TOKEN", " from-env ")
    _, argv, token = prepare(["m", "--profiles", str(profiles)])
    assert token == "from-env"
    _, argv, token = prepare(["m", "--admin-token-file", str(token_file)])
    assert token == "t"  # the file wins over the environment
    assert not any("admin" in arg or arg == "t" for arg in argv)  # nothing goes on to vLLM


def test_serve_main_passes_the_token_in_the_environment(token_file, monkeypatch):
    for name in ("STEERMOE_ADMIN_TOKEN", "STEERMOE_SERVER_CONFIG"):  # restored afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    seen = {}

    def fake_run(argv):
        import os

        seen["argv"], seen["token"] = list(argv), os.environ.get("STEERMOE_ADMIN_TOKEN")
        return 0

    monkeypatch.setattr("server.vllm_server_compat.run_vllm_serve", fake_run)
    assert main(["serve", "m", "--admin-token-file", str(token_file)]) == 0
    assert seen["token"] == "t" and "t" not in seen["argv"]


def test_unusable_token_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("STEERMOE_ADMIN_TOKEN", raising=False)
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="holds no token"):
        prepare(["m", "--admin-token-file", str(empty)])
    with pytest.raises(ConfigError, match="cannot open"):
        prepare(["m", "--admin-token-file", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="not a regular file"):
        prepare(["m", "--admin-token-file", str(tmp_path)])


def test_an_invalid_locked_profile_is_refused_at_start(profiles, local_model):
    (profiles / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="--endpoint x: broken.json: not valid JSON"):
        prepare([local_model, "--profiles", str(profiles), "--endpoint", "x=broken"])
    empty = {"format": "steermoe-profile/1", "name": "empty", "model": MODEL,
             "activate": {}, "deactivate": {"1": []}}
    (profiles / "empty.json").write_text(json.dumps(empty))
    with pytest.raises(ConfigError, match="--endpoint x: empty.json: .*no experts"):
        prepare([local_model, "--profiles", str(profiles), "--endpoint", "x=empty"])
